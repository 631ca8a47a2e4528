//! The one HTTP port: routes `/ws` (WebSocket), `/sse` (Server-Sent Events),
//! `/client/*` (client commands over plain HTTP), `/api/*` (the server API),
//! `/healthz`, `/readyz` and `/metrics`, and runs the accept loop. What happens behind
//! each route lives in its own module; this one only dispatches.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::respond::{json, Body, Conn};
use crate::shared::Shared;
use crate::transport::sse::SseBody;

/// A response: built in full, or an event stream.
pub(crate) type Reply = Either<Body, SseBody>;

pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tracker: TaskTracker) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let conn_tracker = tracker.clone();
        tracker.spawn(async move {
            let kill = CancellationToken::new();
            let conn = Conn {
                peer: peer.ip(),
                tracker: conn_tracker,
                kill: kill.clone(),
            };
            let service = service_fn(move |req| {
                let shared = shared.clone();
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(route(req, shared, conn).await) }
            });
            let serve = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                r = serve => if let Err(error) = r {
                    tracing::debug!(%peer, %error, "http connection ended with an error");
                },
                _ = kill.cancelled() => tracing::debug!(%peer, "http connection dropped"),
            }
        });
    }
}

async fn route(req: Request<Incoming>, shared: Arc<Shared>, conn: Conn) -> Response<Reply> {
    let full = |r: Response<Body>| r.map(Either::Left);
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ws") => full(crate::transport::ws::upgrade(
            req,
            shared,
            conn.tracker,
            conn.peer,
        )),
        (&Method::GET, "/sse") => crate::transport::sse::stream(req, shared, conn),
        // A page on another origin sends its token in a header: the browser asks first.
        (&Method::OPTIONS, "/sse") => full(crate::transport::sse::preflight(&req, &shared)),
        (&Method::GET, "/healthz") => {
            full(json(StatusCode::OK, &serde_json::json!({"status": "ok"})))
        }
        (&Method::GET, "/readyz") => full(readyz(&shared)),
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(shared.metrics.render())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            full(r)
        }
        (_, path) if path.starts_with("/client/") => {
            full(crate::client_api::handle(req, shared).await)
        }
        (_, path) if path.starts_with("/api/") => full(crate::api::handle(req, shared).await),
        _ => full(json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": {"code": "not_found", "message": "no such endpoint"}}),
        )),
    }
}

fn readyz(shared: &Shared) -> Response<Body> {
    let (status, reason) = if shared.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, Some("draining"))
    } else if !shared.broker.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, Some("broker disconnected"))
    } else {
        (StatusCode::OK, None)
    };
    let body = match reason {
        None => serde_json::json!({"status": "ready", "broker": shared.broker.kind()}),
        Some(r) => {
            serde_json::json!({"status": "unavailable", "reason": r, "broker": shared.broker.kind()})
        }
    };
    json(status, &body)
}
