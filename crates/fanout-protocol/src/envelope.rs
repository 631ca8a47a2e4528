//! The envelope: what travels on a Redis channel. Publishers that go through fanout
//! (crate, CLI, HTTP API) send
//! `{"offset":18,"epoch":"…","fanout":1,"ts":1732290000123,"event":"progress","data":{…}}`;
//! anything else on the channel (a plain `PUBLISH job_progress:7 '{"pct":40}'`) is
//! delivered as `data` without offset, stamped with the time it arrived.
//!
//! An envelope is decoded once per Redis message, and its client frame encoded once per
//! codec; see [`Envelope::encode_message`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

use crate::{Codec, ServerFrame};

/// The value of the `fanout` marker field of the current envelope layout.
pub const ENVELOPE_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum EnvelopeError {
    #[error("data is not valid JSON: {0}")]
    Data(#[from] serde_json::Error),
}

/// One publication.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub data: Box<RawValue>,
    pub event: Option<String>,
    pub offset: Option<u64>,
    pub epoch: Option<String>,
    /// Publish time, ms since the Unix epoch.
    pub ts: u64,
    /// `join` / `leave`: a presence notice (its data is the client's info), sent to
    /// clients as a `join` / `leave` frame instead of a `message`; never has an offset.
    pub notice: Option<Notice>,
}

/// What a presence notice announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Notice {
    Join,
    Leave,
}

#[derive(Deserialize)]
struct Wire<'a> {
    fanout: Option<u32>,
    // Present-but-null must stay data (`null`), not read as "absent".
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    epoch: Option<String>,
    #[serde(default)]
    ts: Option<u64>,
    #[serde(default)]
    notice: Option<Notice>,
}

#[derive(Serialize)]
struct Body<'a> {
    fanout: u32,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    data: &'a RawValue,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Whether `data` marks the end of a job: an object whose `status` is `succeeded`,
/// `failed` or `cancelled`.
pub fn data_is_terminal(data: &RawValue) -> bool {
    #[derive(Deserialize)]
    struct Status<'a> {
        #[serde(borrow, default)]
        status: Option<&'a str>,
    }
    if !data.get().starts_with('{') {
        return false;
    }
    serde_json::from_str::<Status<'_>>(data.get())
        .ok()
        .and_then(|s| s.status)
        .is_some_and(|s| crate::TERMINAL_STATUSES.contains(&s))
}

impl Envelope {
    /// Decodes a Redis payload. Never fails: a payload that is not a fanout envelope is
    /// the data itself, and one that is not JSON at all is delivered as a JSON string.
    /// `received_ms` stamps payloads that carry no `ts`.
    pub fn decode(payload: &[u8], received_ms: u64) -> Envelope {
        // Only an object can be an envelope (serde would also read a struct from an array).
        let is_object = payload
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{');
        if let Some(wire) = is_object
            .then(|| serde_json::from_slice::<Wire<'_>>(payload).ok())
            .flatten()
        {
            if wire.fanout == Some(ENVELOPE_VERSION) {
                if let Some(data) = wire.data {
                    return Envelope {
                        data: data.to_owned(),
                        event: wire.event,
                        offset: wire.offset,
                        epoch: wire.epoch,
                        ts: wire.ts.unwrap_or(received_ms),
                        // A notice never carries a position.
                        notice: wire.notice.filter(|_| wire.offset.is_none()),
                    };
                }
            }
        }
        let data = match serde_json::from_slice::<&RawValue>(payload) {
            Ok(raw) => raw.to_owned(),
            Err(_) => {
                let text = String::from_utf8_lossy(payload);
                RawValue::from_string(serde_json::to_string(&text).expect("strings serialize"))
                    .expect("a JSON string is valid JSON")
            }
        };
        Envelope {
            data,
            event: None,
            offset: None,
            epoch: None,
            ts: received_ms,
            notice: None,
        }
    }

    /// The payload of a presence notice: `{"fanout":1,"ts":…,"notice":"join","data":info}`.
    pub fn encode_notice(notice: Notice, info: &RawValue, ts: u64) -> String {
        #[derive(Serialize)]
        struct NoticeBody<'a> {
            fanout: u32,
            ts: u64,
            notice: Notice,
            data: &'a RawValue,
        }
        serde_json::to_string(&NoticeBody {
            fanout: ENVELOPE_VERSION,
            ts,
            notice,
            data: info,
        })
        .expect("notice serializes")
    }

    /// The body a publisher hands to the publish script: the envelope without `offset`
    /// and `epoch`, which the script prepends. Starts with `{"fanout":1,`.
    pub fn encode_body(event: Option<&str>, data: &RawValue, ts: u64) -> String {
        serde_json::to_string(&Body {
            fanout: ENVELOPE_VERSION,
            ts,
            event,
            data,
        })
        .expect("envelope serializes")
    }

    /// The whole envelope as JSON, as the publish script produces it.
    pub fn encode(&self) -> String {
        let body = Self::encode_body(self.event.as_deref(), &self.data, self.ts);
        match (self.offset, &self.epoch) {
            (Some(offset), Some(epoch)) => {
                format!(r#"{{"offset":{offset},"epoch":"{epoch}",{}"#, &body[1..])
            }
            _ => body,
        }
    }

    /// Whether the data marks the end of a job: an object whose `status` is terminal.
    pub fn is_terminal(&self) -> bool {
        data_is_terminal(&self.data)
    }

    /// Encodes the `message` frame for `channel` in one codec. Called once per codec per
    /// message; the bytes are then shared by every subscriber.
    pub fn encode_message(&self, channel: &str, codec: Codec) -> Bytes {
        if let Some(notice) = self.notice {
            let frame = match notice {
                Notice::Join => ServerFrame::Join {
                    channel,
                    info: &self.data,
                },
                Notice::Leave => ServerFrame::Leave {
                    channel,
                    info: &self.data,
                },
            };
            return match codec {
                Codec::Json => codec.encode(&frame),
                // RawValue only serializes into JSON: through a Value for MessagePack.
                Codec::MsgPack => {
                    codec.encode(&serde_json::to_value(&frame).unwrap_or(serde_json::Value::Null))
                }
            };
        }
        let frame = ServerFrame::Message {
            channel,
            data: &self.data,
            offset: self.offset,
            epoch: self.epoch.as_deref(),
            event: self.event.as_deref(),
            ts: self.ts,
        };
        match codec {
            Codec::Json => codec.encode(&frame),
            Codec::MsgPack => {
                // RawValue only serializes as itself into JSON: go through a Value once.
                // Data nested deeper than serde_json's limit (128) cannot become a Value;
                // it is sent as its JSON text, flagged with `data_encoding: "json"`.
                let (data, data_encoding) = match serde_json::from_str(self.data.get()) {
                    Ok(value) => (value, None),
                    Err(_) => (
                        serde_json::Value::String(self.data.get().to_string()),
                        Some("json"),
                    ),
                };
                #[derive(Serialize)]
                struct MsgPackMessage<'a> {
                    r#type: &'static str,
                    channel: &'a str,
                    data: serde_json::Value,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    data_encoding: Option<&'static str>,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    offset: Option<u64>,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    epoch: Option<&'a str>,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    event: Option<&'a str>,
                    ts: u64,
                }
                codec.encode(&MsgPackMessage {
                    r#type: "message",
                    channel,
                    data,
                    data_encoding,
                    offset: self.offset,
                    epoch: self.epoch.as_deref(),
                    event: self.event.as_deref(),
                    ts: self.ts,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_full_envelope() {
        let e = Envelope::decode(
            br#"{"offset":18,"epoch":"e1","fanout":1,"ts":5,"event":"progress","data":{"pct":40}}"#,
            99,
        );
        assert_eq!(e.offset, Some(18));
        assert_eq!(e.epoch.as_deref(), Some("e1"));
        assert_eq!(e.event.as_deref(), Some("progress"));
        assert_eq!(e.ts, 5);
        assert_eq!(e.data.get(), r#"{"pct":40}"#);
    }

    #[test]
    fn null_data_is_data() {
        let e = Envelope::decode(
            br#"{"offset":1,"epoch":"A","fanout":1,"ts":0,"data":null}"#,
            9,
        );
        assert_eq!((e.data.get(), e.offset), ("null", Some(1)));
    }

    #[test]
    fn plain_json_is_data() {
        let e = Envelope::decode(br#"{"pct":40,"data":1}"#, 99);
        assert_eq!(e.data.get(), r#"{"pct":40,"data":1}"#);
        assert_eq!(e.offset, None);
        assert_eq!(e.ts, 99);
        let e = Envelope::decode(b"[1,2]", 1);
        assert_eq!(e.data.get(), "[1,2]");
    }

    #[test]
    fn non_json_becomes_a_string() {
        let e = Envelope::decode(b"hello \"world\"", 1);
        let v: serde_json::Value = serde_json::from_str(e.data.get()).unwrap();
        assert_eq!(v, json!("hello \"world\""));
    }

    #[test]
    fn body_plus_script_prefix_is_an_envelope() {
        let data = RawValue::from_string(r#"{"a":[1,2]}"#.into()).unwrap();
        let body = Envelope::encode_body(Some("ev"), &data, 7);
        assert!(body.starts_with(r#"{"fanout":1,"#));
        // What the publish script does:
        let full = format!(r#"{{"offset":3,"epoch":"zz",{}"#, &body[1..]);
        let e = Envelope::decode(full.as_bytes(), 0);
        assert_eq!(
            (e.offset, e.epoch.as_deref(), e.ts),
            (Some(3), Some("zz"), 7)
        );
        assert_eq!(e.encode(), full);
    }

    #[test]
    fn encodes_message_frames_in_both_codecs() {
        let e = Envelope::decode(
            br#"{"offset":2,"epoch":"x","fanout":1,"ts":5,"data":{"n":1}}"#,
            0,
        );
        let json_frame: serde_json::Value =
            serde_json::from_slice(&e.encode_message("user:1", Codec::Json)).unwrap();
        let expected = json!({"type":"message","channel":"user:1","data":{"n":1},"offset":2,"epoch":"x","ts":5});
        assert_eq!(json_frame, expected);
        let mp: serde_json::Value =
            rmp_serde::from_slice(&e.encode_message("user:1", Codec::MsgPack)).unwrap();
        assert_eq!(mp, expected);
    }

    #[test]
    fn deeply_nested_data_never_panics() {
        let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
        let e = Envelope::decode(deep.as_bytes(), 0);
        assert_eq!(e.data.get(), deep);
        // JSON subscribers get the data verbatim (the frame is valid JSON, just deeper
        // than serde_json's own default parse limit).
        let raw = e.encode_message("c:1", Codec::Json);
        assert!(std::str::from_utf8(&raw).unwrap().contains(&deep));
        let mp: serde_json::Value =
            rmp_serde::from_slice(&e.encode_message("c:1", Codec::MsgPack)).unwrap();
        assert_eq!(mp["data_encoding"], "json");
        assert_eq!(mp["data"], json!(deep));
    }

    #[test]
    fn terminal_status() {
        assert!(Envelope::decode(br#"{"status":"failed"}"#, 0).is_terminal());
        assert!(!Envelope::decode(br#"{"status":"running"}"#, 0).is_terminal());
        assert!(!Envelope::decode(br#""succeeded""#, 0).is_terminal());
    }
}
