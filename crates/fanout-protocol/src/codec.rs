//! The two encodings of the same frames: `fanout.json` (text frames) and
//! `fanout.msgpack` (binary frames, maps with field names so the shape is identical).

use bytes::Bytes;
use serde::Serialize;
use thiserror::Error;

use crate::frame::{ClientFrame, FrameId};

/// A decoded client frame with the `id` it carried.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedFrame {
    pub id: Option<FrameId>,
    pub frame: ClientFrame,
}

/// Why a client frame could not be decoded. The `id` is kept when the frame got far
/// enough to have one, so the `bad_request` error can echo it.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{message}")]
pub struct DecodeError {
    pub id: Option<FrameId>,
    pub message: String,
}

impl DecodeError {
    fn new(id: Option<FrameId>, message: impl Into<String>) -> Self {
        DecodeError {
            id,
            message: message.into(),
        }
    }
}

/// The subprotocol of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    Json,
    MsgPack,
}

impl Codec {
    pub const JSON_PROTOCOL: &'static str = "fanout.json";
    pub const MSGPACK_PROTOCOL: &'static str = "fanout.msgpack";

    /// Picks the codec from a `Sec-WebSocket-Protocol` offer list: the first protocol we
    /// know, or JSON when none is offered.
    pub fn negotiate(offered: Option<&str>) -> Option<Codec> {
        let Some(offered) = offered else {
            return Some(Codec::Json);
        };
        offered.split(',').map(str::trim).find_map(|p| match p {
            Self::JSON_PROTOCOL => Some(Codec::Json),
            Self::MSGPACK_PROTOCOL => Some(Codec::MsgPack),
            _ => None,
        })
    }

    pub fn protocol(self) -> &'static str {
        match self {
            Codec::Json => Self::JSON_PROTOCOL,
            Codec::MsgPack => Self::MSGPACK_PROTOCOL,
        }
    }

    /// Whether frames travel as WebSocket binary (MessagePack) or text (JSON).
    pub fn is_binary(self) -> bool {
        matches!(self, Codec::MsgPack)
    }

    /// Decodes one client frame. Malformed input, an unknown `type` and a missing field
    /// all come back as a [`DecodeError`] with a message naming the problem.
    pub fn decode_client(self, bytes: &[u8]) -> Result<DecodedFrame, DecodeError> {
        let value: serde_json::Value = match self {
            Codec::Json => serde_json::from_slice(bytes)
                .map_err(|e| DecodeError::new(None, format!("malformed JSON: {e}")))?,
            Codec::MsgPack => rmp_serde::from_slice(bytes)
                .map_err(|e| DecodeError::new(None, format!("malformed MessagePack: {e}")))?,
        };
        let serde_json::Value::Object(map) = value else {
            return Err(DecodeError::new(None, "a frame must be an object"));
        };
        let id = match map.get("id") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => match FrameId::deserialize_from(v) {
                Some(id) => Some(id),
                None => {
                    return Err(DecodeError::new(
                        None,
                        "`id` must be a non-negative integer or a string of at most 64 bytes",
                    ))
                }
            },
        };
        if !map.contains_key("type") {
            return Err(DecodeError::new(id, "missing field `type`"));
        }
        match serde_json::from_value::<ClientFrame>(serde_json::Value::Object(map)) {
            Ok(frame) => Ok(DecodedFrame { id, frame }),
            Err(e) => Err(DecodeError::new(id, describe(&e))),
        }
    }

    /// Encodes any serializable frame.
    pub fn encode<T: Serialize>(self, frame: &T) -> Bytes {
        match self {
            Codec::Json => Bytes::from(serde_json::to_vec(frame).expect("frames serialize")),
            Codec::MsgPack => {
                Bytes::from(rmp_serde::to_vec_named(frame).expect("frames serialize"))
            }
        }
    }
}

impl FrameId {
    fn deserialize_from(v: &serde_json::Value) -> Option<FrameId> {
        match v {
            serde_json::Value::Number(n) => n.as_u64().map(FrameId::Num),
            serde_json::Value::String(s) if s.len() <= 64 => Some(FrameId::Str(s.clone())),
            _ => None,
        }
    }
}

fn describe(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if let Some(rest) = text.strip_prefix("unknown variant ") {
        // "unknown variant `foo`, expected one of ..."
        let name = rest.split(',').next().unwrap_or(rest);
        return format!("unknown type {name}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{ServerFrame, Since};

    #[test]
    fn decodes_subscribe_with_id_and_since() {
        let f = Codec::Json
            .decode_client(br#"{"type":"subscribe","id":7,"channel":"user:1","since":{"offset":3,"epoch":"ab"}}"#)
            .unwrap();
        assert_eq!(f.id, Some(FrameId::Num(7)));
        assert_eq!(
            f.frame,
            ClientFrame::Subscribe {
                channel: "user:1".into(),
                token: None,
                since: Some(Since {
                    offset: 3,
                    epoch: "ab".into()
                }),
                last: None
            }
        );
    }

    #[test]
    fn malformed_unknown_and_missing_are_errors_with_id() {
        let e = Codec::Json.decode_client(b"{not json").unwrap_err();
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        let e = Codec::Json
            .decode_client(br#"{"type":"explode","id":"a"}"#)
            .unwrap_err();
        assert_eq!(e.id, Some(FrameId::Str("a".into())));
        assert_eq!(e.message, "unknown type `explode`");
        let e = Codec::Json
            .decode_client(br#"{"type":"subscribe","id":2}"#)
            .unwrap_err();
        assert_eq!(e.id, Some(FrameId::Num(2)));
        assert!(
            e.message.contains("missing field `channel`"),
            "{}",
            e.message
        );
        let e = Codec::Json.decode_client(br#"[1,2]"#).unwrap_err();
        assert_eq!(e.message, "a frame must be an object");
        let e = Codec::Json.decode_client(br#"{"id":1}"#).unwrap_err();
        assert_eq!(e.message, "missing field `type`");
        let e = Codec::Json
            .decode_client(br#"{"type":"ping","id":-1}"#)
            .unwrap_err();
        assert!(e.message.contains("`id` must be"));
    }

    #[test]
    fn msgpack_round_trip_has_same_shape() {
        #[derive(Serialize)]
        struct Sub<'a> {
            r#type: &'a str,
            id: u64,
            channel: &'a str,
        }
        let bytes = rmp_serde::to_vec_named(&Sub {
            r#type: "subscribe",
            id: 1,
            channel: "user:9",
        })
        .unwrap();
        let f = Codec::MsgPack.decode_client(&bytes).unwrap();
        assert_eq!(f.id, Some(FrameId::Num(1)));
        let pong = Codec::MsgPack.encode(&ServerFrame::Pong { id: f.id.as_ref() });
        let back: serde_json::Value = rmp_serde::from_slice(&pong).unwrap();
        assert_eq!(back, serde_json::json!({"type":"pong","id":1}));
    }

    #[test]
    fn negotiates_subprotocol() {
        assert_eq!(Codec::negotiate(None), Some(Codec::Json));
        assert_eq!(
            Codec::negotiate(Some("foo, fanout.msgpack")),
            Some(Codec::MsgPack)
        );
        assert_eq!(Codec::negotiate(Some("foo")), None);
    }
}
