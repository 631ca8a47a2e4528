//! One WebSocket connection's state machine. The reader half decodes client frames,
//! enforces size and rate limits, authenticates and handles subscribe / unsubscribe /
//! publish / ping / refresh. The writer half drains the connection's bounded outbox and
//! writes frames in bursts (one flush per burst), sends server pings, and sends the
//! close frame when the connection is closed from anywhere. The session never blocks
//! the hub: the hub only ever pushes into its outbox.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanout_protocol::{
    ClientFrame, CloseCode, Codec, DecodedFrame, ErrorCode, FrameId, ServerFrame, Since,
};
use fastwebsockets::{OpCode, WebSocketError};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};

use crate::auth::{AuthError, Principal};
use crate::broker::{BrokerError, HistoryQuery, MAX_HISTORY_READ};
use crate::control::{Control, Side};
use crate::hub::{Join, Joined, SessionId, Subscriber};
use crate::metrics as m;
use crate::node::{Admission, Refusal, Shared};
use crate::outbox::{Inbox, Kind, Outbox, Outgoing};
use crate::rules::Grant;
use crate::wire::{self, framing, Input, Out, Output};

/// How long a closing connection may take to accept its last frames and the close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long a connection the node closed may take to close its side.
const CLOSE_DRAIN: Duration = Duration::from_secs(1);

/// What the HTTP layer learned before the upgrade.
pub(crate) struct Handshake {
    pub codec: Codec,
    /// The token from the `Authorization` header or `?token=`, verified.
    pub auth: Option<Result<Principal, AuthError>>,
    /// A reason to close right after the upgrade (Origin, a limit, drain).
    pub refuse: Option<Refusal>,
    /// The socket's place in the node's limits (`None`: refused by one).
    pub admission: Option<Admission>,
}

/// Runs a connection to its end, from the upgrade on. (The upgrade is awaited here,
/// not in a wrapper around this: a wrapper's captures would stay in every
/// connection's task.)
// Not an `async fn` on purpose (see the block below).
#[allow(clippy::manual_async_fn)]
pub(crate) fn run(
    shared: Arc<Shared>,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    handshake: Box<Handshake>,
) -> impl Future<Output = ()> + Send {
    // A block, not an `async fn`: an async fn's arguments are stored twice in its
    // future (as captured, then moved to locals), and every connection carries it.
    // (The handshake comes boxed for the same reason: what the block captures stays in
    // it for the connection's whole life, even once moved out.)
    async move {
        let io: TokioIo<Upgraded> = match upgrade.await {
            Ok(ws) => ws.into_inner(),
            Err(error) => {
                tracing::debug!(%error, "upgrade failed");
                return;
            }
        };
        // Our listener serves plain TCP: take the socket back from hyper, to share it
        // between the reader and the writer without a lock.
        let (tcp, pre_read) = match io.into_inner().downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => (parts.io.into_inner(), parts.read_buf),
            Err(_) => {
                metrics::counter!(m::INTERNAL_ERRORS_TOTAL, "place" => "session").increment(1);
                tracing::error!("bug: an upgraded connection is not a TCP stream; dropping it");
                return;
            }
        };
        let (mut input, output) =
            wire::split(tcp, pre_read, shared.settings.limits.max_message_size);
        let Handshake {
            codec,
            auth,
            refuse,
            admission,
        } = *handshake;

        let control = Arc::new(Control::new());
        let id = shared.open_session(control.clone());
        let (outbox, outbox_rx) = Outbox::new(shared.settings.limits.queue(), control.clone());
        let writer_task = tokio::spawn(write_loop(
            output,
            outbox_rx,
            control.clone(),
            codec,
            shared.settings.limits.silence_timeout(),
        ));

        metrics::counter!(m::CONNECTIONS_TOTAL).increment(1);
        let mut session = Session {
            id,
            client: ClientId(rand::random()),
            shared: shared.clone(),
            codec,
            outbox,
            control: control.clone(),
            principal: None,
            channels: Channels::default(),
            bucket: TokenBucket::new(
                shared.settings.limits.messages_per_second,
                shared.settings.limits.message_burst,
            ),
            strikes: 0,
            last_strike: std::time::Instant::now(),
            client_closed: false,
            admission,
        };
        if let Some(r) = refuse {
            control.close_raw(r.code.code(), r.reason.into());
        } else if let Some(auth) = auth {
            match auth {
                Ok(principal) => session.authenticated(principal),
                Err(error) => session.refuse_token(&error),
            }
        }
        // A bug while handling a frame ends this connection (1011) and nothing else; the
        // cleanup below still runs.
        // (Built in place: a future first bound to a local would be stored twice in this
        // one, which every connection carries.)
        let read = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
            session.read_loop(&mut input),
        ))
        .await;
        if read.is_err() {
            metrics::counter!(m::INTERNAL_ERRORS_TOTAL, "place" => "session").increment(1);
            tracing::error!(
                session = id,
                "bug: handling a client frame panicked; closing with 1011"
            );
            control.close(CloseCode::Internal);
        }
        session.cleanup();
        // The writer ends within two grace periods of the cancel; never wait longer.
        let abort = writer_task.abort_handle();
        let close_sent = match tokio::time::timeout(CLOSE_GRACE * 3, writer_task).await {
            Ok(Ok(sent)) => sent,
            Ok(Err(_)) => false,
            Err(_) => {
                abort.abort();
                false
            }
        };
        if close_sent && !session.client_closed {
            // The node closed: let the client answer before the socket goes.
            input.drain(CLOSE_DRAIN).await;
        }
        // Label by known codes only: a client's own close code must not mint new series.
        let code = match control.close_frame().map(|(c, _)| *c) {
            _ if session.client_closed => "client".to_string(),
            None if shared.shutdown.is_cancelled() => "1001".to_string(),
            None => "none".to_string(),
            Some(c) if c == 1000 || CloseCode::from_u16(c).is_some() => c.to_string(),
            Some(_) => "other".to_string(),
        };
        shared.close_session(id);
        metrics::counter!(m::DISCONNECTS_TOTAL, "code" => code.clone()).increment(1);
        tracing::debug!(session = id, %code, "connection closed");
    }
}

struct Session {
    id: SessionId,
    client: ClientId,
    shared: Arc<Shared>,
    codec: Codec,
    outbox: Outbox,
    control: Arc<Control>,
    principal: Option<Principal>,
    channels: Channels,
    bucket: TokenBucket,
    strikes: u32,
    last_strike: std::time::Instant,
    /// The client sent the close frame.
    client_closed: bool,
    /// Its place in the node's limits, held until the connection ends (`None`: refused).
    admission: Option<Admission>,
}

enum Read {
    Message(Vec<u8>, bool),
    Ping(Vec<u8>),
    Close(u16),
    Nothing,
}

/// The random id a client is known by (in `connected`, presence): kept as a number,
/// written as 16 hex digits when needed.
#[derive(Clone, Copy)]
struct ClientId(u64);

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A connection's subscriptions (at most `limits.max_subscriptions`, usually one or
/// a few): a list, which holds only what it has, unlike a hash map.
#[derive(Default)]
struct Channels(Vec<Subscription>);

/// One of a connection's subscriptions.
struct Subscription {
    channel: Arc<str>,
    /// When the subscription token that granted it expires (seconds since the Unix
    /// epoch); 0 when the connection token's rights granted it. Until then a `refresh`
    /// does not take it away.
    token_exp: u64,
}

impl Channels {
    fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|s| &*s.channel == name)
    }

    fn insert(&mut self, channel: Arc<str>, token_exp: u64) {
        if self.0.capacity() == self.0.len() && self.0.len() < 4 {
            self.0.reserve_exact(1);
        }
        self.0.push(Subscription { channel, token_exp });
    }

    fn remove(&mut self, name: &str) -> Option<Arc<str>> {
        let i = self.0.iter().position(|s| &*s.channel == name)?;
        Some(self.0.swap_remove(i).channel)
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// A subscription being set up. Unless kept (it went live), dropping it gives back
/// what it took — the hub's join and the broker reference — so that no exit path (an
/// error, the subscribe deadline, a panic while handling the frame, the connection
/// closing meanwhile) can leave a joiner whose waiting list grows with every message,
/// or a broker subscription nobody releases.
struct Setup<'a> {
    hub: &'a crate::hub::Hub,
    subscriptions: &'a crate::subscriptions::Subscriptions,
    channel: Arc<str>,
    session: SessionId,
    /// The broker reference is held.
    acquired: bool,
    /// The session joined the channel in the hub.
    joined: bool,
}

impl<'a> Setup<'a> {
    fn new(
        hub: &'a crate::hub::Hub,
        subscriptions: &'a crate::subscriptions::Subscriptions,
        channel: Arc<str>,
        session: SessionId,
    ) -> Setup<'a> {
        Setup {
            hub,
            subscriptions,
            channel,
            session,
            acquired: false,
            joined: false,
        }
    }

    /// The subscription is live: the session owns it now.
    fn keep(mut self) {
        self.acquired = false;
        self.joined = false;
    }
}

impl Drop for Setup<'_> {
    fn drop(&mut self) {
        if self.joined {
            // (Already gone from the hub if the join ended it: a finished job.)
            self.hub.remove(&self.channel, self.session);
        }
        if self.acquired {
            self.subscriptions.release(self.channel.clone());
        }
    }
}

/// What a connection waits for besides the client's next frame.
#[derive(Clone, Copy)]
enum Due {
    /// The first frame must authenticate by then.
    Auth(Instant),
    /// The token expires then.
    Expiry(Instant),
}

impl Due {
    fn at(self) -> Instant {
        match self {
            Due::Auth(at) | Due::Expiry(at) => at,
        }
    }

    /// Closes the connection if this is due at `now` (no `auth` in time: 4001; the
    /// token expired: 4004); returns whether it did.
    fn passed(self, now: Instant, control: &Control) -> bool {
        match self {
            Due::Auth(at) if now >= at => {
                metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => "timeout").increment(1);
                control.close_raw(
                    CloseCode::Unauthorized.code(),
                    "authentication timeout".into(),
                );
                true
            }
            Due::Expiry(at) if now >= at => {
                metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => "expired").increment(1);
                control.close(CloseCode::TokenExpired);
                true
            }
            _ => false,
        }
    }
}

impl Session {
    async fn read_loop(&mut self, input: &mut Input) {
        // (Limits are read where used, not kept in locals: every connection's task
        // carries what this future keeps across its waits.)
        let auth_deadline = Instant::now() + self.shared.settings.limits.auth_timeout();
        let mut ping_at = Instant::now() + self.shared.settings.limits.ping_interval();
        // A fragmented message being put together.
        let mut fragments = framing::Fragments::default();
        loop {
            // One timer for the nearest of: authentication due (or the token's
            // expiry, once authenticated), the client's silence, and our next ping.
            // One, not three: every connection's task carries it (and the writer
            // carries none).
            let due = if self.principal.is_some() {
                Due::Expiry(self.expiry_deadline())
            } else {
                Due::Auth(auth_deadline)
            };
            // A client silent for two ping intervals (it answers our pings) is gone.
            let silent = Instant::now() + self.shared.settings.limits.silence_timeout();
            let frame = {
                // Kept across pings: a frame read halfway must not be dropped.
                let read = input.read_frame();
                tokio::pin!(read);
                loop {
                    tokio::select! {
                        biased;
                        _ = self.control.cancelled(Side::Reader) => return,
                        _ = sleep_until(due.at().min(silent).min(ping_at)) => {
                            let now = Instant::now();
                            if due.passed(now, &self.control) {
                                return;
                            }
                            match due {
                                _ if now >= silent => {
                                    tracing::debug!(session = self.id, "client silent for too long; dropping");
                                    self.control.abort();
                                    return;
                                }
                                // The next interval starts now: a late ping is not
                                // followed by a burst of missed ones.
                                _ if now >= ping_at => {
                                    self.outbox.push_ping();
                                    ping_at = now + self.shared.settings.limits.ping_interval();
                                }
                                _ => {}
                            }
                        }
                        r = &mut read => break r,
                    }
                }
            };
            let read = match frame {
                Err(WebSocketError::FrameTooLarge) => {
                    self.control.close(CloseCode::TooBig);
                    return;
                }
                Err(WebSocketError::UnexpectedEOF) | Err(WebSocketError::IoError(_)) => {
                    self.control.abort();
                    return;
                }
                // A whole text frame that is not UTF-8 (fastwebsockets checks those).
                Err(WebSocketError::InvalidUTF8) => {
                    self.control
                        .close_raw(1007, "text frame is not valid UTF-8".into());
                    return;
                }
                Err(error) => {
                    tracing::debug!(session = self.id, %error, "protocol error");
                    self.control.close(CloseCode::ProtocolError);
                    return;
                }
                Ok(frame) => {
                    if let Err((code, reason)) = framing::check(&frame) {
                        tracing::debug!(session = self.id, code, reason, "protocol error");
                        self.control.close_raw(code, reason.into());
                        return;
                    }
                    if frame.opcode != OpCode::Close && !self.admit_frame() {
                        // Refused by the rate limit (error sent, strike counted). A refused
                        // piece of a fragmented message drops the whole message.
                        if self.control.is_cancelled() {
                            return;
                        }
                        if framing::is_data(frame.opcode) {
                            fragments.refuse(frame.fin);
                        }
                        Read::Nothing
                    } else {
                        match frame.opcode {
                            OpCode::Text | OpCode::Binary | OpCode::Continuation => match fragments
                                .push(
                                    frame.opcode,
                                    frame.fin,
                                    frame.payload,
                                    self.shared.settings.limits.max_message_size,
                                ) {
                                Ok(Some((bytes, binary))) => Read::Message(bytes, binary),
                                Ok(None) => Read::Nothing,
                                Err((code, reason)) => {
                                    self.control.close_raw(code, reason.into());
                                    return;
                                }
                            },
                            OpCode::Ping => Read::Ping(frame.payload.to_vec()),
                            OpCode::Pong => Read::Nothing,
                            OpCode::Close => Read::Close(framing::close_code(&frame.payload)),
                        }
                    }
                }
            };
            match read {
                Read::Nothing => {}
                Read::Ping(payload) => self.outbox.push_pong(Bytes::from(payload)),
                Read::Close(code) => {
                    self.client_closed = true;
                    self.control.close_raw(code, String::new());
                    return;
                }
                Read::Message(bytes, binary) => {
                    // Boxed: handling a frame (a subscribe reads history) takes far more
                    // state than waiting for one, and every idle connection would carry it.
                    Box::pin(self.handle(&bytes, binary, due, &mut ping_at)).await;
                    if self.control.is_cancelled() {
                        return;
                    }
                }
            }
        }
    }

    /// Handles one client message while the connection's timers keep running: a frame
    /// that waits on the broker (a subscribe) does not stop pings, token expiry or a
    /// close from elsewhere. (The client's silence is not judged meanwhile: its frames
    /// are not being read.) Cancelled, the handling is dropped, and a half-made
    /// subscription undoes itself.
    async fn handle(&mut self, bytes: &[u8], binary: bool, due: Due, ping_at: &mut Instant) {
        let control = self.control.clone();
        let outbox = self.outbox.clone();
        let ping_interval = self.shared.settings.limits.ping_interval();
        let work = self.on_message(bytes, binary);
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                _ = control.cancelled(Side::Reader) => return,
                () = &mut work => return,
                _ = sleep_until(due.at().min(*ping_at)) => {
                    let now = Instant::now();
                    if due.passed(now, &control) {
                        return;
                    }
                    if now >= *ping_at {
                        outbox.push_ping();
                        *ping_at = now + ping_interval;
                    }
                }
            }
        }
    }

    fn expiry_deadline(&self) -> Instant {
        let Some(p) = &self.principal else {
            return Instant::now() + Duration::from_secs(3600);
        };
        let now = jsonwebtoken::get_current_timestamp();
        // Capped: a far-future `exp` must not overflow the clock.
        let left = p.exp.saturating_sub(now).min(10 * 365 * 24 * 3600);
        Instant::now() + Duration::from_secs(left)
    }

    /// Takes a token for one client frame. Without one: `rate_limited`, and after
    /// `rate_limit_strikes` refusals with no quiet 10 s between them, close 4008.
    fn admit_frame(&mut self) -> bool {
        if self.bucket.take() {
            return true;
        }
        if self.last_strike.elapsed() > Duration::from_secs(10) {
            self.strikes = 0;
        }
        self.last_strike = std::time::Instant::now();
        self.strikes += 1;
        if self.strikes > self.shared.settings.limits.rate_limit_strikes {
            tracing::info!(session = self.id, "client kept flooding; closing with 4008");
            self.control.close(CloseCode::RateLimited);
        } else {
            self.error(None, ErrorCode::RateLimited, "too many frames; slow down");
        }
        false
    }

    async fn on_message(&mut self, bytes: &[u8], binary: bool) {
        let codec = if binary { Codec::MsgPack } else { Codec::Json };
        let DecodedFrame { id, frame } = match codec.decode_client(bytes) {
            Ok(f) => f,
            Err(_) if self.principal.is_none() => {
                metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => "missing").increment(1);
                self.control.close_raw(
                    CloseCode::Unauthorized.code(),
                    "authenticate first: send {\"type\":\"auth\",\"token\":…}".into(),
                );
                return;
            }
            Err(e) => {
                self.error(e.id.as_ref(), ErrorCode::BadRequest, &e.message);
                return;
            }
        };
        metrics::counter!(m::CLIENT_FRAMES_TOTAL, "type" => frame.kind()).increment(1);
        let id = id.as_ref();
        if self.principal.is_none() {
            match frame {
                ClientFrame::Auth { token } => self.authenticate(&token, id),
                _ => {
                    metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => "missing").increment(1);
                    self.control.close_raw(
                        CloseCode::Unauthorized.code(),
                        "authenticate first: send {\"type\":\"auth\",\"token\":…}".into(),
                    );
                }
            }
            return;
        }
        match frame {
            ClientFrame::Auth { .. } => self.error(
                id,
                ErrorCode::BadRequest,
                "already authenticated; use `refresh` to replace the token",
            ),
            ClientFrame::Subscribe {
                channel,
                token,
                since,
                last,
            } => {
                self.subscribe(id, &channel, token.as_deref(), since.as_ref(), last)
                    .await
            }
            ClientFrame::Unsubscribe { channel } => self.unsubscribe(id, &channel),
            ClientFrame::Publish {
                channel,
                data,
                event,
            } => self.publish(id, &channel, &data, event.as_deref()).await,
            ClientFrame::Ping => self.send(&ServerFrame::Pong { id }),
            ClientFrame::Refresh { token } => self.refresh(id, &token),
            ClientFrame::Presence { channel } => self.presence(id, &channel).await,
        }
    }

    /// Verifies a connection token; on success sends `connected`, else closes with
    /// 4001 / 4004.
    fn authenticate(&mut self, token: &str, _id: Option<&FrameId>) {
        match self.shared.settings.auth.verify_connection(token) {
            Ok(principal) => {
                // From the pending budget to a connection slot.
                let admitted = match self.admission.as_mut() {
                    Some(a) => a.connect(&principal.user),
                    None => Err(Refusal {
                        code: CloseCode::TryLater,
                        reason: "the node is full; try later",
                    }),
                };
                match admitted {
                    Ok(()) => self.authenticated(principal),
                    Err(r) => self.control.close_raw(r.code.code(), r.reason.into()),
                }
            }
            Err(error) => self.refuse_token(&error),
        }
    }

    /// The connection is `principal`'s (and admitted as such): `connected`.
    fn authenticated(&mut self, principal: Principal) {
        tracing::debug!(session = self.id, user = %principal.user, "authenticated");
        self.shared.register(self.id, principal.user.clone());
        self.principal = Some(principal);
        let p = self.principal.as_ref().expect("just set");
        let frame = ServerFrame::Connected {
            client: &self.client.to_string(),
            node: &self.shared.settings.node_id,
            user: &p.user,
            ping_interval: self.shared.settings.limits.ping_interval_secs,
        };
        self.push(self.codec.encode(&frame));
    }

    fn refuse_token(&self, error: &AuthError) {
        metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => error.label()).increment(1);
        tracing::info!(
            session = self.id,
            reason = error.label(),
            "connection token refused"
        );
        self.control
            .close_raw(error.close_code().code(), error.to_string());
    }

    async fn subscribe(
        &mut self,
        id: Option<&FrameId>,
        name: &str,
        token: Option<&str>,
        since: Option<&Since>,
        last: Option<u32>,
    ) {
        let shared = self.shared.clone();
        let principal = self.principal.as_ref().expect("authenticated");
        let channel = match shared.settings.namespaces.parse(name) {
            Ok(c) => c,
            Err(r) => return self.error(id, r.code, &r.message),
        };
        if since.is_some() && last.is_some() {
            return self.error(
                id,
                ErrorCode::BadRequest,
                "`since` and `last` cannot be combined",
            );
        }
        if last.is_some_and(|n| n > MAX_HISTORY_READ) {
            return self.error(
                id,
                ErrorCode::BadRequest,
                &format!("`last` is at most {MAX_HISTORY_READ}"),
            );
        }
        // Subscriptions the hub ended (a finished job) are gone from the hub already.
        let (client, id_) = (self.client.to_string(), self.id);
        self.channels.0.retain(|s| {
            let live = shared.hub.contains(&s.channel, id_);
            if !live {
                shared.presence.leave(&s.channel, &client);
            }
            live
        });
        if self.channels.contains(name) {
            return self.error(
                id,
                ErrorCode::BadRequest,
                &format!("already subscribed to {name}"),
            );
        }
        if self.channels.len() >= shared.settings.limits.max_subscriptions {
            return self.error(
                id,
                ErrorCode::LimitExceeded,
                &format!(
                    "at most {} subscriptions per connection",
                    shared.settings.limits.max_subscriptions
                ),
            );
        }
        let (grant, token_exp) = match token {
            None => (Grant::None, 0),
            Some(t) => match shared.settings.auth.verify_subscription(t, principal, name) {
                Ok(exp) => (Grant::SubscriptionToken, exp),
                Err(e) => {
                    metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => e.label()).increment(1);
                    return self.error(
                        id,
                        e.error_code(),
                        &format!("subscription token refused: {e}"),
                    );
                }
            },
        };
        if let Err(r) = shared
            .settings
            .namespaces
            .check_subscribe(principal, &channel, grant)
        {
            return self.error(id, r.code, &r.message);
        }
        if !shared.broker.is_ready() {
            return self.error(
                id,
                ErrorCode::Unavailable,
                "the broker is unavailable; retry shortly",
            );
        }
        let namespace = shared.settings.namespaces.for_channel(&channel);
        let conflate = namespace.conflate;
        let (presence, join_leave) = (namespace.presence, namespace.join_leave);
        // A channel nothing was published to yet still gets a position.
        let start = Some(namespace.history.ttl);
        let user = principal.user.clone();
        // A job's latest state comes at once, unless the client asked for something else.
        let query = match (since, last) {
            (Some(s), _) => HistoryQuery::After(s.offset),
            (None, Some(n)) => HistoryQuery::Last(n),
            (None, None) if channel.namespace() == "job_progress" => HistoryQuery::Last(1),
            (None, None) => HistoryQuery::Last(0),
        };
        let channel: Arc<str> = Arc::from(name);
        // Undoes the broker reference and the hub's join on every way out short of a
        // live subscription: an error, the deadline, a panic, the connection closing.
        let mut setup = Setup::new(&shared.hub, &shared.subscriptions, channel.clone(), self.id);
        let subscriber = Subscriber::new(self.id, self.codec, self.outbox.clone(), conflate);
        let deadline = shared.settings.limits.subscribe_timeout();
        let joined = tokio::time::timeout(deadline, async {
            shared
                .subscriptions
                .acquire(channel.clone())
                .await
                .map_err(|e| e.to_string())?;
            setup.acquired = true;
            // Joined before history is read: live messages that arrive meanwhile wait in
            // the hub, and the join sends each message once, in order.
            shared.hub.join(channel.clone(), subscriber);
            setup.joined = true;
            // A read older than what the node already dispatched is read again (see
            // `Joined::Stale`).
            let mut attempt = 0;
            loop {
                let history = shared
                    .broker
                    .history(name, query, start)
                    .await
                    .map_err(|e| format!("history read: {e}"))?;
                match shared.hub.complete_join(
                    &channel,
                    self.id,
                    Join {
                        id,
                        since,
                        send_entries: !matches!(query, HistoryQuery::Last(0)),
                        history,
                        attempt,
                    },
                ) {
                    Joined::Stale => attempt += 1,
                    joined => return Ok::<Joined, String>(joined),
                }
            }
        })
        .await;
        let joined = match joined {
            Ok(Ok(joined)) => joined,
            Ok(Err(error)) => {
                tracing::warn!(session = self.id, %channel, %error, "subscribe failed at the broker");
                return self.error(
                    id,
                    ErrorCode::Unavailable,
                    "the broker is unavailable; retry shortly",
                );
            }
            Err(_) => {
                metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "subscribe_deadline")
                    .increment(1);
                tracing::warn!(session = self.id, %channel, deadline_secs = deadline.as_secs(), "subscribe passed its deadline");
                return self.error(
                    id,
                    ErrorCode::Unavailable,
                    &format!(
                        "the broker did not answer within {} s; retry shortly",
                        deadline.as_secs()
                    ),
                );
            }
        };
        if matches!(joined, Joined::Live { .. }) {
            setup.keep();
        }
        match joined {
            Joined::Live { .. } => {
                if presence {
                    let info = serde_json::json!({
                        "client": self.client.to_string(),
                        "user": &*user,
                        "node": shared.settings.node_id,
                    })
                    .to_string();
                    shared.presence.join(
                        channel.clone(),
                        &self.client.to_string(),
                        info,
                        join_leave,
                    );
                }
                self.channels.insert(channel, token_exp);
            }
            // The reference is given back by `setup`.
            Joined::Ended => metrics::counter!(m::JOBS_COMPLETED_TOTAL).increment(1),
            Joined::Gone | Joined::Stale => {}
        }
    }

    fn unsubscribe(&mut self, id: Option<&FrameId>, name: &str) {
        let removed = self.channels.remove(name);
        if let Some(channel) = &removed {
            // Also when the hub ended the subscription already (a finished job).
            self.shared
                .presence
                .leave(channel, &self.client.to_string());
        }
        match removed {
            Some(channel) if self.shared.hub.remove(&channel, self.id) => {
                // Nothing of it may follow the `unsubscribed` reply.
                self.outbox.forget(&channel);
                self.shared.subscriptions.release(channel);
                self.send(&ServerFrame::Unsubscribed {
                    id,
                    channel: name,
                    reason: "client",
                });
            }
            // Never subscribed, or the subscription already ended (a finished job).
            _ => self.error(
                id,
                ErrorCode::BadRequest,
                &format!("not subscribed to {name}"),
            ),
        }
    }

    async fn publish(
        &mut self,
        id: Option<&FrameId>,
        name: &str,
        data: &serde_json::Value,
        event: Option<&str>,
    ) {
        let shared = self.shared.clone();
        let principal = self.principal.as_ref().expect("authenticated");
        let channel = match shared.settings.namespaces.parse(name) {
            Ok(c) => c,
            Err(r) => return self.error(id, r.code, &r.message),
        };
        if let Err(r) = shared.settings.namespaces.check_publish(
            principal,
            &channel,
            self.channels.contains(name),
        ) {
            return self.error(id, r.code, &r.message);
        }
        let history = shared.settings.namespaces.for_channel(&channel).history;
        if !shared.broker.is_ready() {
            return self.error(
                id,
                ErrorCode::Unavailable,
                "the broker is unavailable; nothing was published",
            );
        }
        let raw: Box<RawValue> = serde_json::value::to_raw_value(data).expect("a Value serializes");
        match shared.broker.publish(name, event, &raw, history).await {
            Ok(ack) => {
                metrics::counter!(m::PUBLISHES_TOTAL, "source" => "client").increment(1);
                let mut extra = serde_json::Map::new();
                extra.insert("offset".into(), ack.offset.into());
                extra.insert("epoch".into(), ack.epoch.into());
                self.send(&ServerFrame::Reply {
                    id,
                    extra: Some(&extra),
                });
            }
            Err(BrokerError::Invalid(message)) => self.error(id, ErrorCode::BadRequest, &message),
            Err(error) => {
                // Broker details (hosts, errors) stay in the log.
                tracing::warn!(session = self.id, %error, "client publish failed");
                self.error(
                    id,
                    ErrorCode::Unavailable,
                    "the broker is unavailable; retry shortly",
                )
            }
        }
    }

    /// `presence {channel}`: who is subscribed, on every node. Allowed to subscribers
    /// of the channel and to whoever may subscribe to it.
    async fn presence(&mut self, id: Option<&FrameId>, name: &str) {
        let shared = self.shared.clone();
        let principal = self.principal.as_ref().expect("authenticated");
        let channel = match shared.settings.namespaces.parse(name) {
            Ok(c) => c,
            Err(r) => return self.error(id, r.code, &r.message),
        };
        if !shared.settings.namespaces.for_channel(&channel).presence {
            return self.error(
                id,
                ErrorCode::BadRequest,
                &format!(
                    "presence is not enabled for namespace `{}`",
                    channel.namespace()
                ),
            );
        }
        if !self.channels.contains(name) {
            if let Err(r) =
                shared
                    .settings
                    .namespaces
                    .check_subscribe(principal, &channel, Grant::None)
            {
                return self.error(id, r.code, &r.message);
            }
        }
        match shared.presence.list(name).await {
            Ok(clients) => self.send(&ServerFrame::Presence {
                id,
                channel: name,
                clients: &clients,
            }),
            Err(error) => {
                tracing::warn!(session = self.id, %error, "presence read failed");
                self.error(
                    id,
                    ErrorCode::Unavailable,
                    "the broker is unavailable; retry shortly",
                )
            }
        }
    }

    fn refresh(&mut self, id: Option<&FrameId>, token: &str) {
        match self.shared.settings.auth.verify_connection(token) {
            Ok(p) if Some(&p.user) != self.principal.as_ref().map(|q| &q.user) => self.error(
                id,
                ErrorCode::Forbidden,
                "the new token is for another user",
            ),
            Ok(p) => {
                self.principal = Some(p);
                self.narrow_to_principal();
                self.send(&ServerFrame::Reply { id, extra: None });
            }
            Err(e) => {
                metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => e.label()).increment(1);
                self.error(
                    id,
                    ErrorCode::Unauthorized,
                    &format!("refresh token refused: {e}"),
                )
            }
        }
    }

    /// After a `refresh`: every subscription the new token no longer grants ends with
    /// `unsubscribed {reason:"forbidden"}` (one granted by a subscription token stays
    /// until that token expires).
    fn narrow_to_principal(&mut self) {
        let principal = self.principal.as_ref().expect("authenticated");
        let namespaces = &self.shared.settings.namespaces;
        let now = jsonwebtoken::get_current_timestamp();
        let mut ended = Vec::new();
        self.channels.0.retain(|s| {
            if s.token_exp > now {
                return true;
            }
            let granted = namespaces.parse(&s.channel).is_ok_and(|c| {
                namespaces
                    .check_subscribe(principal, &c, Grant::None)
                    .is_ok()
            });
            if !granted {
                ended.push(s.channel.clone());
            }
            granted
        });
        for channel in ended {
            self.shared
                .presence
                .leave(&channel, &self.client.to_string());
            // A subscription the hub already ended (a finished job) got its
            // `unsubscribed` then: nothing more is said of it.
            if !self.shared.hub.remove(&channel, self.id) {
                continue;
            }
            tracing::info!(session = self.id, %channel, "refresh no longer grants the channel; unsubscribed");
            metrics::counter!(m::SUBSCRIPTIONS_REVOKED_TOTAL).increment(1);
            // Nothing of it may follow the `unsubscribed` frame.
            self.outbox.forget(&channel);
            self.shared.subscriptions.release(channel.clone());
            self.send(&ServerFrame::Unsubscribed {
                id: None,
                channel: &channel,
                reason: "forbidden",
            });
        }
    }

    fn send(&self, frame: &ServerFrame<'_>) {
        self.push(self.codec.encode(frame));
    }

    fn push(&self, bytes: Bytes) {
        self.outbox.push(bytes);
    }

    fn error(&self, id: Option<&FrameId>, code: ErrorCode, message: &str) {
        metrics::counter!(m::CLIENT_ERRORS_TOTAL, "code" => code.as_str()).increment(1);
        self.send(&ServerFrame::Error { id, code, message });
    }

    fn cleanup(&mut self) {
        for channel in std::mem::take(&mut self.channels.0)
            .into_iter()
            .map(|s| s.channel)
        {
            self.shared
                .presence
                .leave(&channel, &self.client.to_string());
            if self.shared.hub.remove(&channel, self.id) {
                self.shared.subscriptions.release(channel);
            }
        }
        if self.principal.is_some() {
            self.shared.unregister(self.id);
        }
        // Make sure the writer ends even if the reader ended on its own.
        self.control.abort();
    }
}

/// Writes the connection's frames until it ends; returns whether a close frame went
/// out (then the client's answer is worth waiting for).
#[allow(clippy::manual_async_fn)]
fn write_loop(
    mut out: Output,
    mut outbox: Inbox,
    control: Arc<Control>,
    codec: Codec,
    stall: Duration,
) -> impl Future<Output = bool> + Send {
    // Whole seconds, in a word: every connection's writer carries it.
    let stall_secs = stall.as_secs();
    // A block, not an `async fn`: see `run`.
    async move {
        loop {
            // A close asked for with a code is seen here even while frames keep coming
            // (the wait below sees it only when there is nothing to write).
            if control.close_frame().is_some() {
                break;
            }
            // Written at once (one writev); waited for only if the socket pushed back.
            // (Pings come through the outbox, ahead of queued frames.)
            let written: std::io::Result<()> = tokio::select! {
                biased;
                next = outbox.next() => {
                    let Some(first) = next else { return false };
                    burst_now(&mut out, &mut outbox, first, codec)
                }
                _ = control.cancelled(Side::Writer) => break,
            };
            let result = match written {
                // Boxed: only a connection whose socket is full carries this state.
                Ok(()) if !out.is_flushed() => {
                    let stall = Duration::from_secs(stall_secs);
                    Box::pin(flush_guarded(&mut out, &control, stall)).await
                }
                other => other,
            };
            match result {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut && !control.is_cancelled() => {
                    // The client has read nothing for as long as a silent client is given:
                    // a slow consumer, told so (the close frame waits behind what is stuck,
                    // and the socket goes if it cannot be sent either).
                    outbox.stalled();
                }
                Err(_) => {
                    control.abort();
                    return false;
                }
            }
        }
        // (The node's shutdown closes every session with 1001, authenticated or not.)
        let Some((code, reason)) = control.close_frame().cloned() else {
            return false;
        };
        {
            // Boxed, timer and all: only a closing connection carries this state.
            let sent = Box::pin(tokio::time::timeout(CLOSE_GRACE, async {
                // What is already queued (replies, messages) goes out before the close
                // frame; not for a slow consumer, whose queue is the problem.
                if code != CloseCode::SlowConsumer.code() {
                    while let Some(first) = outbox.try_next() {
                        burst_now(&mut out, &mut outbox, first, codec)?;
                        out.flush().await?;
                    }
                }
                let mut payload = code.to_be_bytes().to_vec();
                payload.extend_from_slice(reason.as_bytes());
                out.send(OpCode::Close, &payload).await?;
                out.shutdown_write();
                Ok::<(), std::io::Error>(())
            }))
            .await;
            matches!(sent, Ok(Ok(())))
        }
    }
}

/// Waits until the socket has taken what was written, while the client keeps taking
/// bytes: `TimedOut` once it has taken nothing for `stall` (a slow but steady reader is
/// never cut off, however long the flush). If the connection is closed meanwhile (a
/// write stuck on a client that does not read), the write gets [`CLOSE_GRACE`] to
/// finish — then the loop sends the close frame — or the connection is dropped. So the
/// writer can never hang.
async fn flush_guarded(
    out: &mut Output,
    control: &Control,
    stall: Duration,
) -> std::io::Result<()> {
    let mut watch = Stall::new(out.progress(), stall);
    loop {
        let tick = tokio::select! {
            // The write first: the token is checked only while it waits.
            biased;
            r = tokio::time::timeout(watch.tick(), out.flush()) => r,
            _ = control.cancelled(Side::Writer) => return within(CLOSE_GRACE, out.flush()).await,
        };
        match tick {
            Ok(r) => return r,
            Err(_) if watch.stalled(out.progress(), std::time::Instant::now()) => {
                return Err(std::io::ErrorKind::TimedOut.into())
            }
            // Still taking bytes (or not for long yet): keep waiting.
            Err(_) => {}
        }
    }
}

/// Whether a client has taken nothing for a while: progress is sampled every quarter
/// of the limit, and the limit counts from the last sample that moved.
struct Stall {
    limit: Duration,
    mark: u64,
    since: std::time::Instant,
}

impl Stall {
    fn new(progress: u64, limit: Duration) -> Stall {
        Stall {
            limit,
            mark: progress,
            since: std::time::Instant::now(),
        }
    }

    fn tick(&self) -> Duration {
        (self.limit / 4).max(Duration::from_millis(50))
    }

    /// Takes a sample at `now`; true once nothing moved for the whole limit.
    fn stalled(&mut self, progress: u64, now: std::time::Instant) -> bool {
        if progress != self.mark {
            self.mark = progress;
            self.since = now;
            return false;
        }
        now.duration_since(self.since) >= self.limit
    }
}

/// Runs `io` for at most `limit` (then `TimedOut`).
async fn within(
    limit: Duration,
    io: impl Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    tokio::time::timeout(limit, io)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Writes `first` and whatever else is already queued (up to [`wire::BURST`] frames)
/// with one `writev`, without waiting: what the socket does not take waits in the
/// output's buffer. The frames are gathered on the stack, so that an idle
/// connection's task carries none of them.
fn burst_now(
    out: &mut Output,
    outbox: &mut Inbox,
    first: Outgoing,
    codec: Codec,
) -> std::io::Result<()> {
    let data = if codec.is_binary() {
        OpCode::Binary
    } else {
        OpCode::Text
    };
    let mut frames: [Option<Outgoing>; wire::BURST] = [const { None }; wire::BURST];
    frames[0] = Some(first);
    let mut n = 1;
    while n < wire::BURST {
        match outbox.try_next() {
            Some(next) => {
                frames[n] = Some(next);
                n += 1;
            }
            None => break,
        }
    }
    let outs: [Out<'_>; wire::BURST] = std::array::from_fn(|i| match &frames[i] {
        Some(o) => Out {
            opcode: match o.kind {
                Kind::Data => data,
                Kind::Pong => OpCode::Pong,
                Kind::Ping => OpCode::Ping,
            },
            payload: &o.frame,
        },
        None => Out {
            opcode: data,
            payload: &[],
        },
    });
    out.write(&outs[..n])
}

/// Client frames per second with a burst allowance.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: std::time::Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Setup, Stall, TokenBucket};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn a_panic_during_a_subscribe_leaves_no_join_and_no_broker_reference() {
        use crate::control::Control;
        use crate::hub::{Hub, Subscriber};
        use crate::outbox::{Outbox, QueueLimits};
        use crate::subscriptions::{Command, Subscriptions};
        let hub = Hub::new(4);
        let (subscriptions, mut commands) = Subscriptions::channel();
        let limits = QueueLimits {
            messages: 8,
            bytes: 1 << 20,
            replay_messages: 8,
            replay_bytes: 1 << 20,
        };
        let (outbox, _inbox) = Outbox::new(limits, Arc::new(Control::new()));
        let channel: Arc<str> = Arc::from("user:1");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut setup = Setup::new(&hub, &subscriptions, channel.clone(), 7);
            setup.acquired = true;
            hub.join(
                channel.clone(),
                Subscriber::new(7, fanout_protocol::Codec::Json, outbox.clone(), false),
            );
            setup.joined = true;
            panic!("a bug while reading history");
        }));
        assert!(panicked.is_err());
        assert!(!hub.contains("user:1", 7), "the join was undone");
        assert_eq!((hub.subscriptions(), hub.channels()), (0, 0));
        match commands.try_recv() {
            Ok(Command::Release(c)) => assert_eq!(&*c, "user:1"),
            _ => panic!("the broker reference was not released"),
        }
        // A kept (live) subscription is left alone.
        let mut setup = Setup::new(&hub, &subscriptions, channel.clone(), 8);
        setup.acquired = true;
        setup.joined = true;
        hub.join(
            channel.clone(),
            Subscriber::new(8, fanout_protocol::Codec::Json, outbox, false),
        );
        setup.keep();
        assert!(hub.contains("user:1", 8));
        assert!(commands.try_recv().is_err());
    }

    #[test]
    fn a_stall_is_counted_from_the_last_progress() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = Stall::new(100, s(8));
        assert_eq!(w.tick(), s(2));
        // Slow but steady: never stalled, however long it takes in all.
        for i in 1..=20u64 {
            assert!(!w.stalled(100 + i, t0 + s(2 * i)));
        }
        // Then nothing: stalled once a whole limit passed since the last move.
        assert!(!w.stalled(120, t0 + s(42)));
        assert!(!w.stalled(120, t0 + s(47)));
        assert!(w.stalled(120, t0 + s(48)));
    }

    #[test]
    fn bucket_allows_burst_then_refuses() {
        let mut b = TokenBucket::new(1, 3);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
    }
}
