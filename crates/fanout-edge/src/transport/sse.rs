//! The Server-Sent Events transport: `GET /sse?channel=…&channel=…`, a receive-only
//! session for networks that block WebSockets and for a plain browser `EventSource`
//! or `curl -N`. Everything is checked before the `200` (token, Origin, channels and
//! their rules, limits), so a refused stream is an HTTP status with a JSON error. Then
//! the same [`Session`] as a WebSocket's subscribes the channels and fills the same
//! bounded outbox, which [`SseBody`] turns into events: `event:` is the frame's type,
//! `data:` the very JSON of the WebSocket frame, and `subscribed` and `message` events
//! carry an `id:` holding the position of **every** channel of the stream. A browser
//! that reconnects sends it back as `Last-Event-ID`, and each channel resumes from its
//! own position. The stream's end is an event too (`close`, after an `error` event
//! when the close is an error), then the response ends.
//!
//! What SSE costs next to a WebSocket: the outbox's frames are shared as for any
//! connection, but each event is written per stream (its `id:` is the stream's own),
//! which means reading the frame's head (type, channel, offset, epoch) and copying
//! it; and a stream holds an HTTP connection task and a session task.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fanout_protocol::{CloseCode, Codec, ErrorCode, Since};
use http_body_util::Either;
use hyper::body::{Frame, Incoming};
use hyper::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_TYPE,
};
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::control::{Control, Side};
use crate::metrics as m;
use crate::outbox::{Kind, OutboxReader, Outgoing};
use crate::respond::{
    bearer, cors, error_json, origin_allowed, principal, query_params, query_token, Body, Conn,
    Refused,
};
use crate::rules::Grant;
use crate::session::Session;
use crate::shared::Shared;

/// How long a closed stream may take to write its last events before its connection
/// is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Events gathered into one write.
const BURST: usize = 64;

/// `GET /sse`: checks the request, then answers `200 text/event-stream` and starts the
/// stream's session, or answers the refusal's status with a JSON error.
pub(crate) fn stream(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    conn: Conn,
) -> Response<Either<Body, SseBody>> {
    let origin = req
        .headers()
        .get(hyper::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let response = match open(&req, &shared, &conn, origin.as_deref()) {
        Ok(response) => response,
        Err((status, code, message)) => {
            tracing::info!(status = status.as_u16(), code = code.as_str(), %message, "event stream refused");
            error_json(status, code, &message).map(Either::Left)
        }
    };
    let mut response = response;
    cors(response.headers_mut(), &shared, origin.as_deref());
    metrics::counter!(m::CLIENT_HTTP_REQUESTS_TOTAL, "endpoint" => "sse", "status" => response.status().as_str().to_string())
        .increment(1);
    response
}

/// `OPTIONS /sse`: the CORS preflight of a page on an allowed origin (403 for others).
pub(crate) fn preflight(req: &Request<Incoming>, shared: &Shared) -> Response<Body> {
    let origin = req
        .headers()
        .get(hyper::header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    let mut response = if origin_allowed(shared, origin) {
        crate::respond::preflight()
    } else {
        error_json(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "origin not allowed",
        )
    };
    cors(response.headers_mut(), shared, origin);
    response
}

fn refused(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Refused {
    (status, code, message.into())
}

fn open(
    req: &Request<Incoming>,
    shared: &Arc<Shared>,
    conn: &Conn,
    origin: Option<&str>,
) -> Result<Response<Either<Body, SseBody>>, Refused> {
    if !origin_allowed(shared, origin) {
        metrics::counter!(m::CONNECTIONS_REFUSED_TOTAL, "limit" => "origin").increment(1);
        return Err(refused(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "origin not allowed",
        ));
    }
    if shared.is_draining() {
        return Err(refused(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "the node is draining; reconnect",
        ));
    }
    let query = req.uri().query();
    let token = bearer(req.headers().get(AUTHORIZATION)).or_else(|| query_token(query));
    let principal = principal(shared, token, "`Authorization: Bearer …` or `?token=…`")?;
    let channels = query_params(query, "channel");
    let limit = shared.settings.limits.max_subscriptions;
    let channels = check_channels(channels, limit)
        .map_err(|m| refused(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, m))?;
    let namespaces = &shared.settings.namespaces;
    for name in channels.iter() {
        let channel = namespaces
            .parse(name)
            .map_err(|r| refused(StatusCode::BAD_REQUEST, r.code, r.message))?;
        namespaces
            .check_subscribe(&principal, &channel, Grant::None)
            .map_err(|r| {
                refused(
                    StatusCode::from_u16(r.code.http_status()).unwrap_or(StatusCode::FORBIDDEN),
                    r.code,
                    r.message,
                )
            })?;
    }
    let last_id = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| query_params(query, "last_event_id").pop())
        .filter(|id| !id.is_empty());
    let positions = match &last_id {
        None => Positions::new(channels.len()),
        Some(id) => Positions::parse(id, channels.len()).map_err(|m| {
            refused(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("Last-Event-ID: {m}"),
            )
        })?,
    };
    if !shared.broker.is_ready() {
        return Err(refused(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "the broker is unavailable; retry shortly",
        ));
    }
    let admission = shared
        .admit(conn.peer, Some(&principal.user))
        .map_err(|r| {
            let (status, code) = match r.code {
                CloseCode::RateLimited => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited),
                _ => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
            };
            refused(status, code, r.reason)
        })?;

    // Admitted: from here on the stream is a session like any other.
    let (mut session, inbox) = Session::open(shared.clone(), Codec::Json, Some(admission));
    session.authenticated(principal);
    let subscribes: Vec<(Arc<str>, Option<Since>)> = channels
        .iter()
        .zip(positions.since())
        .map(|(c, s)| (c.clone(), s))
        .collect();
    let (done_tx, done_rx) = oneshot::channel();
    let progress = Arc::new(AtomicU64::new(0));
    let body = SseBody {
        inbox,
        control: session.control.clone(),
        channels,
        positions,
        retry_ms: Some(1000 + rand::random_range(0..2000)),
        progress: progress.clone(),
        ended: false,
        _done: done_tx,
    };
    conn.tracker.spawn(run(
        session,
        subscribes,
        done_rx,
        conn.kill.clone(),
        progress,
    ));
    let mut response = Response::new(Either::Right(body));
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    // A stream's end is the connection's: nothing waits on it afterwards.
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    // Proxies that buffer responses (nginx) must pass events through as they come.
    h.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(response)
}

/// The stream's channels: at least one, at most `limit`, none twice.
fn check_channels(channels: Vec<String>, limit: usize) -> Result<Arc<[Arc<str>]>, String> {
    if channels.is_empty() {
        return Err("name at least one channel: /sse?channel=…".into());
    }
    if channels.len() > limit {
        return Err(format!("at most {limit} channels per stream"));
    }
    for (i, c) in channels.iter().enumerate() {
        if channels[..i].contains(c) {
            return Err(format!("channel {c} is named twice"));
        }
    }
    Ok(channels.into_iter().map(Arc::from).collect())
}

/// The stream's session, from its subscribes to its end: the channels are subscribed
/// in order (a `Last-Event-ID` position each, when it has one), then the session's
/// timers run — token expiry, and a heartbeat every ping interval, which is also how
/// a reader that stopped reading is found.
async fn run(
    mut session: Session,
    subscribes: Vec<(Arc<str>, Option<Since>)>,
    done: oneshot::Receiver<()>,
    kill: CancellationToken,
    progress: Arc<AtomicU64>,
) {
    let control = session.control.clone();
    for (channel, since) in subscribes {
        let subscribed = tokio::select! {
            biased;
            _ = control.cancelled(Side::Reader) => break,
            r = session.subscribe(None, &channel, None, since.as_ref(), None) => r,
        };
        // A stream is all its channels or none: the `error` event went out, and the
        // close asks the browser to come back (with its positions) rather than to
        // carry on without one of them.
        if let Err(code) = subscribed {
            let close = match code {
                ErrorCode::Forbidden | ErrorCode::Unauthorized => CloseCode::Forbidden,
                _ => CloseCode::TryLater,
            };
            control.close_raw(close.code(), format!("could not subscribe {channel}"));
            break;
        }
    }
    let limits = &session.shared.settings.limits;
    let (interval, silence) = (limits.ping_interval(), limits.silence_timeout());
    let mut ping_at = Instant::now() + interval;
    let (mut seen, mut moved_at) = (progress.load(Ordering::Relaxed), Instant::now());
    while !control.is_cancelled() {
        let due = session.due(Instant::now());
        tokio::select! {
            biased;
            _ = control.cancelled(Side::Reader) => break,
            _ = sleep_until(due.at().min(ping_at)) => {
                let now = Instant::now();
                if due.passed(now, &control) {
                    break;
                }
                if now >= ping_at {
                    // The body writes only when the connection takes more: nothing
                    // written for the silence timeout, heartbeats included, is a reader
                    // that stopped reading.
                    let p = progress.load(Ordering::Relaxed);
                    if p != seen {
                        (seen, moved_at) = (p, now);
                    } else if now.duration_since(moved_at) >= silence {
                        session.outbox.stalled();
                    }
                    session.outbox.push_ping();
                    ping_at = now + interval;
                }
            }
        }
    }
    session.cleanup();
    // The body writes what is left and the close events, unless the reader is stuck:
    // then the connection goes.
    if tokio::time::timeout(CLOSE_GRACE, done).await.is_err() {
        tracing::debug!(
            session = session.id,
            "event stream not finished in time; dropping its connection"
        );
        kill.cancel();
    }
    session.close();
}

/// The response body of an event stream: the session's outbox, as events.
pub(crate) struct SseBody {
    inbox: OutboxReader,
    control: Arc<Control>,
    channels: Arc<[Arc<str>]>,
    positions: Positions,
    /// The reconnect delay to tell the browser first (jittered per stream, so that a
    /// node's streams do not all come back at the same moment).
    retry_ms: Option<u32>,
    /// Writes so far (read by the session to find a stuck reader).
    progress: Arc<AtomicU64>,
    ended: bool,
    /// Dropped with the body: the session learns that the stream is over.
    _done: oneshot::Sender<()>,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let mut out = Vec::new();
        if let Some(ms) = this.retry_ms.take() {
            out.extend_from_slice(format!("retry: {ms}\n\n").as_bytes());
        }
        if this.control.close_frame().is_some() {
            this.finish(&mut out);
        } else {
            match this.inbox.poll_next(cx) {
                Poll::Ready(Some(first)) => {
                    this.event(&first, &mut out);
                    for _ in 1..BURST {
                        let Some(next) = this.inbox.try_next() else {
                            break;
                        };
                        this.event(&next, &mut out);
                    }
                }
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => {
                    if this.control.poll_cancelled(Side::Writer, cx).is_ready() {
                        this.finish(&mut out);
                    }
                }
            }
        }
        if out.is_empty() {
            return if this.ended {
                Poll::Ready(None)
            } else {
                Poll::Pending
            };
        }
        this.progress.fetch_add(1, Ordering::Relaxed);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

impl Drop for SseBody {
    /// The response is gone (the client went away, or it ended): so is the session.
    fn drop(&mut self) {
        self.control.abort();
    }
}

impl SseBody {
    /// Writes one outgoing frame as an event.
    fn event(&mut self, o: &Outgoing, out: &mut Vec<u8>) {
        match o.kind {
            // A comment: keeps proxies from timing the stream out, and shows whether
            // the reader still reads.
            Kind::Ping => out.extend_from_slice(b": ping\n\n"),
            Kind::Pong => {}
            Kind::Data => {
                let Ok(head) = serde_json::from_slice::<Head<'_>>(&o.frame) else {
                    // Every frame the session queues is a JSON object with a type.
                    metrics::counter!(m::INTERNAL_ERRORS_TOTAL, "place" => "sse").increment(1);
                    tracing::error!("bug: a frame without a type in an event stream; skipped");
                    return;
                };
                let positioned = matches!(head.kind, "subscribed" | "message");
                if positioned {
                    if let (Some(channel), Some(offset)) = (head.channel.as_deref(), head.offset) {
                        if let Some(i) = self.channels.iter().position(|c| **c == *channel) {
                            self.positions.set(i, offset, head.epoch.as_deref());
                        }
                    }
                    out.extend_from_slice(b"id: ");
                    self.positions.write(out);
                    out.push(b'\n');
                }
                write_event(out, head.kind, &o.frame);
            }
        }
    }

    /// The stream ends: what is queued goes out first (not for a slow consumer, whose
    /// queue is the problem), then an `error` event when the close is an error, then
    /// `close {code, reason}`.
    fn finish(&mut self, out: &mut Vec<u8>) {
        self.ended = true;
        let Some((code, reason)) = self.control.close_frame().cloned() else {
            return;
        };
        if code != CloseCode::SlowConsumer.code() {
            while let Some(o) = self.inbox.try_next() {
                self.event(&o, out);
            }
        }
        if let Some(error) = close_error(code) {
            let frame =
                serde_json::json!({"type": "error", "code": error.as_str(), "message": reason});
            write_event(out, "error", frame.to_string().as_bytes());
        }
        let frame = serde_json::json!({"type": "close", "code": code, "reason": reason});
        write_event(out, "close", frame.to_string().as_bytes());
    }
}

/// `event: <kind>` and the JSON as `data:`. JSON can hold a line break only as
/// whitespace between tokens (a publisher's pretty-printed data): dropped, so that the
/// event is one `data:` line.
fn write_event(out: &mut Vec<u8>, kind: &str, json: &[u8]) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    if json.iter().any(|&b| b == b'\n' || b == b'\r') {
        out.extend(json.iter().filter(|&&b| b != b'\n' && b != b'\r'));
    } else {
        out.extend_from_slice(json);
    }
    out.extend_from_slice(b"\n\n");
}

/// The error a close code stands for, told as an `error` event before the `close`
/// event (none for a normal close or a drain).
fn close_error(code: u16) -> Option<ErrorCode> {
    Some(match CloseCode::from_u16(code) {
        _ if code == 1000 => return None,
        Some(CloseCode::GoingAway) => return None,
        Some(CloseCode::Unauthorized | CloseCode::TokenExpired) => ErrorCode::Unauthorized,
        Some(CloseCode::Forbidden | CloseCode::Policy | CloseCode::DisconnectedByAdmin) => {
            ErrorCode::Forbidden
        }
        Some(CloseCode::RateLimited) => ErrorCode::RateLimited,
        Some(CloseCode::SlowConsumer) => ErrorCode::LimitExceeded,
        Some(CloseCode::TooBig) => ErrorCode::TooLarge,
        Some(CloseCode::TryLater) => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    })
}

/// What an event needs of a frame: its type and, for positions, channel, offset and
/// epoch (`data` is skipped, not copied).
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    channel: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default, borrow)]
    epoch: Option<std::borrow::Cow<'a, str>>,
}

/// The position of each channel of a stream, in the order of its `channel=`
/// parameters: what an event `id:` holds. Written `offset:epoch` per channel, joined
/// by commas, empty for a channel with no position yet — `17:Ab3x,,4:Zq9`. (Epochs are
/// alphanumeric, so neither separator can occur in one.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Positions(Vec<Option<(u64, Box<str>)>>);

impl Positions {
    pub(crate) fn new(channels: usize) -> Positions {
        Positions(vec![None; channels])
    }

    /// Reads an id this edge wrote for a stream of `channels` channels.
    pub(crate) fn parse(id: &str, channels: usize) -> Result<Positions, String> {
        let entries: Vec<&str> = id.split(',').collect();
        if entries.len() != channels {
            return Err(format!(
                "holds {} position(s) for {channels} channel(s); reconnect with the same channels",
                entries.len()
            ));
        }
        entries
            .into_iter()
            .map(|e| {
                if e.is_empty() {
                    return Ok(None);
                }
                let (offset, epoch) = e
                    .split_once(':')
                    .filter(|(_, epoch)| !epoch.is_empty())
                    .ok_or_else(|| format!("`{e}` is not offset:epoch"))?;
                let offset = offset
                    .parse::<u64>()
                    .map_err(|_| format!("`{offset}` is not an offset"))?;
                Ok(Some((offset, Box::from(epoch))))
            })
            .collect::<Result<Vec<_>, String>>()
            .map(Positions)
    }

    /// Channel `i` is at `offset` (of `epoch`, or of the epoch it had).
    fn set(&mut self, i: usize, offset: u64, epoch: Option<&str>) {
        let slot = &mut self.0[i];
        let epoch = match (epoch, slot.take()) {
            (Some(e), _) => Box::from(e),
            (None, Some((_, e))) => e,
            // An offset with no epoch at all cannot be resumed from.
            (None, None) => return,
        };
        *slot = Some((offset, epoch));
    }

    fn write(&self, out: &mut Vec<u8>) {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            if let Some((offset, epoch)) = p {
                out.extend_from_slice(offset.to_string().as_bytes());
                out.push(b':');
                out.extend_from_slice(epoch.as_bytes());
            }
        }
    }

    /// Each channel's `since`, for its subscribe.
    fn since(&self) -> impl Iterator<Item = Option<Since>> + '_ {
        self.0.iter().map(|p| {
            p.as_ref().map(|(offset, epoch)| Since {
                offset: *offset,
                epoch: epoch.to_string(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(p: &Positions) -> String {
        let mut out = Vec::new();
        p.write(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn positions_round_trip_through_an_event_id() {
        let mut p = Positions::new(3);
        assert_eq!(written(&p), ",,");
        p.set(0, 17, Some("Ab3x"));
        p.set(2, 4, Some("Zq9"));
        assert_eq!(written(&p), "17:Ab3x,,4:Zq9");
        assert_eq!(Positions::parse("17:Ab3x,,4:Zq9", 3).unwrap(), p);
        // A message with an offset but no epoch keeps the channel's epoch.
        p.set(0, 18, None);
        assert_eq!(written(&p), "18:Ab3x,,4:Zq9");
        // …and cannot give a channel with none a position.
        p.set(1, 5, None);
        assert_eq!(written(&p), "18:Ab3x,,4:Zq9");
        let since: Vec<_> = p.since().collect();
        assert_eq!(
            since[0].as_ref().map(|s| (s.offset, s.epoch.as_str())),
            Some((18, "Ab3x"))
        );
        assert!(since[1].is_none());
    }

    #[test]
    fn a_bad_event_id_is_refused_with_a_reason() {
        for (id, n, why) in [
            ("1:a", 2, "holds 1 position(s) for 2 channel(s)"),
            ("1:a,2:b", 1, "holds 2 position(s) for 1 channel(s)"),
            ("x:a", 1, "`x` is not an offset"),
            ("-1:a", 1, "`-1` is not an offset"),
            ("5", 1, "`5` is not offset:epoch"),
            ("5:", 1, "`5:` is not offset:epoch"),
        ] {
            let e = Positions::parse(id, n).unwrap_err();
            assert!(e.contains(why), "{id}: {e}");
        }
    }

    #[test]
    fn channels_are_checked() {
        assert!(check_channels(vec![], 4)
            .unwrap_err()
            .contains("at least one"));
        let many: Vec<String> = (0..5).map(|i| format!("user:{i}")).collect();
        assert!(check_channels(many, 4).unwrap_err().contains("at most 4"));
        let twice = vec!["user:1".to_string(), "user:1".to_string()];
        assert!(check_channels(twice, 4)
            .unwrap_err()
            .contains("named twice"));
        assert_eq!(check_channels(vec!["user:1".into()], 4).unwrap().len(), 1);
    }

    #[test]
    fn an_event_is_one_data_line() {
        let mut out = Vec::new();
        write_event(
            &mut out,
            "message",
            b"{\"type\":\"message\",\r\n\"data\":{\n\"a\":1}}",
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "event: message\ndata: {\"type\":\"message\",\"data\":{\"a\":1}}\n\n"
        );
    }

    #[test]
    fn close_codes_tell_their_error() {
        assert_eq!(close_error(1000), None);
        assert_eq!(close_error(1001), None);
        assert_eq!(close_error(4004), Some(ErrorCode::Unauthorized));
        assert_eq!(close_error(4009), Some(ErrorCode::LimitExceeded));
        assert_eq!(close_error(4010), Some(ErrorCode::Forbidden));
        assert_eq!(close_error(1013), Some(ErrorCode::Unavailable));
        assert_eq!(close_error(1011), Some(ErrorCode::Internal));
    }

    #[test]
    fn a_frame_head_is_read_without_its_data() {
        let frame = br#"{"type":"message","channel":"job_progress:7","data":{"channel":"no","offset":1},"offset":18,"epoch":"e1","ts":1}"#;
        let h: Head<'_> = serde_json::from_slice(frame).unwrap();
        assert_eq!(
            (h.kind, h.channel.as_deref(), h.offset, h.epoch.as_deref()),
            ("message", Some("job_progress:7"), Some(18), Some("e1"))
        );
    }
}
