//! The server API (docs/protocol.md, "Server API"): `Authorization: Bearer <admin
//! token>`, JSON in and out. Errors are `{"error":{"code":…,"message":…}}` with the
//! code's HTTP status. Request bodies are size-limited.

use std::sync::Arc;

use fanout_protocol::ErrorCode;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::broker::BrokerError;
use crate::commands::PublishBody;
use crate::metrics as m;
use crate::respond::{bearer, json, query_param, read_json, Body};
use crate::shared::{ControlMessage, Shared};

struct ApiError {
    code: ErrorCode,
    message: String,
    /// A status other than the code's own (408 for a body too slow to arrive).
    status: Option<StatusCode>,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            status: None,
        }
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::Unavailable(m) => ApiError::new(ErrorCode::Unavailable, m),
            BrokerError::Invalid(m) => ApiError::new(ErrorCode::BadRequest, m),
        }
    }
}

pub(crate) async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Body> {
    let endpoint = match (req.method(), req.uri().path()) {
        (&Method::POST, "/api/publish") => "publish",
        (&Method::POST, "/api/broadcast") => "broadcast",
        (&Method::POST, "/api/disconnect") => "disconnect",
        (&Method::GET, "/api/stats") => "stats",
        (&Method::GET, "/api/presence") => "presence",
        _ => "unknown",
    };
    let result = match authorize(&req, &shared) {
        Err(e) => Err(e),
        Ok(()) => match endpoint {
            "publish" => publish(req, &shared).await.map(ok),
            "broadcast" => broadcast(req, &shared).await,
            "disconnect" => disconnect(req, &shared).await.map(ok),
            "stats" => Ok(ok(stats(&shared).await)),
            "presence" => presence(&req, &shared).await.map(ok),
            _ => Err(ApiError::new(
                ErrorCode::BadRequest,
                "no such endpoint or method",
            )),
        },
    };
    let response = match result {
        Ok((status, body)) => json(status, &body),
        Err(e) => {
            let status = if let Some(status) = e.status {
                status
            } else if endpoint == "unknown" && e.code == ErrorCode::BadRequest {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::from_u16(e.code.http_status())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            };
            json(
                status,
                &serde_json::json!({"error": {"code": e.code.as_str(), "message": e.message}}),
            )
        }
    };
    let mut response = response;
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        // The rest of the body is not worth waiting for: the connection goes.
        response.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    metrics::counter!(m::API_REQUESTS_TOTAL, "endpoint" => endpoint, "status" => response.status().as_str().to_string())
        .increment(1);
    response
}

fn ok(body: serde_json::Value) -> (StatusCode, serde_json::Value) {
    (StatusCode::OK, body)
}

fn authorize(req: &Request<Incoming>, shared: &Shared) -> Result<(), ApiError> {
    let Some(expected) = &shared.settings.admin_token else {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "the server API is disabled: set --admin-token / FANOUT_ADMIN_TOKEN",
        ));
    };
    match bearer(req.headers().get(AUTHORIZATION)) {
        Some(given) if constant_time_eq(given.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(ErrorCode::Unauthorized, "wrong admin token")),
        None => Err(ApiError::new(
            ErrorCode::Unauthorized,
            "send `Authorization: Bearer <admin token>`",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn body<T: for<'de> Deserialize<'de>>(
    req: Request<Incoming>,
    shared: &Shared,
) -> Result<T, ApiError> {
    let limits = &shared.settings.limits;
    let within = std::time::Duration::from_secs(limits.api_body_timeout_secs);
    read_json(req, limits.max_api_body, within)
        .await
        .map_err(|(status, code, message)| ApiError {
            status: Some(status),
            ..ApiError::new(code, message)
        })
}

/// A publish request's idempotency key: the `Idempotency-Key` header (taken before the
/// body is read) and the body's `idempotency_key`, as one key.
fn idempotency_key(
    header: Option<HeaderValue>,
    body: Option<String>,
) -> Result<Option<String>, ApiError> {
    let max = fanout_publisher::MAX_IDEMPOTENCY_KEY_LEN;
    let key = crate::commands::request_key(header.as_ref(), body, max)
        .map_err(|r| ApiError::new(r.code, r.message))?;
    // Client keys are recorded as `c:<user tag>:<key>`: a server key never takes that form.
    match key {
        Some(k) if k.starts_with(crate::commands::CLIENT_KEY_PREFIX) => Err(ApiError::new(
            ErrorCode::BadRequest,
            "idempotency keys starting with `c:` are reserved for client publishes",
        )),
        k => Ok(k),
    }
}

async fn publish_one(
    shared: &Shared,
    channel: &str,
    event: Option<&str>,
    data: &RawValue,
    key: Option<&str>,
) -> Result<serde_json::Value, ApiError> {
    let parsed = shared
        .settings
        .namespaces
        .parse(channel)
        .map_err(|r| ApiError::new(r.code, r.message))?;
    let history = shared.settings.namespaces.for_channel(&parsed).history;
    // Answered at once rather than after a command timeout while Redis is away.
    if !shared.broker.is_ready() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "the broker is unavailable; nothing was published",
        ));
    }
    let ack = shared
        .broker
        .publish(channel, event, data, history, key)
        .await?;
    if ack.duplicate {
        return Ok(
            serde_json::json!({"offset": ack.offset, "epoch": ack.epoch, "duplicate": true}),
        );
    }
    metrics::counter!(m::PUBLISHES_TOTAL, "source" => "api").increment(1);
    Ok(serde_json::json!({"offset": ack.offset, "epoch": ack.epoch}))
}

async fn publish(req: Request<Incoming>, shared: &Shared) -> Result<serde_json::Value, ApiError> {
    let header = req.headers().get("idempotency-key").cloned();
    let b: PublishBody = body(req, shared).await?;
    let key = idempotency_key(header, b.idempotency_key)?;
    publish_one(
        shared,
        &b.channel,
        b.event.as_deref(),
        &b.data,
        key.as_deref(),
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    channels: Vec<String>,
    data: Box<RawValue>,
    #[serde(default)]
    event: Option<String>,
    /// *Extension*: one key for the whole broadcast, applied at most once per channel,
    /// so that resending a broadcast publishes only what did not go out.
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// 200 when every channel was published; otherwise 503 with the same per-channel
/// results, so a retry can skip what was published.
async fn broadcast(
    req: Request<Incoming>,
    shared: &Shared,
) -> Result<(StatusCode, serde_json::Value), ApiError> {
    let header = req.headers().get("idempotency-key").cloned();
    let b: BroadcastBody = body(req, shared).await?;
    let key = idempotency_key(header, b.idempotency_key.clone())?;
    if b.channels.is_empty() || b.channels.len() > 1000 {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "`channels` must list 1 to 1000 channels",
        ));
    }
    // Validate all before publishing any, so a typo does not publish half a broadcast.
    for c in &b.channels {
        shared
            .settings
            .namespaces
            .parse(c)
            .map_err(|r| ApiError::new(r.code, format!("{c}: {}", r.message)))?;
    }
    if !shared.broker.is_ready() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "the broker is unavailable; nothing was published",
        ));
    }
    // The answer says per channel what happened, so that a retry can skip what was
    // published. After the broker fails once, the rest are not attempted (each attempt
    // would wait for the command timeout).
    let mut results = Vec::with_capacity(b.channels.len());
    let mut failed = 0;
    let mut broker_down = false;
    for c in &b.channels {
        if broker_down {
            failed += 1;
            results.push(serde_json::json!({"channel": c, "error": {"code": "unavailable", "message": "not attempted: the broker failed earlier in this broadcast"}}));
            continue;
        }
        match publish_one(shared, c, b.event.as_deref(), &b.data, key.as_deref()).await {
            Ok(mut r) => {
                r["channel"] = c.clone().into();
                results.push(r);
            }
            Err(e) => {
                failed += 1;
                broker_down |= e.code == ErrorCode::Unavailable;
                results.push(serde_json::json!({"channel": c, "error": {"code": e.code.as_str(), "message": e.message}}));
            }
        }
    }
    let status = if failed == 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((
        status,
        serde_json::json!({"results": results, "failed": failed}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    user: String,
    #[serde(default)]
    reason: Option<String>,
}

async fn disconnect(
    req: Request<Incoming>,
    shared: &Shared,
) -> Result<serde_json::Value, ApiError> {
    let b: DisconnectBody = body(req, shared).await?;
    // This node at once; every other node through the control channel.
    let n = shared.disconnect_user(&b.user);
    tracing::info!(user = %b.user, reason = b.reason.as_deref().unwrap_or(""), connections = n, "admin disconnect");
    let message = ControlMessage::Disconnect {
        from: shared.instance.clone(),
        user: b.user.clone(),
        reason: b.reason.clone(),
    };
    let nodes = shared
        .broker
        .broadcast_control(&serde_json::to_string(&message).expect("serializable"))
        .await
        .map_err(|e| {
            ApiError::new(
                ErrorCode::Unavailable,
                format!("closed {n} connection(s) on this node, but other nodes could not be reached: {e}"),
            )
        })?;
    Ok(
        serde_json::json!({"disconnected": n, "node": shared.settings.node_id, "nodes_notified": nodes}),
    )
}

/// This node's figures (also what it reports to the cluster view).
/// `GET /api/presence?channel=…` → `{channel, clients:[{client, user, node}…]}`.
async fn presence(req: &Request<Incoming>, shared: &Shared) -> Result<serde_json::Value, ApiError> {
    let name = query_param(req.uri().query(), "channel")
        .ok_or_else(|| ApiError::new(ErrorCode::BadRequest, "`channel` query parameter missing"))?;
    let channel = shared
        .settings
        .namespaces
        .parse(&name)
        .map_err(|r| ApiError::new(r.code, r.message))?;
    if !shared.settings.namespaces.for_channel(&channel).presence {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "presence is not enabled for namespace `{}`",
                channel.namespace()
            ),
        ));
    }
    let clients = shared.presence.list(&name).await?;
    Ok(serde_json::json!({"channel": name, "clients": clients}))
}

async fn stats(shared: &Shared) -> serde_json::Value {
    let node = shared.stats();
    let cluster = match shared.broker.reports().await {
        Ok(reports) => {
            let mut nodes: Vec<serde_json::Value> = reports
                .iter()
                .filter_map(|r| serde_json::from_str(r).ok())
                .collect();
            nodes.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
            let sum = |field: &str| -> u64 { nodes.iter().filter_map(|n| n[field].as_u64()).sum() };
            serde_json::json!({
                "nodes": nodes.len(),
                "connections": sum("connections"),
                "subscriptions": sum("subscriptions"),
                "members": nodes,
            })
        }
        Err(e) => serde_json::json!({"error": {"code": "unavailable", "message": e.to_string()}}),
    };
    serde_json::json!({"node": node, "cluster": cluster})
}
