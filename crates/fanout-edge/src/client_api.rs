//! Client commands over plain HTTP, for what a receive-only transport (an event
//! stream) cannot carry: `POST /client/publish {channel, data, event?,
//! idempotency_key?}` → `{offset, epoch, duplicate?}` and `GET /client/presence?channel=…` → `{channel, clients}`.
//! Authorized by the user's connection token (`Authorization: Bearer …`), under the
//! same namespace rules as the WebSocket commands ([`crate::commands`]) and the same
//! rate limit, counted per user. Errors are `{"error":{"code","message"}}` with the
//! code's HTTP status. Browsers on allowed origins get CORS answers, preflight
//! included.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::Principal;
use crate::commands::{request_key, Publish, PublishBody, MAX_CLIENT_KEY_LEN};
use crate::metrics as m;
use crate::respond::{
    bearer, cors, error_json, json, origin_allowed, preflight, principal, query_param, read_json,
    Body, Refused,
};
use crate::rules::Refusal;
use crate::shared::Shared;
use fanout_protocol::ErrorCode;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, ORIGIN};
use hyper::{Method, Request, Response, StatusCode};

fn from_rules(r: Refusal) -> Refused {
    let status = StatusCode::from_u16(r.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    (status, r.code, r.message)
}

pub(crate) async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Body> {
    let origin = req
        .headers()
        .get(ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let endpoint = match req.uri().path() {
        "/client/publish" => "publish",
        "/client/presence" => "presence",
        _ => "unknown",
    };
    let result = if !origin_allowed(&shared, origin.as_deref()) {
        Err((
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "origin not allowed".to_string(),
        ))
    } else {
        match (req.method(), endpoint) {
            (&Method::OPTIONS, "publish" | "presence") => Ok(preflight()),
            (&Method::POST, "publish") => publish(req, &shared).await,
            (&Method::GET, "presence") => presence(req, &shared).await,
            (_, "unknown") => Err((
                StatusCode::NOT_FOUND,
                ErrorCode::BadRequest,
                "no such endpoint".to_string(),
            )),
            _ => Err((
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::BadRequest,
                "POST /client/publish, GET /client/presence".to_string(),
            )),
        }
    };
    let mut response = match result {
        Ok(response) => response,
        Err((status, code, message)) => {
            metrics::counter!(m::CLIENT_ERRORS_TOTAL, "code" => code.as_str()).increment(1);
            error_json(status, code, &message)
        }
    };
    cors(response.headers_mut(), &shared, origin.as_deref());
    metrics::counter!(m::CLIENT_HTTP_REQUESTS_TOTAL, "endpoint" => endpoint, "status" => response.status().as_str().to_string())
        .increment(1);
    response
}

/// The request's user, from its token, if its rate limit lets it through.
fn authorize(req: &Request<Incoming>, shared: &Shared) -> Result<Principal, Refused> {
    let token = bearer(req.headers().get(AUTHORIZATION));
    let principal = principal(shared, token, "`Authorization: Bearer …`")?;
    if !shared.client_buckets.take(&principal.user) {
        return Err((
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            "too many requests; slow down".into(),
        ));
    }
    Ok(principal)
}

async fn publish(req: Request<Incoming>, shared: &Shared) -> Result<Response<Body>, Refused> {
    let principal = authorize(&req, shared)?;
    let limits = &shared.settings.limits;
    let within = Duration::from_secs(limits.api_body_timeout_secs);
    let header = req.headers().get("idempotency-key").cloned();
    let body: PublishBody = read_json(req, limits.max_message_size, within).await?;
    let key = request_key(header.as_ref(), body.idempotency_key, MAX_CLIENT_KEY_LEN)
        .map_err(from_rules)?;
    metrics::counter!(m::CLIENT_FRAMES_TOTAL, "type" => "publish").increment(1);
    // Over HTTP there is no subscription to look at: for a namespace where
    // subscribers publish, whoever may subscribe may publish.
    let namespaces = &shared.settings.namespaces;
    let may_subscribe = namespaces.parse(&body.channel).is_ok_and(|c| {
        namespaces
            .check_subscribe(&principal, &c, crate::rules::Grant::None)
            .is_ok()
    });
    let request = Publish {
        channel: &body.channel,
        data: &body.data,
        event: body.event.as_deref(),
        key: key.as_deref(),
    };
    let ack = crate::commands::publish(shared, &principal, request, may_subscribe)
        .await
        .map_err(from_rules)?;
    let mut answer = serde_json::json!({"offset": ack.offset, "epoch": ack.epoch});
    if ack.duplicate {
        answer["duplicate"] = true.into();
    }
    Ok(json(StatusCode::OK, &answer))
}

async fn presence(req: Request<Incoming>, shared: &Shared) -> Result<Response<Body>, Refused> {
    let principal = authorize(&req, shared)?;
    let Some(channel) = query_param(req.uri().query(), "channel") else {
        return Err((
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "`channel` query parameter missing".into(),
        ));
    };
    metrics::counter!(m::CLIENT_FRAMES_TOTAL, "type" => "presence").increment(1);
    let clients = crate::commands::presence(shared, &principal, &channel, false)
        .await
        .map_err(from_rules)?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"channel": channel, "clients": clients}),
    ))
}
