//! The node owns everything: settings, hub, broker, its upstream (broker
//! subscriptions), the session registry and the shutdown token that every task's token
//! descends from. [`Node::start`] binds the listener, connects the broker and runs the
//! accept loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fanout_protocol::CloseCode;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::{Broker, BrokerError, SharedSink};
use crate::config::{BrokerSettings, Settings};
use crate::hub::Hub;
use crate::metrics as m;
use crate::repair::{self, Repairs};
use crate::shared::{ControlMessage, Shared};
use crate::sink::BrokerSink;
use crate::upstream::{self, Upstream};

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

/// Takes the node's reference on the control channel, retrying with backoff until the
/// broker subscribes it (a failed acquire gives its reference back). Once held, the
/// subscription task keeps it through reconnects.
async fn hold_control_channel(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let acquired = shared
            .upstream
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
        let report = shared.stats().to_string();
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

/// Connections the kernel may hold completed for the accept loop. The usual 128 overflows
/// when a node takes over another's clients at once (a reconnect storm arrives at
/// thousands per second): each connection dropped from a full queue waits for its SYN to
/// be sent again, a whole second later. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (SO_REUSEADDR, as `TcpListener::bind` does) with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Node {
    /// Binds, connects the broker and starts serving.
    pub async fn start(settings: Settings) -> Result<Node, NodeError> {
        let settings = Arc::new(settings);
        let metrics = m::install();
        let listener = listen(settings.listen).map_err(|error| NodeError::Bind {
            addr: settings.listen,
            error,
        })?;
        let addr = listener.local_addr().map_err(|error| NodeError::Bind {
            addr: settings.listen,
            error,
        })?;
        let hub = Arc::new(Hub::with_hold_limit(64, settings.limits.repair_hold_bytes));
        let (upstream, commands) = Upstream::channel();
        let (repairs, repair_requests) = Repairs::channel();
        let (control_tx, control_rx) = tokio::sync::mpsc::unbounded_channel();
        let sink: SharedSink = Arc::new(BrokerSink::new(
            hub.clone(),
            upstream.clone(),
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
        tracker.spawn(upstream::run(
            broker.clone(),
            commands,
            move |channel: &str| repair.request(channel),
            shutdown.clone(),
        ));
        tracker.spawn(repair::run(
            hub.clone(),
            broker.clone(),
            settings.clone(),
            upstream.clone(),
            repair_requests,
            shutdown.clone(),
        ));
        let presence = crate::presence::Presence::start(broker.clone(), settings.presence_ttl);
        let shared = Arc::new(Shared::new(
            settings.clone(),
            hub,
            broker,
            upstream,
            presence,
            shutdown.clone(),
            metrics,
        ));
        // Cluster-wide operations arrive on the control channel, which this node holds
        // for its whole life (resubscribed after reconnects like any channel).
        // First attempt before serving, so that a started node is reachable at once.
        let control = Arc::from(crate::broker::CONTROL_CHANNEL);
        if let Err(error) = shared.upstream.acquire(control).await {
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

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.connections()
    }

    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// The node's presence registry (white-box tests).
    #[cfg(feature = "internals")]
    #[doc(hidden)]
    pub fn presence(&self) -> Arc<crate::presence::Presence> {
        self.shared.presence.clone()
    }

    /// The node's broker (white-box tests).
    #[cfg(feature = "internals")]
    #[doc(hidden)]
    pub fn broker(&self) -> Arc<dyn Broker> {
        self.shared.broker.clone()
    }

    /// Drains the node, then shuts it down: `/readyz` answers 503 at once and new
    /// sockets are refused with 1001, while existing connections are closed with 1001
    /// one by one, in random order, paced evenly over `window` with jitter — so that
    /// their reconnects spread over the other nodes instead of arriving all at once.
    /// The node keeps serving them (and `/metrics`) until each one's turn.
    pub async fn drain(self, window: Duration) {
        self.shared.start_draining();
        // Authenticated sessions, paced; the rest are closed by the shutdown after.
        let mut controls = self.shared.session_controls(true);
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
        self.shared.start_draining();
        self.accept.abort();
        let _ = self.accept.await;
        self.shared.shutdown.cancel();
        // Every session, authenticated or not, closes with 1001.
        for control in self.shared.session_controls(false) {
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::fd::AsRawFd;

    /// A listening socket's accept-queue limit and length (Linux reports them in
    /// `tcp_info`'s `tcpi_sacked` and `tcpi_unacked`).
    fn accept_queue(listener: &tokio::net::TcpListener) -> (u32, u32) {
        // SAFETY: `tcp_info` is plain data (all zeroes is a valid value), and getsockopt
        // writes at most `len` bytes of it for a valid socket fd.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                &mut info as *mut libc::tcp_info as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        (info.tcpi_sacked, info.tcpi_unacked)
    }

    /// A node taking over another's clients gets thousands of connections at once:
    /// they wait in the kernel's queue for the accept loop instead of being dropped
    /// (each dropped one would wait a second for its SYN to be sent again).
    #[tokio::test]
    async fn the_listener_queues_a_burst_of_connections() {
        let listener = super::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        let (limit, queued) = accept_queue(&listener);
        assert_eq!(limit, super::LISTEN_BACKLOG.min(somaxconn));
        assert_eq!(queued, 0);
        // More than the usual 128, none accepted: every one completes its handshake.
        let n = 300.min(limit as usize - 1);
        let addr = listener.local_addr().unwrap();
        let connects = (0..n).map(|_| tokio::net::TcpStream::connect(addr));
        let streams = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            futures_util::future::try_join_all(connects),
        )
        .await
        .expect("every connection is queued, none dropped")
        .unwrap();
        assert_eq!(accept_queue(&listener).1 as usize, n);
        drop(streams);
    }
}
