//! Properties of everything that decodes untrusted bytes: client frames, Redis payloads
//! and channel names. None of them may panic, whatever arrives, and what they accept
//! must round-trip.

use fanout_protocol::{Channel, Codec, Envelope};
use proptest::prelude::*;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Codec::Json.decode_client(&bytes);
        let _ = Codec::MsgPack.decode_client(&bytes);
        let e = Envelope::decode(&bytes, 1);
        // Whatever arrived, it becomes valid JSON data and encodes in both codecs.
        prop_assert!(serde_json::from_str::<&serde_json::value::RawValue>(e.data.get()).is_ok());
        let _ = e.encode_message("c:1", Codec::Json);
        let _ = e.encode_message("c:1", Codec::MsgPack);
    }

    #[test]
    fn any_json_payload_is_delivered_verbatim(data in json_value()) {
        let text = serde_json::to_string(&data).unwrap();
        let e = Envelope::decode(text.as_bytes(), 7);
        let is_envelope = data.get("fanout") == Some(&serde_json::json!(1)) && data.get("data").is_some();
        if !is_envelope {
            prop_assert_eq!(e.data.get(), text.as_str());
            prop_assert_eq!(e.offset, None);
        }
        let frame: serde_json::Value = serde_json::from_slice(&e.encode_message("c:1", Codec::Json)).unwrap();
        let back: serde_json::Value = rmp_serde::from_slice(&e.encode_message("c:1", Codec::MsgPack)).unwrap();
        prop_assert_eq!(frame, back);
    }

    #[test]
    fn envelopes_round_trip(data in json_value(), offset in 1u64.., ts in 0u64..u64::MAX / 2,
                            event in proptest::option::of("[a-z]{1,10}"), epoch in "[A-Za-z0-9]{1,16}") {
        let raw = serde_json::value::to_raw_value(&data).unwrap();
        let e = Envelope { data: raw, event, offset: Some(offset), epoch: Some(epoch), ts, notice: None };
        let d = Envelope::decode(e.encode().as_bytes(), 0);
        prop_assert_eq!(d.data.get(), e.data.get());
        prop_assert_eq!((d.offset, d.epoch, d.event, d.ts), (e.offset, e.epoch, e.event, e.ts));
    }

    #[test]
    fn channel_parsing_never_panics_and_splits_at_the_first_colon(name in ".{0,300}") {
        if let Ok(c) = Channel::parse(&name) {
            prop_assert_eq!(format!("{}:{}", c.namespace(), c.rest()), name.clone());
            prop_assert!(!c.namespace().contains(':'));
            prop_assert!(name.len() <= fanout_protocol::MAX_CHANNEL_LEN);
        }
    }

    #[test]
    fn decoded_frames_keep_their_id(id in 0u64.., channel in "[a-z]{1,8}:[0-9]{1,6}") {
        let text = serde_json::json!({"type":"subscribe","id":id,"channel":channel}).to_string();
        let f = Codec::Json.decode_client(text.as_bytes()).unwrap();
        prop_assert_eq!(f.id, Some(fanout_protocol::FrameId::Num(id)));
    }
}
