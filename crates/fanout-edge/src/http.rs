//! The one HTTP port (contract §4): `/ws` upgrades, `/healthz`, `/readyz`, `/metrics`
//! and the server API under `/api/`. This module decides whether an upgrade may happen
//! (Origin, capacity, subprotocol, token location) and hands the socket to a session.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanout_protocol::{CloseCode, Codec};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, ORIGIN, SEC_WEBSOCKET_PROTOCOL};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::node::{Refusal, Shared};
use crate::session::{self, Handshake};

pub(crate) type Body = Full<Bytes>;

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
            let service = service_fn(move |req| {
                let shared = shared.clone();
                let tracker = conn_tracker.clone();
                async move { Ok::<_, Infallible>(route(req, shared, tracker, peer.ip()).await) }
            });
            if let Err(error) = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(%peer, %error, "http connection ended with an error");
            }
        });
    }
}

async fn route(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    peer: IpAddr,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ws") => upgrade(req, shared, tracker, peer),
        (&Method::GET, "/healthz") => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        (&Method::GET, "/readyz") => readyz(&shared),
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(shared.metrics.render())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (_, path) if path.starts_with("/api/") => crate::api::handle(req, shared).await,
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": {"code": "not_found", "message": "no such endpoint"}}),
        ),
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

pub(crate) fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn upgrade(
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
    if let Some(allowed) = &shared.settings.allowed_origins {
        let origin = req
            .headers()
            .get(ORIGIN)
            .and_then(|v| v.to_str().ok())
            .map(|o| o.trim_end_matches('/').to_ascii_lowercase());
        // Browsers always send Origin; a client without one is not a browser page.
        if let Some(origin) = origin {
            if !allowed.contains(&origin) {
                tracing::info!(%origin, "origin not allowed");
                metrics::counter!(crate::metrics::CONNECTIONS_REFUSED_TOTAL, "limit" => "origin")
                    .increment(1);
                refuse = Some(Refusal {
                    code: CloseCode::Policy,
                    reason: "origin not allowed",
                });
            }
        }
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
    tracker.spawn(session::run(shared, fut, handshake));
    let (mut parts, _) = response.into_parts();
    if offered.is_some() {
        parts.headers.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(codec.protocol()),
        );
    }
    Response::from_parts(parts, Full::new(Bytes::new()))
}

pub(crate) fn bearer(value: Option<&HeaderValue>) -> Option<String> {
    let v = value?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
        .filter(|t| !t.is_empty())
}

fn query_token(query: Option<&str>) -> Option<String> {
    query_param(query, "token")
}

/// The percent-decoded value of `name` in a query string (`None` if absent or empty).
pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
        .filter(|t| !t.is_empty())
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some(hex(bytes[i + 1])? * 16 + hex(bytes[i + 2])?))
            .flatten();
        match (decoded, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tokens() {
        assert_eq!(
            query_token(Some("a=1&token=abc.def")),
            Some("abc.def".into())
        );
        assert_eq!(query_token(Some("token=a%2Eb")), Some("a.b".into()));
        assert_eq!(query_token(Some("token=")), None);
        assert_eq!(query_token(None), None);
        let h = HeaderValue::from_static("Bearer xyz");
        assert_eq!(bearer(Some(&h)), Some("xyz".into()));
        let h = HeaderValue::from_static("Basic xyz");
        assert_eq!(bearer(Some(&h)), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%é%41"), "%éA");
    }
}
