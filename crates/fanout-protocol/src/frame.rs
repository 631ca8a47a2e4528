//! Client and server frames (docs/protocol.md). Client frames are decoded into
//! [`ClientFrame`]; server frames are built as [`ServerFrame`] and encoded by a
//! [`Codec`](crate::Codec). The `message` frame of the hot path is encoded from an
//! [`Envelope`](crate::Envelope) instead, once per message.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The `id` a client puts on a frame; echoed verbatim in the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FrameId {
    Num(u64),
    Str(String),
}

/// Where a resubscribing client left off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Since {
    pub offset: u64,
    pub epoch: String,
}

/// A frame from the client.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Auth {
        token: String,
    },
    Subscribe {
        channel: String,
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        since: Option<Since>,
        #[serde(default)]
        last: Option<u32>,
    },
    Unsubscribe {
        channel: String,
    },
    Publish {
        channel: String,
        data: serde_json::Value,
        #[serde(default)]
        event: Option<String>,
        /// *Extension*: one key per logical publish, the same on every resend, so a
        /// publish resent after a lost connection is applied once.
        #[serde(default)]
        idempotency_key: Option<String>,
    },
    Ping,
    Refresh {
        token: String,
    },
    Presence {
        channel: String,
    },
}

impl ClientFrame {
    /// The frame's `type`, for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Auth { .. } => "auth",
            ClientFrame::Subscribe { .. } => "subscribe",
            ClientFrame::Unsubscribe { .. } => "unsubscribe",
            ClientFrame::Publish { .. } => "publish",
            ClientFrame::Ping => "ping",
            ClientFrame::Refresh { .. } => "refresh",
            ClientFrame::Presence { .. } => "presence",
        }
    }
}

/// What a `subscribed` frame reports about the channel's position.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SubscribedInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
}

/// A frame from the server. `Message` borrows its data so that the hot path can encode
/// straight from a decoded envelope.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Connected {
        client: &'a str,
        node: &'a str,
        user: &'a str,
        ping_interval: u64,
    },
    Subscribed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a FrameId>,
        channel: &'a str,
        #[serde(flatten)]
        info: SubscribedInfo,
    },
    Unsubscribed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a FrameId>,
        channel: &'a str,
        reason: &'a str,
    },
    Message {
        channel: &'a str,
        data: &'a RawValue,
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        event: Option<&'a str>,
        ts: u64,
    },
    /// A client subscribed to a channel of a `join_leave` namespace.
    Join {
        channel: &'a str,
        info: &'a RawValue,
    },
    /// A client left such a channel (unsubscribed or disconnected).
    Leave {
        channel: &'a str,
        info: &'a RawValue,
    },
    /// The answer to `presence {channel}`: every client subscribed on any node.
    Presence {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a FrameId>,
        channel: &'a str,
        clients: &'a [serde_json::Value],
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a FrameId>,
    },
    Reply {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a FrameId>,
        #[serde(skip_serializing_if = "Option::is_none", flatten)]
        extra: Option<&'a serde_json::Map<String, serde_json::Value>>,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a FrameId>,
        code: crate::ErrorCode,
        message: &'a str,
    },
}
