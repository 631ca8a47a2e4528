//! Small HTTP helpers shared by every endpoint: the connection a request came on, JSON
//! responses, CORS, and the parts of a request that carry a token, a parameter or a
//! body. No routing and no state here.

use bytes::Bytes;
use fanout_protocol::ErrorCode;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE, VARY};
use hyper::Request;
use hyper::{Response, StatusCode};
use serde::Deserialize;

use crate::shared::Shared;
use std::net::IpAddr;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Every response body the edge builds in full (streams have their own).
pub(crate) type Body = Full<Bytes>;

pub(crate) fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub(crate) fn bearer(value: Option<&HeaderValue>) -> Option<String> {
    let v = value?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The token of `?token=…`.
pub(crate) fn query_token(query: Option<&str>) -> Option<String> {
    query_param(query, "token")
}

/// `{"error":{"code":…,"message":…}}` with `status`.
pub(crate) fn error_json(status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    json(
        status,
        &serde_json::json!({"error": {"code": code.as_str(), "message": message}}),
    )
}

/// What a request handler may need of its HTTP connection.
#[derive(Clone)]
pub(crate) struct Conn {
    pub peer: IpAddr,
    pub tracker: TaskTracker,
    /// Cancelled: the connection is dropped at once, whatever it is doing (a stream
    /// whose reader stopped reading cannot be ended by a last write).
    pub kill: CancellationToken,
}

/// Why an HTTP request is refused: its status, error code and message.
pub(crate) type Refused = (StatusCode, ErrorCode, String);

/// The user of a request's connection token (`None`: the request carried none; `how`
/// says how to send one). Refused: 401, with the reason (never the token).
pub(crate) fn principal(
    shared: &Shared,
    token: Option<String>,
    how: &str,
) -> Result<crate::auth::Principal, Refused> {
    let Some(token) = token else {
        metrics::counter!(crate::metrics::AUTH_FAILURES_TOTAL, "reason" => "missing").increment(1);
        return Err((
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            format!("send the connection token: {how}"),
        ));
    };
    shared.settings.auth.verify_connection(&token).map_err(|e| {
        metrics::counter!(crate::metrics::AUTH_FAILURES_TOTAL, "reason" => e.label()).increment(1);
        (
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            format!("connection token refused: {e}"),
        )
    })
}

/// Reads a JSON request body of at most `limit` bytes, all of it within `within` (a
/// client trickling a body a byte at a time must not hold its request open for ever).
/// Refused: 408, 413 (`too_large`) or 400 (`bad_request`), with the reason.
pub(crate) async fn read_json<T: for<'de> Deserialize<'de>>(
    req: Request<Incoming>,
    limit: usize,
    within: std::time::Duration,
) -> Result<T, Refused> {
    let bad = |status, code, message: String| (status, code, message);
    let collected = tokio::time::timeout(within, Limited::new(req.into_body(), limit).collect())
        .await
        .map_err(|_| {
            bad(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::BadRequest,
                format!("request body not received within {} s", within.as_secs()),
            )
        })?;
    let bytes = collected
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                bad(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::TooLarge,
                    format!("request body over {limit} bytes"),
                )
            } else {
                bad(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    format!("cannot read body: {e}"),
                )
            }
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        bad(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            format!("invalid JSON body: {e}"),
        )
    })
}

/// Whether a request from a page of `origin` may be served: any origin when no
/// allowlist is set; a request without `Origin` is not from a browser page.
pub(crate) fn origin_allowed(shared: &Shared, origin: Option<&str>) -> bool {
    match (&shared.settings.allowed_origins, origin) {
        (Some(allowed), Some(origin)) => {
            allowed.contains(&origin.trim_end_matches('/').to_ascii_lowercase())
        }
        _ => true,
    }
}

/// Lets a page of an allowed `origin` read the response (CORS): browsers need this
/// for an `EventSource` or a `fetch` to another origin.
pub(crate) fn cors(headers: &mut HeaderMap, shared: &Shared, origin: Option<&str>) {
    headers.append(VARY, HeaderValue::from_static("origin"));
    let Some(origin) = origin.filter(|o| origin_allowed(shared, Some(o))) else {
        return;
    };
    if let Ok(value) = HeaderValue::from_str(origin) {
        headers.insert("access-control-allow-origin", value);
        headers.insert(
            "access-control-allow-credentials",
            HeaderValue::from_static("true"),
        );
    }
}

/// The answer to a browser's CORS preflight.
pub(crate) fn preflight() -> Response<Body> {
    let mut r = json(StatusCode::NO_CONTENT, &serde_json::Value::Null);
    *r.body_mut() = Body::default();
    let h = r.headers_mut();
    h.remove(hyper::header::CONTENT_TYPE);
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("authorization, content-type, idempotency-key, last-event-id"),
    );
    h.insert("access-control-max-age", HeaderValue::from_static("600"));
    r
}

/// Every percent-decoded, non-empty value of `name` in a query string, in order.
pub(crate) fn query_params(query: Option<&str>, name: &str) -> Vec<String> {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
        .filter(|v| !v.is_empty())
        .collect()
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
        assert_eq!(
            query_params(Some("channel=a&x=1&channel=b%3A1&channel="), "channel"),
            vec!["a".to_string(), "b:1".to_string()]
        );
        assert!(query_params(None, "channel").is_empty());
        assert_eq!(percent_decode("%é%41"), "%éA");
    }
}
