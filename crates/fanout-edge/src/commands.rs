//! The client commands that do not need a session's state beyond who the client is
//! and whether it is subscribed: `publish` and `presence`. One implementation, for a
//! WebSocket session's frames and for `/client/*` over plain HTTP, so that both obey
//! the same namespace rules and give the same errors.

use fanout_protocol::ErrorCode;
use fanout_publisher::PublishAck;
use hyper::header::HeaderValue;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::Principal;
use crate::broker::BrokerError;
use crate::metrics as m;
use crate::rules::{Grant, Refusal};
use crate::shared::Shared;

/// The JSON body of a publish over HTTP: `POST /api/publish` (the server's) and
/// `POST /client/publish` (a user's).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishBody {
    pub channel: String,
    pub data: Box<RawValue>,
    #[serde(default)]
    pub event: Option<String>,
    /// *Extension*: applied at most once per channel within the dedup window; also
    /// accepted as the `Idempotency-Key` header.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// The longest idempotency key a client may send: the edge prefixes it with the
/// user's tag ([`client_key`]), and the whole must stay within the publisher's limit.
pub(crate) const MAX_CLIENT_KEY_LEN: usize = 64;

/// The idempotency key of an HTTP publish: the `idempotency_key` body field or the
/// `Idempotency-Key` header (both only if equal), at most `max_len` printable ASCII
/// characters without spaces.
pub(crate) fn request_key(
    header: Option<&HeaderValue>,
    body: Option<String>,
    max_len: usize,
) -> Result<Option<String>, Refusal> {
    let bad = |message: String| Refusal {
        code: ErrorCode::BadRequest,
        message,
    };
    let header = match header.map(HeaderValue::to_str) {
        None => None,
        Some(Ok(h)) => Some(h.to_string()),
        Some(Err(_)) => {
            return Err(bad(
                "the Idempotency-Key header is not printable ASCII".into()
            ))
        }
    };
    let key = match (header, body) {
        (Some(h), Some(b)) if h != b => {
            return Err(bad(
                "the Idempotency-Key header and the idempotency_key field differ".into(),
            ))
        }
        (h, b) => b.or(h),
    };
    match key {
        Some(k) if !valid_key(&k, max_len) => Err(bad(format!(
            "an idempotency key is 1 to {max_len} printable ASCII characters without spaces"
        ))),
        k => Ok(k),
    }
}

fn valid_key(key: &str, max_len: usize) -> bool {
    key.len() <= max_len && fanout_publisher::valid_idempotency_key(key)
}

/// The key a client's publish is recorded under: scoped to its user, so that one
/// user's keys can never answer (or suppress) another user's or a server's publish.
/// FNV-1a rather than std's hasher, whose output may change between Rust releases
/// and so between the nodes of a rolling deploy.
pub(crate) fn client_key(user: &str, key: &str) -> String {
    let tag = user.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{CLIENT_KEY_PREFIX}{tag:016x}:{key}")
}

/// What every client key starts with once scoped; refused on server publishes.
pub(crate) const CLIENT_KEY_PREFIX: &str = "c:";

/// A client's `publish`: what to publish and under which key (`None`: a fresh one).
pub(crate) struct Publish<'a> {
    pub channel: &'a str,
    pub data: &'a RawValue,
    pub event: Option<&'a str>,
    pub key: Option<&'a str>,
}

/// `publish {channel, data, event?, idempotency_key?}` by `principal` (`subscribed`:
/// the client is subscribed to the channel, for namespaces where only subscribers
/// publish). A key already applied on the channel answers the first publish's position
/// with `duplicate` set and publishes nothing.
pub(crate) async fn publish(
    shared: &Shared,
    principal: &Principal,
    request: Publish<'_>,
    subscribed: bool,
) -> Result<PublishAck, Refusal> {
    let namespaces = &shared.settings.namespaces;
    let channel = namespaces.parse(request.channel)?;
    namespaces.check_publish(principal, &channel, subscribed)?;
    let key = match request.key {
        Some(k) if !valid_key(k, MAX_CLIENT_KEY_LEN) => {
            return Err(Refusal {
                code: ErrorCode::BadRequest,
                message: format!(
                    "an idempotency key is 1 to {MAX_CLIENT_KEY_LEN} printable ASCII characters without spaces"
                ),
            })
        }
        Some(k) => Some(client_key(&principal.user, k)),
        None => None,
    };
    let history = namespaces.for_channel(&channel).history;
    if !shared.broker.is_ready() {
        return Err(Refusal {
            code: ErrorCode::Unavailable,
            message: "the broker is unavailable; nothing was published".into(),
        });
    }
    let published = shared
        .broker
        .publish(
            request.channel,
            request.event,
            request.data,
            history,
            key.as_deref(),
        )
        .await;
    match published {
        Ok(ack) => {
            if !ack.duplicate {
                metrics::counter!(m::PUBLISHES_TOTAL, "source" => "client").increment(1);
            }
            Ok(ack)
        }
        Err(BrokerError::Invalid(message)) => Err(Refusal {
            code: ErrorCode::BadRequest,
            message,
        }),
        Err(error) => {
            // Broker details (hosts, errors) stay in the log.
            tracing::warn!(user = %principal.user, %error, "client publish failed");
            Err(unavailable())
        }
    }
}

/// `presence {channel}`: who is subscribed, on every node. Allowed to subscribers of
/// the channel and to whoever may subscribe to it.
pub(crate) async fn presence(
    shared: &Shared,
    principal: &Principal,
    name: &str,
    subscribed: bool,
) -> Result<Vec<serde_json::Value>, Refusal> {
    let namespaces = &shared.settings.namespaces;
    let channel = namespaces.parse(name)?;
    if !namespaces.for_channel(&channel).presence {
        return Err(Refusal {
            code: ErrorCode::BadRequest,
            message: format!(
                "presence is not enabled for namespace `{}`",
                channel.namespace()
            ),
        });
    }
    if !subscribed {
        namespaces.check_subscribe(principal, &channel, Grant::None)?;
    }
    shared.presence.list(name).await.map_err(|error| {
        tracing::warn!(user = %principal.user, %error, "presence read failed");
        unavailable()
    })
}

fn unavailable() -> Refusal {
    Refusal {
        code: ErrorCode::Unavailable,
        message: "the broker is unavailable; retry shortly".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_comes_from_the_body_or_the_header_and_both_must_agree() {
        let h = HeaderValue::from_static("k1");
        assert_eq!(request_key(None, None, 128).unwrap(), None);
        assert_eq!(
            request_key(Some(&h), None, 128).unwrap().as_deref(),
            Some("k1")
        );
        assert_eq!(
            request_key(None, Some("k2".into()), 128)
                .unwrap()
                .as_deref(),
            Some("k2")
        );
        assert_eq!(
            request_key(Some(&h), Some("k1".into()), 128)
                .unwrap()
                .as_deref(),
            Some("k1")
        );
        let differ = request_key(Some(&h), Some("k2".into()), 128).unwrap_err();
        assert_eq!(differ.code, ErrorCode::BadRequest);
        assert!(differ.message.contains("differ"), "{}", differ.message);
    }

    #[test]
    fn a_key_is_printable_ascii_within_the_length_limit() {
        for bad in ["", "a b", "é", &"k".repeat(65)] {
            let e = request_key(None, Some(bad.to_string()), 64).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{bad:?}");
            assert!(e.message.contains("1 to 64"), "{}", e.message);
        }
        assert!(request_key(None, Some("k".repeat(64)), 64).is_ok());
        let not_ascii = HeaderValue::from_bytes(b"k\xff").unwrap();
        assert_eq!(
            request_key(Some(&not_ascii), None, 64).unwrap_err().code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn a_client_key_is_scoped_to_its_user_and_fits_the_publisher_limit() {
        let a = client_key("alice", "k1");
        assert_eq!(a, client_key("alice", "k1"), "the same on every node");
        assert_ne!(a, client_key("bob", "k1"));
        assert_ne!(a, client_key("alice", "k2"));
        let longest = client_key(&"u".repeat(1000), &"k".repeat(MAX_CLIENT_KEY_LEN));
        assert!(
            fanout_publisher::valid_idempotency_key(&longest),
            "{longest}"
        );
        // Fixed, so that nodes of different builds agree during a rolling deploy.
        assert_eq!(client_key("", "k"), "c:cbf29ce484222325:k");
    }
}
