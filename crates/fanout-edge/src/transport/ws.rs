//! The WebSocket transport: the `/ws` upgrade (Origin, capacity, subprotocol, token
//! location are decided before it), then one task per connection. Its reader turns
//! WebSocket frames into client messages for the [`Session`] (RFC 6455 rules in
//! [`framing`]); its writer drains the session's outbox onto the socket in bursts (one
//! `writev` per burst), sends the node's pings and the close frame. Nothing here knows
//! what a subscription is.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanout_protocol::{CloseCode, Codec};
use fastwebsockets::{OpCode, WebSocketError};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, ORIGIN, SEC_WEBSOCKET_PROTOCOL};
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Principal};
use crate::control::{Control, Side};
use crate::metrics as m;
use crate::outbox::{Kind, OutboxReader, Outgoing};
use crate::respond::{bearer, json, origin_allowed, query_token, Body};
use crate::session::Session;
use crate::shared::{Admission, Refusal, Shared};
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

/// `GET /ws`: checks the upgrade, verifies a token given in it, admits the socket
/// (or keeps the refusal to send as a close frame) and starts its session task.
pub(crate) fn upgrade(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    peer: IpAddr,
) -> Response<Body> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return json(
            StatusCode::UPGRADE_REQUIRED,
            &serde_json::json!({"error": {"code": "bad_request", "message": "a WebSocket upgrade is required"}}),
        );
    }
    let offered = req
        .headers()
        .get(SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Some(codec) = Codec::negotiate(offered.as_deref()) else {
        return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": {"code": "bad_request", "message": "supported subprotocols: fanout.json, fanout.msgpack"}}),
        );
    };
    // Refusals are sent as close frames after the upgrade: a browser sees a close
    // code, never the status of a refused handshake.
    let mut refuse = None;
    let origin = req.headers().get(ORIGIN).and_then(|v| v.to_str().ok());
    if !origin_allowed(&shared, origin) {
        tracing::info!(origin = origin.unwrap_or(""), "origin not allowed");
        metrics::counter!(m::CONNECTIONS_REFUSED_TOTAL, "limit" => "origin").increment(1);
        refuse = Some(Refusal {
            code: CloseCode::Policy,
            reason: "origin not allowed",
        });
    }
    if shared.is_draining() {
        refuse = Some(Refusal {
            code: CloseCode::GoingAway,
            reason: "the node is draining; reconnect",
        });
    }
    // A token in the handshake is verified now: a valid one takes a connection slot at
    // once, and only sockets that still have to authenticate count as pending.
    let auth = bearer(req.headers().get(AUTHORIZATION))
        .or_else(|| query_token(req.uri().query()))
        .map(|t| shared.settings.auth.verify_connection(&t));
    let user = match &auth {
        Some(Ok(p)) if refuse.is_none() => Some(&p.user),
        _ => None,
    };
    let admission = match shared.admit(peer, user) {
        Ok(a) => Some(a),
        Err(r) => {
            refuse = refuse.or(Some(r));
            None
        }
    };
    let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(r) => r,
        Err(error) => {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": {"code": "bad_request", "message": error.to_string()}}),
            )
        }
    };
    let handshake = Box::new(Handshake {
        codec,
        auth,
        refuse,
        admission,
    });
    tracker.spawn(run(shared, fut, handshake));
    let (mut parts, _) = response.into_parts();
    if offered.is_some() {
        parts.headers.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(codec.protocol()),
        );
    }
    Response::from_parts(parts, Body::new(Bytes::new()))
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

        let (mut session, inbox) = Session::open(shared.clone(), codec, admission);
        let (id, control) = (session.id, session.control.clone());
        let writer_task = tokio::spawn(write_loop(
            output,
            inbox,
            control.clone(),
            codec,
            shared.settings.limits.silence_timeout(),
        ));
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
        let read = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(read_loop(
            &mut session,
            &mut input,
        )))
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
        session.close();
    }
}

enum Read {
    Message(Vec<u8>, bool),
    Ping(Vec<u8>),
    Close(u16),
    Nothing,
}

async fn read_loop(session: &mut Session, input: &mut Input) {
    // (Limits are read where used, not kept in locals: every connection's task
    // carries what this future keeps across its waits.)
    let auth_deadline = Instant::now() + session.shared.settings.limits.auth_timeout();
    let mut ping_at = Instant::now() + session.shared.settings.limits.ping_interval();
    // A fragmented message being put together.
    let mut fragments = framing::Fragments::default();
    loop {
        // One timer for the nearest of: authentication due (or the token's
        // expiry, once authenticated), the client's silence, and our next ping.
        // One, not three: every connection's task carries it (and the writer
        // carries none).
        let due = session.due(auth_deadline);
        // A client silent for two ping intervals (it answers our pings) is gone.
        let silent = Instant::now() + session.shared.settings.limits.silence_timeout();
        let frame = {
            // Kept across pings: a frame read halfway must not be dropped.
            let read = input.read_frame();
            tokio::pin!(read);
            loop {
                tokio::select! {
                    biased;
                    _ = session.control.cancelled(Side::Reader) => return,
                    _ = sleep_until(due.at().min(silent).min(ping_at)) => {
                        let now = Instant::now();
                        if due.passed(now, &session.control) {
                            return;
                        }
                        match due {
                            _ if now >= silent => {
                                tracing::debug!(session = session.id, "client silent for too long; dropping");
                                session.control.abort();
                                return;
                            }
                            // The next interval starts now: a late ping is not
                            // followed by a burst of missed ones.
                            _ if now >= ping_at => {
                                session.outbox.push_ping();
                                ping_at = now + session.shared.settings.limits.ping_interval();
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
                session.control.close(CloseCode::TooBig);
                return;
            }
            Err(WebSocketError::UnexpectedEOF) | Err(WebSocketError::IoError(_)) => {
                session.control.abort();
                return;
            }
            // A whole text frame that is not UTF-8 (fastwebsockets checks those).
            Err(WebSocketError::InvalidUTF8) => {
                session
                    .control
                    .close_raw(1007, "text frame is not valid UTF-8".into());
                return;
            }
            Err(error) => {
                tracing::debug!(session = session.id, %error, "protocol error");
                session.control.close(CloseCode::ProtocolError);
                return;
            }
            Ok(frame) => {
                if let Err((code, reason)) = framing::check(&frame) {
                    tracing::debug!(session = session.id, code, reason, "protocol error");
                    session.control.close_raw(code, reason.into());
                    return;
                }
                if frame.opcode != OpCode::Close && !session.admit_frame() {
                    // Refused by the rate limit (error sent, strike counted). A refused
                    // piece of a fragmented message drops the whole message.
                    if session.control.is_cancelled() {
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
                                session.shared.settings.limits.max_message_size,
                            ) {
                            Ok(Some((bytes, binary))) => Read::Message(bytes, binary),
                            Ok(None) => Read::Nothing,
                            Err((code, reason)) => {
                                session.control.close_raw(code, reason.into());
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
            Read::Ping(payload) => session.outbox.push_pong(Bytes::from(payload)),
            Read::Close(code) => {
                session.client_closed = true;
                session.control.close_raw(code, String::new());
                return;
            }
            Read::Message(bytes, binary) => {
                // Boxed: handling a frame (a subscribe reads history) takes far more
                // state than waiting for one, and every idle connection would carry it.
                Box::pin(session.handle(&bytes, binary, due, &mut ping_at)).await;
                if session.control.is_cancelled() {
                    return;
                }
            }
        }
    }
}

/// Writes the connection's frames until it ends; returns whether a close frame went
/// out (then the client's answer is worth waiting for).
#[allow(clippy::manual_async_fn)]
fn write_loop(
    mut out: Output,
    mut outbox: OutboxReader,
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
    outbox: &mut OutboxReader,
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

#[cfg(test)]
mod tests {
    use super::Stall;
    use std::time::{Duration, Instant};

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
}
