//! The node owns everything: settings, hub, broker, subscriptions, the session registry
//! and the shutdown token that every task's token descends from. [`Node::start`] binds
//! the listener, connects the broker and runs the accept loop.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fanout_protocol::CloseCode;
use metrics_exporter_prometheus::PrometheusHandle;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::{Broker, BrokerError, SharedSink};
use crate::config::{BrokerSettings, Settings};
use crate::control::Control;
use crate::hub::{Hub, SessionId};
use crate::metrics as m;
use crate::recovery::{self, Repairs};
use crate::sink::BrokerSink;
use crate::subscriptions::{self, Subscriptions};

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot connect the broker: {0}")]
    Broker(#[from] BrokerError),
}

/// An open session: how to close it, and its user once authenticated.
struct SessionEntry {
    control: Arc<Control>,
    user: Option<Arc<str>>,
}

/// State shared by every task of the node.
pub struct Shared {
    pub settings: Arc<Settings>,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub subscriptions: Subscriptions,
    pub presence: Arc<crate::presence::Presence>,
    pub shutdown: CancellationToken,
    pub metrics: PrometheusHandle,
    pub started: Instant,
    /// Random per process: tells this node's own control messages apart.
    pub instance: String,
    draining: AtomicBool,
    next_id: AtomicU64,
    connections: AtomicUsize,
    /// Upgraded sockets not authenticated yet.
    pending: AtomicUsize,
    /// Sockets by peer address (only with `limits.max_connections_per_ip`).
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Connections by user (only with `limits.max_connections_per_user`).
    per_user: Mutex<HashMap<Arc<str>, usize>>,
    /// Every open session, authenticated or not: how shutdown, drain and admin
    /// disconnects reach each one. (One registry, not one more by user: it is per
    /// connection memory, and looking up a user's sessions is a rare admin operation.)
    sessions: Mutex<HashMap<SessionId, SessionEntry>>,
}

impl Shared {
    /// Registers a new session; returns its id. A session opened while the node shuts
    /// down is closed (1001) at once.
    pub(crate) fn open_session(&self, control: Arc<Control>) -> SessionId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.sessions.lock().expect("sessions lock").insert(
            id,
            SessionEntry {
                control: control.clone(),
                user: None,
            },
        );
        // After the insert: `shutdown` cancels the token before it reads the registry,
        // so a session is either in its sweep or sees the token here.
        if self.shutdown.is_cancelled() {
            control.close(CloseCode::GoingAway);
        }
        id
    }

    pub(crate) fn close_session(&self, id: SessionId) {
        self.sessions.lock().expect("sessions lock").remove(&id);
    }

    /// Records that session `id` authenticated as `user`.
    pub(crate) fn register(&self, id: SessionId, user: Arc<str>) {
        if let Some(entry) = self.sessions.lock().expect("sessions lock").get_mut(&id) {
            entry.user = Some(user);
        }
    }

    /// Session `id` is ending: it no longer counts as its user's.
    pub(crate) fn unregister(&self, id: SessionId) {
        if let Some(entry) = self.sessions.lock().expect("sessions lock").get_mut(&id) {
            entry.user = None;
        }
    }

    /// Closes every connection of `user` on this node with 4010; returns how many.
    pub fn disconnect_user(&self, user: &str) -> usize {
        let sessions = self.sessions.lock().expect("sessions lock");
        let mut n = 0;
        for entry in sessions.values() {
            if entry.user.as_deref() == Some(user) {
                entry.control.close(CloseCode::DisconnectedByAdmin);
                n += 1;
            }
        }
        n
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Authenticated users with at least one connection.
    pub fn users(&self) -> usize {
        let sessions = self.sessions.lock().expect("sessions lock");
        let users: std::collections::HashSet<&str> = sessions
            .values()
            .filter_map(|e| e.user.as_deref())
            .collect();
        users.len()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Admits an upgraded socket: with a per-IP limit, a slot of its address's; then,
    /// if it already authenticated (a valid token in the handshake) as `user`, a
    /// connection slot (see [`Admission::connect`]), else a slot of
    /// `limits.max_pending_auth` — not of `max_connections`, so that sockets that never
    /// authenticate cannot lock real clients out. Refused: the close code and reason.
    pub(crate) fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        user: Option<&Arc<str>>,
    ) -> Result<Admission, Refusal> {
        let limits = &self.settings.limits;
        let n = self.pending.fetch_add(1, Ordering::AcqRel);
        metrics::gauge!(m::PENDING_AUTH_CONNECTIONS).set((n + 1) as f64);
        // Pending from here: dropping it on a refusal below gives everything back.
        let mut admission = Admission {
            shared: self.clone(),
            stage: Stage::Pending,
            counted: None,
        };
        if limits.max_connections_per_ip > 0 {
            let mut per_ip = self.per_ip.lock().expect("per_ip lock");
            let count = per_ip.entry(ip).or_insert(0);
            if *count >= limits.max_connections_per_ip {
                drop(per_ip);
                return Err(refuse(
                    "per_ip",
                    CloseCode::RateLimited,
                    "too many connections from this address",
                ));
            }
            *count += 1;
            admission.counted.get_or_insert_with(Default::default).ip = Some(ip);
        }
        match user {
            Some(user) => admission.connect(user)?,
            None if n >= limits.max_pending_auth => {
                return Err(refuse(
                    "pending_auth",
                    CloseCode::TryLater,
                    "too many connections waiting to authenticate; try later",
                ))
            }
            None => {}
        }
        Ok(admission)
    }
}

/// Why a connection was refused by a limit: its close code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub code: CloseCode,
    pub reason: &'static str,
}

fn refuse(limit: &'static str, code: CloseCode, reason: &'static str) -> Refusal {
    metrics::counter!(m::CONNECTIONS_REFUSED_TOTAL, "limit" => limit).increment(1);
    tracing::info!(limit, code = code.code(), "connection refused by a limit");
    Refusal { code, reason }
}

enum Stage {
    Pending,
    Connected,
}

/// A socket's place in the node's limits, from the upgrade to its end: pending
/// authentication, then connected (a slot of `max_connections`, and of its user's
/// limit). Given back when dropped, on every path.
pub(crate) struct Admission {
    shared: Arc<Shared>,
    stage: Stage,
    /// What it counts in the per-IP and per-user limits, when those are set (boxed:
    /// every connection carries this, and the limits are off by default).
    counted: Option<Box<Counted>>,
}

#[derive(Default)]
struct Counted {
    ip: Option<IpAddr>,
    user: Option<Arc<str>>,
}

impl Admission {
    /// The socket authenticated as `user`: it leaves the pending budget for a
    /// connection slot, if the node and the user have one.
    pub(crate) fn connect(&mut self, user: &Arc<str>) -> Result<(), Refusal> {
        let shared = &self.shared;
        let limits = &shared.settings.limits;
        if !matches!(self.stage, Stage::Pending) {
            return Ok(());
        }
        let n = shared.connections.fetch_add(1, Ordering::AcqRel);
        if n >= limits.max_connections {
            shared.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(refuse(
                "connections",
                CloseCode::TryLater,
                "the node is full; try later",
            ));
        }
        if limits.max_connections_per_user > 0 {
            let mut per_user = shared.per_user.lock().expect("per_user lock");
            let count = per_user.entry(user.clone()).or_insert(0);
            if *count >= limits.max_connections_per_user {
                drop(per_user);
                shared.connections.fetch_sub(1, Ordering::AcqRel);
                return Err(refuse(
                    "per_user",
                    CloseCode::RateLimited,
                    "too many connections for this user",
                ));
            }
            *count += 1;
            self.counted.get_or_insert_with(Default::default).user = Some(user.clone());
        }
        let pending = shared.pending.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!(m::PENDING_AUTH_CONNECTIONS).set(pending as f64);
        metrics::gauge!(m::CONNECTIONS).set((n + 1) as f64);
        self.stage = Stage::Connected;
        Ok(())
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let shared = &self.shared;
        match self.stage {
            Stage::Pending => {
                let n = shared.pending.fetch_sub(1, Ordering::AcqRel) - 1;
                metrics::gauge!(m::PENDING_AUTH_CONNECTIONS).set(n as f64);
            }
            Stage::Connected => {
                let n = shared.connections.fetch_sub(1, Ordering::AcqRel) - 1;
                metrics::gauge!(m::CONNECTIONS).set(n as f64);
            }
        }
        let Some(counted) = self.counted.take() else {
            return;
        };
        if let Some(ip) = counted.ip {
            let mut per_ip = shared.per_ip.lock().expect("per_ip lock");
            if let Some(count) = per_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        if let Some(user) = &counted.user {
            let mut per_user = shared.per_user.lock().expect("per_user lock");
            if let Some(count) = per_user.get_mut(user) {
                *count -= 1;
                if *count == 0 {
                    per_user.remove(user);
                }
            }
        }
    }
}

/// A cluster-wide operation, sent on the control channel.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlMessage {
    /// Close every connection of `user` with 4010.
    Disconnect {
        from: String,
        user: String,
        #[serde(default)]
        reason: Option<String>,
    },
}

/// Takes the node's reference on the control channel, retrying with backoff until the
/// broker subscribes it (a failed acquire gives its reference back). Once held, the
/// subscription task keeps it through reconnects.
async fn hold_control_channel(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let acquired = shared
            .subscriptions
            .acquire(Arc::from(crate::broker::CONTROL_CHANNEL));
        let result = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = acquired => r,
        };
        match result {
            Ok(()) => return,
            Err(error) => {
                metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "control").increment(1);
                tracing::warn!(%error, "control channel not subscribed; retrying");
            }
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Carries out control messages from other nodes.
async fn control_loop(shared: Arc<Shared>, mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    loop {
        let payload = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            p = rx.recv() => match p {
                Some(p) => p,
                None => return,
            },
        };
        match serde_json::from_slice::<ControlMessage>(&payload) {
            // This node acted when it sent it.
            Ok(ControlMessage::Disconnect { from, .. }) if from == shared.instance => {}
            Ok(ControlMessage::Disconnect { user, reason, .. }) => {
                let n = shared.disconnect_user(&user);
                tracing::info!(%user, reason = reason.as_deref().unwrap_or(""), connections = n, "cluster disconnect");
            }
            Err(error) => {
                metrics::counter!(m::INTERNAL_ERRORS_TOTAL, "place" => "control").increment(1);
                tracing::warn!(%error, bytes = payload.len(), "unreadable control message ignored");
            }
        }
    }
}

/// Reports this node's figures for the cluster view of `/api/stats`, every third of
/// the report TTL: a node that dies drops out within the TTL.
async fn report_loop(shared: Arc<Shared>) {
    let ttl = shared.settings.node_report_ttl;
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !shared.broker.is_ready() {
            continue;
        }
        let report = crate::api::node_stats(&shared).to_string();
        if let Err(error) = shared
            .broker
            .report(&shared.settings.node_id, &report, ttl)
            .await
        {
            metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "report").increment(1);
            tracing::debug!(%error, "node report failed");
        }
    }
}

/// A running node.
pub struct Node {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
    tracker: tokio_util::task::TaskTracker,
}

impl Node {
    /// Binds, connects the broker and starts serving.
    pub async fn start(settings: Settings) -> Result<Node, NodeError> {
        let settings = Arc::new(settings);
        let metrics = m::install();
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|error| NodeError::Bind {
                    addr: settings.listen,
                    error,
                })?;
        let addr = listener.local_addr().map_err(|error| NodeError::Bind {
            addr: settings.listen,
            error,
        })?;
        let hub = Arc::new(Hub::with_hold_limit(64, settings.limits.repair_hold_bytes));
        let (subscriptions, commands) = Subscriptions::channel();
        let (repairs, repair_requests) = Repairs::channel();
        let (control_tx, control_rx) = tokio::sync::mpsc::unbounded_channel();
        let sink: SharedSink = Arc::new(BrokerSink::new(
            hub.clone(),
            subscriptions.clone(),
            repairs.clone(),
            control_tx,
        ));
        let broker: Arc<dyn Broker> = match &settings.broker {
            BrokerSettings::Memory => Arc::new(MemoryBroker::new(sink)),
            BrokerSettings::Redis { url, probe } => {
                Arc::new(RedisBroker::connect(url, *probe, sink).await?)
            }
        };
        let tracker = tokio_util::task::TaskTracker::new();
        let shutdown = CancellationToken::new();
        let repair = repairs.clone();
        tracker.spawn(subscriptions::run(
            broker.clone(),
            commands,
            move |channel: &str| repair.request(channel),
            shutdown.clone(),
        ));
        tracker.spawn(recovery::run(
            hub.clone(),
            broker.clone(),
            settings.clone(),
            subscriptions.clone(),
            repair_requests,
            shutdown.clone(),
        ));
        let presence = crate::presence::Presence::start(broker.clone(), settings.presence_ttl);
        let shared = Arc::new(Shared {
            settings: settings.clone(),
            hub,
            broker,
            subscriptions,
            presence,
            shutdown: shutdown.clone(),
            metrics,
            started: Instant::now(),
            instance: crate::config::random_token(16),
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            per_user: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        });
        // Cluster-wide operations arrive on the control channel, which this node holds
        // for its whole life (resubscribed after reconnects like any channel).
        // First attempt before serving, so that a started node is reachable at once.
        let control = Arc::from(crate::broker::CONTROL_CHANNEL);
        if let Err(error) = shared.subscriptions.acquire(control).await {
            tracing::warn!(%error, "control channel not subscribed yet; retrying in the background");
            tracker.spawn(hold_control_channel(shared.clone()));
        }
        tracker.spawn(control_loop(shared.clone(), control_rx));
        tracker.spawn(report_loop(shared.clone()));
        // Every gauge exists from the start: an absent series cannot be alerted on.
        metrics::gauge!(m::CONNECTIONS).set(0.0);
        metrics::gauge!(m::PENDING_AUTH_CONNECTIONS).set(0.0);
        metrics::gauge!(m::SUBSCRIPTIONS).set(0.0);
        metrics::gauge!(m::CHANNELS).set(0.0);
        metrics::gauge!(m::OUTBOUND_QUEUE_BYTES).set(0.0);
        metrics::gauge!(m::DRAINING).set(0.0);
        metrics::gauge!(m::BROKER_UP).set(if shared.broker.is_ready() { 1.0 } else { 0.0 });
        let upkeep = shared.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = upkeep.shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        upkeep.metrics.run_upkeep();
                        // Sampled too (events alone miss the command connection).
                        let up = if upkeep.broker.is_ready() { 1.0 } else { 0.0 };
                        metrics::gauge!(m::BROKER_UP).set(up);
                        metrics::gauge!(m::OUTBOUND_QUEUE_BYTES).set(crate::outbox::queued_bytes() as f64);
                    }
                }
            }
        });
        let accept = tokio::spawn(crate::http::accept_loop(
            listener,
            shared.clone(),
            tracker.clone(),
        ));
        tracing::info!(
            node = %settings.node_id,
            %addr,
            broker = shared.broker.kind(),
            "fanout edge listening"
        );
        Ok(Node {
            shared,
            addr,
            accept,
            tracker,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://<addr>/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// `http://<addr>`
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// Drains the node, then shuts it down: `/readyz` answers 503 at once and new
    /// sockets are refused with 1001, while existing connections are closed with 1001
    /// one by one, in random order, paced evenly over `window` with jitter — so that
    /// their reconnects spread over the other nodes instead of arriving all at once.
    /// The node keeps serving them (and `/metrics`) until each one's turn.
    pub async fn drain(self, window: Duration) {
        self.shared.draining.store(true, Ordering::Relaxed);
        metrics::gauge!(m::DRAINING).set(1.0);
        // Authenticated sessions, paced; the rest are closed by the shutdown after.
        let mut controls: Vec<Arc<Control>> = {
            let sessions = self.shared.sessions.lock().expect("sessions lock");
            sessions
                .values()
                .filter(|e| e.user.is_some())
                .map(|e| e.control.clone())
                .collect()
        };
        let started = tokio::time::Instant::now();
        if !window.is_zero() && !controls.is_empty() {
            use rand::seq::SliceRandom;
            controls.shuffle(&mut rand::rng());
            let slot = window / controls.len() as u32;
            for (i, control) in controls.iter().enumerate() {
                let jitter = slot.mul_f64(rand::random::<f64>());
                tokio::time::sleep_until(started + slot * i as u32 + jitter).await;
                control.close(CloseCode::GoingAway);
                metrics::counter!(m::DRAIN_CLOSES_TOTAL).increment(1);
            }
        }
        tracing::info!(
            closed = controls.len(),
            took_secs = started.elapsed().as_secs_f64(),
            "drain done"
        );
        self.shutdown().await;
    }

    /// Stops accepting, closes every connection with 1001 (reconnect elsewhere),
    /// disconnects the broker and waits for every task.
    pub async fn shutdown(self) {
        self.shared.draining.store(true, Ordering::Relaxed);
        self.accept.abort();
        let _ = self.accept.await;
        self.shared.shutdown.cancel();
        // Every session, authenticated or not, closes with 1001.
        let sessions: Vec<Arc<Control>> = self
            .shared
            .sessions
            .lock()
            .expect("sessions lock")
            .values()
            .map(|e| e.control.clone())
            .collect();
        for control in sessions {
            control.close(CloseCode::GoingAway);
        }
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        // The closed connections' leaves go out before Redis is let go.
        self.shared.presence.close().await;
        self.shared.broker.shutdown().await;
        tracing::info!(node = %self.shared.settings.node_id, "fanout edge stopped");
    }
}
