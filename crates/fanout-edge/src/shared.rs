//! What every task of the node shares ([`Shared`]): settings, hub, broker, upstream
//! (its broker subscriptions), presence, the shutdown token, the registry of open
//! sessions and the connection limits ([`Admission`]). It owns no task and does no I/O
//! of its own; the node builds it, the transports and the API read it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fanout_protocol::CloseCode;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::Settings;
use crate::control::Control;
use crate::hub::{Hub, SessionId};
use crate::metrics as m;
use crate::presence::Presence;
use crate::ratelimit::UserBuckets;
use crate::upstream::Upstream;
/// An open session: how to close it, and its user once authenticated.
struct SessionEntry {
    control: Arc<Control>,
    user: Option<Arc<str>>,
}

/// State shared by every task of the node.
pub(crate) struct Shared {
    pub settings: Arc<Settings>,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub upstream: Upstream,
    pub presence: Arc<Presence>,
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
    /// The rate limit of `/client/*` requests, per user.
    pub client_buckets: UserBuckets,
}

impl Shared {
    pub(crate) fn new(
        settings: Arc<Settings>,
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
        upstream: Upstream,
        presence: Arc<Presence>,
        shutdown: CancellationToken,
        metrics: PrometheusHandle,
    ) -> Shared {
        let client_buckets = UserBuckets::new(
            settings.limits.messages_per_second,
            settings.limits.message_burst,
        );
        Shared {
            settings,
            hub,
            broker,
            upstream,
            presence,
            shutdown,
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
            client_buckets,
        }
    }

    /// From now on `/readyz` answers 503 and new connections are refused.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        metrics::gauge!(m::DRAINING).set(1.0);
    }

    /// How to close each open session (only authenticated ones, or every one).
    pub(crate) fn session_controls(&self, authenticated_only: bool) -> Vec<Arc<Control>> {
        self.sessions
            .lock()
            .expect("sessions lock")
            .values()
            .filter(|e| !authenticated_only || e.user.is_some())
            .map(|e| e.control.clone())
            .collect()
    }

    /// This node's figures: `/api/stats` and the node's report to the cluster view.
    pub(crate) fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.settings.node_id,
            "broker": self.broker.kind(),
            "broker_ready": self.broker.is_ready(),
            "draining": self.is_draining(),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "connections": self.connections(),
            "users": self.users(),
            "channels": self.hub.channels(),
            "subscriptions": self.hub.subscriptions(),
            "outbound_queue_bytes": crate::outbox::queued_bytes(),
            "presence_entries": self.presence.local_len(),
        })
    }

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
    pub(crate) fn disconnect_user(&self, user: &str) -> usize {
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
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Authenticated users with at least one connection.
    pub(crate) fn users(&self) -> usize {
        let sessions = self.sessions.lock().expect("sessions lock");
        let users: std::collections::HashSet<&str> = sessions
            .values()
            .filter_map(|e| e.user.as_deref())
            .collect();
        users.len()
    }

    pub(crate) fn is_draining(&self) -> bool {
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
pub(crate) enum ControlMessage {
    /// Close every connection of `user` with 4010.
    Disconnect {
        from: String,
        user: String,
        #[serde(default)]
        reason: Option<String>,
    },
}
