//! One client's session, whatever carries its bytes: authentication, the commands
//! (subscribe / unsubscribe / publish / ping / refresh / presence), its subscriptions,
//! rate limits, timers (authentication due, token expiry, the node's pings) and its
//! bounded outbox. A transport ([`crate::transport`]) feeds it client messages and
//! drains its outbox; the session never touches a socket, and never blocks the hub:
//! the hub only ever pushes into its outbox.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanout_protocol::{
    ClientFrame, CloseCode, Codec, DecodedFrame, ErrorCode, FrameId, ServerFrame, Since,
};
use serde_json::value::RawValue;
use tokio::time::{sleep_until, Instant};

use crate::auth::{AuthError, Principal};
use crate::broker::{HistoryQuery, MAX_HISTORY_READ};
use crate::control::{Control, Side};
use crate::hub::{Attach, Attached, SessionId, Subscriber};
use crate::metrics as m;
use crate::outbox::{Outbox, OutboxReader};
use crate::ratelimit::TokenBucket;
use crate::rules::Grant;
use crate::shared::{Admission, Refusal, Shared};

pub(crate) struct Session {
    pub id: SessionId,
    client: ClientId,
    pub shared: Arc<Shared>,
    codec: Codec,
    pub outbox: Outbox,
    pub control: Arc<Control>,
    pub principal: Option<Principal>,
    channels: Channels,
    bucket: TokenBucket,
    strikes: u32,
    last_strike: std::time::Instant,
    /// The client ended the connection (a WebSocket close frame).
    pub client_closed: bool,
    /// Its place in the node's limits, held until the connection ends (`None`: refused).
    admission: Option<Admission>,
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
/// what it took — the hub's attach and the broker reference — so that no exit path (an
/// error, the subscribe deadline, a panic while handling the frame, the connection
/// closing meanwhile) can leave an attacher whose waiting list grows with every message,
/// or a broker subscription nobody releases.
struct Setup<'a> {
    hub: &'a crate::hub::Hub,
    upstream: &'a crate::upstream::Upstream,
    channel: Arc<str>,
    session: SessionId,
    /// The broker reference is held.
    acquired: bool,
    /// The session attached the channel in the hub.
    attached: bool,
}

impl<'a> Setup<'a> {
    fn new(
        hub: &'a crate::hub::Hub,
        upstream: &'a crate::upstream::Upstream,
        channel: Arc<str>,
        session: SessionId,
    ) -> Setup<'a> {
        Setup {
            hub,
            upstream,
            channel,
            session,
            acquired: false,
            attached: false,
        }
    }

    /// The subscription is live: the session owns it now.
    fn keep(mut self) {
        self.acquired = false;
        self.attached = false;
    }
}

impl Drop for Setup<'_> {
    fn drop(&mut self) {
        if self.attached {
            // (Already gone from the hub if the attach ended it: a finished job.)
            self.hub.remove(&self.channel, self.session);
        }
        if self.acquired {
            self.upstream.release(self.channel.clone());
        }
    }
}

/// What a connection waits for besides the client's next frame.
#[derive(Clone, Copy)]
pub(crate) enum Due {
    /// The first frame must authenticate by then.
    Auth(Instant),
    /// The token expires then.
    Expiry(Instant),
}

impl Due {
    pub(crate) fn at(self) -> Instant {
        match self {
            Due::Auth(at) | Due::Expiry(at) => at,
        }
    }

    /// Closes the connection if this is due at `now` (no `auth` in time: 4001; the
    /// token expired: 4004); returns whether it did.
    pub(crate) fn passed(self, now: Instant, control: &Control) -> bool {
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
    /// Opens a session on this node: registered (so that drain, shutdown and admin
    /// disconnects reach it), with its bounded outbox. The transport drains the
    /// returned [`OutboxReader`].
    pub(crate) fn open(
        shared: Arc<Shared>,
        codec: Codec,
        admission: Option<Admission>,
    ) -> (Session, OutboxReader) {
        let control = Arc::new(Control::new());
        let id = shared.open_session(control.clone());
        let (outbox, inbox) = Outbox::new(shared.settings.limits.queue(), control.clone());
        metrics::counter!(m::CONNECTIONS_TOTAL).increment(1);
        let limits = &shared.settings.limits;
        let bucket = TokenBucket::new(limits.messages_per_second, limits.message_burst);
        let session = Session {
            id,
            client: ClientId(rand::random()),
            shared,
            codec,
            outbox,
            control,
            principal: None,
            channels: Channels::default(),
            bucket,
            strikes: 0,
            last_strike: std::time::Instant::now(),
            client_closed: false,
            admission,
        };
        (session, inbox)
    }

    /// What the node waits for on this session now: authentication by `auth_deadline`
    /// until authenticated, then the token's expiry.
    pub(crate) fn due(&self, auth_deadline: Instant) -> Due {
        if self.principal.is_some() {
            Due::Expiry(self.expiry_deadline())
        } else {
            Due::Auth(auth_deadline)
        }
    }

    /// The session is over: it leaves the registry, and its close is counted (by
    /// code: `client` when the client closed it, `none` when the connection just
    /// went).
    pub(crate) fn close(self) {
        let shared = &self.shared;
        // Label by known codes only: a client's own close code must not mint new series.
        let code = match self.control.close_frame().map(|(c, _)| *c) {
            _ if self.client_closed => "client".to_string(),
            None if shared.shutdown.is_cancelled() => "1001".to_string(),
            None => "none".to_string(),
            Some(c) if c == 1000 || CloseCode::from_u16(c).is_some() => c.to_string(),
            Some(_) => "other".to_string(),
        };
        shared.close_session(self.id);
        metrics::counter!(m::DISCONNECTS_TOTAL, "code" => code.clone()).increment(1);
        tracing::debug!(session = self.id, %code, "connection closed");
    }

    /// Handles one client message while the connection's timers keep running: a frame
    /// that waits on the broker (a subscribe) does not stop pings, token expiry or a
    /// close from elsewhere. (The client's silence is not judged meanwhile: its frames
    /// are not being read.) Cancelled, the handling is dropped, and a half-made
    /// subscription undoes itself.
    pub(crate) async fn handle(
        &mut self,
        bytes: &[u8],
        binary: bool,
        due: Due,
        ping_at: &mut Instant,
    ) {
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

    pub(crate) fn expiry_deadline(&self) -> Instant {
        let Some(p) = &self.principal else {
            return Instant::now() + Duration::from_secs(3600);
        };
        // The verifier accepts a token through the whole second `exp + leeway`: the
        // session ends when that second is over, not before (a token the node accepts
        // is never one it closes at once).
        let end_ms = p
            .exp
            .saturating_add(crate::auth::LEEWAY_SECS + 1)
            .saturating_mul(1000);
        // Capped: a far-future `exp` must not overflow the clock.
        let left = end_ms
            .saturating_sub(fanout_protocol::now_ms())
            .min(10 * 365 * 24 * 3600 * 1000);
        Instant::now() + Duration::from_millis(left)
    }

    /// Takes a token for one client frame. Without one: `rate_limited`, and after
    /// `rate_limit_strikes` refusals with no quiet 10 s between them, close 4008.
    pub(crate) fn admit_frame(&mut self) -> bool {
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
                // (A refusal went to the client as an `error` frame.)
                let _ = self
                    .subscribe(id, &channel, token.as_deref(), since.as_ref(), last)
                    .await;
            }
            ClientFrame::Unsubscribe { channel } => self.unsubscribe(id, &channel),
            ClientFrame::Publish {
                channel,
                data,
                event,
                idempotency_key,
            } => {
                self.publish(id, &channel, &data, event.as_deref(), idempotency_key)
                    .await
            }
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
    pub(crate) fn authenticated(&mut self, principal: Principal) {
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

    pub(crate) fn refuse_token(&self, error: &AuthError) {
        metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => error.label()).increment(1);
        tracing::info!(
            session = self.id,
            reason = error.label(),
            "connection token refused"
        );
        self.control
            .close_raw(error.close_code().code(), error.to_string());
    }

    pub(crate) async fn subscribe(
        &mut self,
        id: Option<&FrameId>,
        name: &str,
        token: Option<&str>,
        since: Option<&Since>,
        last: Option<u32>,
    ) -> Result<(), ErrorCode> {
        let shared = self.shared.clone();
        let principal = self.principal.as_ref().expect("authenticated");
        let channel = match shared.settings.namespaces.parse(name) {
            Ok(c) => c,
            Err(r) => return self.fail(id, r.code, &r.message),
        };
        if since.is_some() && last.is_some() {
            return self.fail(
                id,
                ErrorCode::BadRequest,
                "`since` and `last` cannot be combined",
            );
        }
        if last.is_some_and(|n| n > MAX_HISTORY_READ) {
            return self.fail(
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
            return self.fail(
                id,
                ErrorCode::BadRequest,
                &format!("already subscribed to {name}"),
            );
        }
        if self.channels.len() >= shared.settings.limits.max_subscriptions {
            return self.fail(
                id,
                ErrorCode::LimitExceeded,
                &format!(
                    "at most {} upstream per connection",
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
                    return self.fail(
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
            return self.fail(id, r.code, &r.message);
        }
        if !shared.broker.is_ready() {
            return self.fail(
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
        // Undoes the broker reference and the hub's attach on every way out short of a
        // live subscription: an error, the deadline, a panic, the connection closing.
        let mut setup = Setup::new(&shared.hub, &shared.upstream, channel.clone(), self.id);
        let subscriber = Subscriber::new(self.id, self.codec, self.outbox.clone(), conflate);
        let deadline = shared.settings.limits.subscribe_timeout();
        let attached = tokio::time::timeout(deadline, async {
            shared
                .upstream
                .acquire(channel.clone())
                .await
                .map_err(|e| e.to_string())?;
            setup.acquired = true;
            // Attached before history is read: live messages that arrive meanwhile wait in
            // the hub, and the attach sends each message once, in order.
            shared.hub.attach(channel.clone(), subscriber);
            setup.attached = true;
            // A read older than what the node already dispatched is read again (see
            // `Attached::Stale`).
            let mut attempt = 0;
            loop {
                let history = shared
                    .broker
                    .history(name, query, start)
                    .await
                    .map_err(|e| format!("history read: {e}"))?;
                match shared.hub.complete_attach(
                    &channel,
                    self.id,
                    Attach {
                        id,
                        since,
                        send_entries: !matches!(query, HistoryQuery::Last(0)),
                        history,
                        attempt,
                    },
                ) {
                    Attached::Stale => attempt += 1,
                    attached => return Ok::<Attached, String>(attached),
                }
            }
        })
        .await;
        let attached = match attached {
            Ok(Ok(attached)) => attached,
            Ok(Err(error)) => {
                tracing::warn!(session = self.id, %channel, %error, "subscribe failed at the broker");
                return self.fail(
                    id,
                    ErrorCode::Unavailable,
                    "the broker is unavailable; retry shortly",
                );
            }
            Err(_) => {
                metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "subscribe_deadline")
                    .increment(1);
                tracing::warn!(session = self.id, %channel, deadline_secs = deadline.as_secs(), "subscribe passed its deadline");
                return self.fail(
                    id,
                    ErrorCode::Unavailable,
                    &format!(
                        "the broker did not answer within {} s; retry shortly",
                        deadline.as_secs()
                    ),
                );
            }
        };
        if matches!(attached, Attached::Live { .. }) {
            setup.keep();
        }
        match attached {
            Attached::Live { .. } => {
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
            Attached::Ended => metrics::counter!(m::JOBS_COMPLETED_TOTAL).increment(1),
            Attached::Gone | Attached::Stale => {}
        }
        Ok(())
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
                self.shared.upstream.release(channel);
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
        key: Option<String>,
    ) {
        let shared = self.shared.clone();
        let principal = self.principal.as_ref().expect("authenticated");
        let raw: Box<RawValue> = serde_json::value::to_raw_value(data).expect("a Value serializes");
        let request = crate::commands::Publish {
            channel: name,
            data: &raw,
            event,
            key: key.as_deref(),
        };
        let subscribed = self.channels.contains(name);
        match crate::commands::publish(&shared, principal, request, subscribed).await {
            Ok(ack) => {
                let mut extra = serde_json::Map::new();
                extra.insert("offset".into(), ack.offset.into());
                extra.insert("epoch".into(), ack.epoch.into());
                if ack.duplicate {
                    extra.insert("duplicate".into(), true.into());
                }
                self.send(&ServerFrame::Reply {
                    id,
                    extra: Some(&extra),
                });
            }
            Err(r) => self.error(id, r.code, &r.message),
        }
    }

    /// `presence {channel}`: who is subscribed, on every node.
    async fn presence(&mut self, id: Option<&FrameId>, name: &str) {
        let shared = self.shared.clone();
        let principal = self.principal.as_ref().expect("authenticated");
        let subscribed = self.channels.contains(name);
        match crate::commands::presence(&shared, principal, name, subscribed).await {
            Ok(clients) => self.send(&ServerFrame::Presence {
                id,
                channel: name,
                clients: &clients,
            }),
            Err(r) => self.error(id, r.code, &r.message),
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
            self.shared.upstream.release(channel.clone());
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

    /// [`Session::error`], for a command that reports how it went.
    fn fail(&self, id: Option<&FrameId>, code: ErrorCode, message: &str) -> Result<(), ErrorCode> {
        self.error(id, code, message);
        Err(code)
    }

    fn error(&self, id: Option<&FrameId>, code: ErrorCode, message: &str) {
        metrics::counter!(m::CLIENT_ERRORS_TOTAL, "code" => code.as_str()).increment(1);
        self.send(&ServerFrame::Error { id, code, message });
    }

    pub(crate) fn cleanup(&mut self) {
        for channel in std::mem::take(&mut self.channels.0)
            .into_iter()
            .map(|s| s.channel)
        {
            self.shared
                .presence
                .leave(&channel, &self.client.to_string());
            if self.shared.hub.remove(&channel, self.id) {
                self.shared.upstream.release(channel);
            }
        }
        if self.principal.is_some() {
            self.shared.unregister(self.id);
        }
        // Make sure the writer ends even if the reader ended on its own.
        self.control.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::Setup;
    use std::sync::Arc;

    #[test]
    fn a_panic_during_a_subscribe_leaves_no_attach_and_no_broker_reference() {
        use crate::control::Control;
        use crate::hub::{Hub, Subscriber};
        use crate::outbox::{Outbox, QueueLimits};
        use crate::upstream::{Command, Upstream};
        let hub = Hub::new(4);
        let (upstream, mut commands) = Upstream::channel();
        let limits = QueueLimits {
            messages: 8,
            bytes: 1 << 20,
            replay_messages: 8,
            replay_bytes: 1 << 20,
        };
        let (outbox, _inbox) = Outbox::new(limits, Arc::new(Control::new()));
        let channel: Arc<str> = Arc::from("user:1");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut setup = Setup::new(&hub, &upstream, channel.clone(), 7);
            setup.acquired = true;
            hub.attach(
                channel.clone(),
                Subscriber::new(7, fanout_protocol::Codec::Json, outbox.clone(), false),
            );
            setup.attached = true;
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
        let mut setup = Setup::new(&hub, &upstream, channel.clone(), 8);
        setup.acquired = true;
        setup.attached = true;
        hub.attach(
            channel.clone(),
            Subscriber::new(8, fanout_protocol::Codec::Json, outbox, false),
        );
        setup.keep();
        assert!(hub.contains("user:1", 8));
        assert!(commands.try_recv().is_err());
    }
}
