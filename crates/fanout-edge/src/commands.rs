//! The client commands that do not need a session's state beyond who the client is
//! and whether it is subscribed: `publish` and `presence`. One implementation, for a
//! WebSocket session's frames and for `/client/*` over plain HTTP, so that both obey
//! the same namespace rules and give the same errors.

use fanout_protocol::ErrorCode;
use fanout_publisher::PublishAck;
use serde_json::value::RawValue;

use crate::auth::Principal;
use crate::broker::BrokerError;
use crate::metrics as m;
use crate::rules::{Grant, Refusal};
use crate::shared::Shared;

/// `publish {channel, data, event?}` by `principal` (`subscribed`: the client is
/// subscribed to the channel, for namespaces where only subscribers publish).
pub(crate) async fn publish(
    shared: &Shared,
    principal: &Principal,
    name: &str,
    data: &RawValue,
    event: Option<&str>,
    subscribed: bool,
) -> Result<PublishAck, Refusal> {
    let namespaces = &shared.settings.namespaces;
    let channel = namespaces.parse(name)?;
    namespaces.check_publish(principal, &channel, subscribed)?;
    let history = namespaces.for_channel(&channel).history;
    if !shared.broker.is_ready() {
        return Err(Refusal {
            code: ErrorCode::Unavailable,
            message: "the broker is unavailable; nothing was published".into(),
        });
    }
    match shared.broker.publish(name, event, data, history).await {
        Ok(ack) => {
            metrics::counter!(m::PUBLISHES_TOTAL, "source" => "client").increment(1);
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
