//! The client protocol against a real node: authentication, refusals with their exact
//! error and close codes, malformed input, limits. Delivery tests run against both the
//! embedded broker and a real redis-server.

mod common;

use std::time::Duration;

use common::*;
use fanout_testkit::{Incoming, WsClient};
use serde_json::json;

#[tokio::test]
async fn token_in_header_query_or_first_frame() {
    let node = start(None, &[]).await;
    let t = token("42", &[]);
    // Header
    let mut c =
        WsClient::connect_with(&node.ws_url(), &[("Authorization", &format!("Bearer {t}"))])
            .await
            .unwrap();
    let hello = c.recv_type("connected").await;
    assert_eq!(hello["user"], "42");
    assert_eq!(hello["ping_interval"], 25);
    assert!(hello["client"].as_str().unwrap().len() >= 8);
    // Query
    let mut c = connect(&node, &t).await;
    c.send(json!({"type":"ping","id":5})).await;
    assert_eq!(c.recv().await, json!({"type":"pong","id":5}));
    // First frame
    let mut c = WsClient::connect(&node.ws_url()).await.unwrap();
    c.send(json!({"type":"auth","token":t})).await;
    assert_eq!(c.recv_type("connected").await["user"], "42");
    node.shutdown().await;
}

#[tokio::test]
async fn user_channel_of_another_user_is_forbidden() {
    let node = start(None, &[]).await;
    let mut c = connect(&node, &token("42", &[])).await;
    let r = c.subscribe(1, "user:43").await;
    assert_eq!(r["type"], "error");
    assert_eq!(r["code"], "forbidden");
    assert_eq!(r["id"], 1);
    let r = c.subscribe(2, "user:42").await;
    assert_eq!(
        (r["type"].as_str(), r["id"].as_u64(), r["channel"].as_str()),
        (Some("subscribed"), Some(2), Some("user:42"))
    );
    node.shutdown().await;
}

#[tokio::test]
async fn job_progress_needs_claim_or_subscription_token() {
    let node = start(None, &[]).await;
    let mut c = connect(&node, &token("42", &[])).await;
    let r = c.subscribe(1, "job_progress:7").await;
    assert_eq!(
        (r["type"].as_str(), r["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    // A subscription token for this user and channel.
    let sub = token_with(json!({"sub":"42","exp":now()+60,"channel":"job_progress:7"}));
    c.send(json!({"type":"subscribe","id":2,"channel":"job_progress:7","token":sub}))
        .await;
    assert_eq!(c.recv_type("subscribed").await["id"], 2);
    // A subscription token for somebody else.
    let other = token_with(json!({"sub":"43","exp":now()+60,"channel":"job_progress:8"}));
    c.send(json!({"type":"subscribe","id":3,"channel":"job_progress:8","token":other}))
        .await;
    let r = c.recv_type("error").await;
    assert_eq!(
        (r["id"].as_u64(), r["code"].as_str()),
        (Some(3), Some("forbidden"))
    );
    // A forged subscription token.
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub":"42","exp":now()+60,"channel":"job_progress:9"}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret-not-the-secret"),
    )
    .unwrap();
    c.send(json!({"type":"subscribe","id":4,"channel":"job_progress:9","token":forged}))
        .await;
    assert_eq!(c.recv_type("error").await["code"], "unauthorized");
    // The claim.
    let mut c = connect(&node, &token("42", &["job_progress:*"])).await;
    assert_eq!(c.subscribe(1, "job_progress:7").await["type"], "subscribed");
    // Unknown namespace, not in the claim.
    assert_eq!(c.subscribe(2, "chat:1").await["code"], "forbidden");
    node.shutdown().await;
}

async fn close_code_for(url: &str) -> Option<u16> {
    let mut c = WsClient::connect(url).await.unwrap();
    match c.next().await {
        Incoming::Closed { code, .. } => code,
        other => panic!("expected a close, got {other:?}"),
    }
}

/// A client refused at once that has already sent frames the node never reads: the
/// node reads them away before closing the socket, so its close frame is not lost to
/// a connection reset (which discards what the client had not read yet).
#[tokio::test]
async fn a_refused_client_that_already_sent_frames_still_gets_its_close_code() {
    let node = start(None, &[]).await;
    let ws = node.ws_url();
    for round in 0..40 {
        let mut c = WsClient::connect(&format!("{ws}?token=not-a-valid-token"))
            .await
            .unwrap();
        for id in 0..20 {
            c.send(json!({"type":"subscribe","id":id,"channel":"job_progress:7"}))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(c.expect_close().await, Some(4001), "round {round}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn a_client_that_pings_but_never_reads_is_closed_4009_once_its_socket_stalls() {
    // Queue bounds far above what is sent: only the stall can close it. The stall
    // timeout is 2 × ping interval + 5 s = 7 s.
    let cfg = config_file(
        "[limits]\nping_interval_secs = 1\nqueue_messages = 100000\nqueue_bytes = 268435456\n",
    );
    let node = start_configured(&Backend::Memory, &cfg).await;
    let mut c = connect(&node, &token("15", &["chat:*"])).await;
    assert_eq!(c.subscribe(1, "chat:stall").await["type"], "subscribed");
    // 33 MB: more than the kernel's socket buffers hold.
    let blob = "s".repeat(60 * 1024);
    for n in 0..550 {
        let (status, body) = api_publish(&node, "chat:stall", json!({"n": n, "blob": blob})).await;
        assert_eq!(status, 200, "{body}");
    }
    // The client keeps pinging, so it is not silent, and reads nothing.
    let series = "fanout_slow_consumer_closes_total{limit=\"stall\"";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut pings = 0;
    while metric(&node, series).await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never closed for the stall"
        );
        c.send_ping(format!("p{pings}").as_bytes()).await.unwrap();
        pings += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        pings >= 15,
        "closed after {pings} pings: before the stall timeout"
    );
    // What was in flight, then the close.
    assert_eq!(c.expect_close().await, Some(4009));
    assert_eq!(
        metric(&node, "fanout_slow_consumer_closes_total{limit=\"bytes\"").await,
        0.0
    );
    node.shutdown().await;
}

/// "Takes nothing for the stall timeout" means exactly that: a client that reads
/// slowly but steadily is never closed, however long a flush takes (here a flush of a
/// burst takes far longer than the 7 s stall timeout at the client's pace).
#[tokio::test]
async fn a_client_reading_slowly_but_steadily_is_not_taken_for_stalled() {
    let cfg = config_file(
        "[limits]\nping_interval_secs = 1\nqueue_messages = 100000\nqueue_bytes = 268435456\n",
    );
    let node = start_configured(&Backend::Memory, &cfg).await;
    // A small receive buffer: what the client reads is what it takes.
    let path = format!("/ws?token={}", token("15", &["chat:*"]));
    let mut c =
        fanout_testkit::RawWs::connect_with_rcvbuf(node.local_addr(), &path, Some(8192)).await;
    assert!(String::from_utf8_lossy(&c.next().await.unwrap().payload).contains("connected"));
    let mask = Some([1, 2, 3, 4]);
    c.send_frame(
        true,
        1,
        br#"{"type":"subscribe","id":1,"channel":"chat:slow"}"#,
        mask,
    )
    .await;
    assert!(String::from_utf8_lossy(&c.next().await.unwrap().payload).contains("subscribed"));
    // 16 MB queued at once.
    let blob = "s".repeat(30 * 1024);
    for n in 0..550 {
        let (status, body) = api_publish(&node, "chat:slow", json!({"n": n, "blob": blob})).await;
        assert_eq!(status, 200, "{body}");
    }
    // About 100 KB/s for 12 s, pinging so as not to be silent: never 7 s without
    // taking a byte.
    let series = "fanout_slow_consumer_closes_total{limit=\"stall\"";
    let started = std::time::Instant::now();
    let mut read = 0;
    let mut ticks = 0u32;
    while started.elapsed() < Duration::from_secs(12) {
        let n = c.read_raw(10 * 1024).await;
        assert!(n > 0, "closed after {read} bytes, {:?}", started.elapsed());
        read += n;
        ticks += 1;
        if ticks % 5 == 0 {
            c.send_frame(true, 9, b"p", mask).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(&node, series).await,
        0.0,
        "closed as stalled after {read} bytes"
    );
    assert!(read > 500_000, "read only {read} bytes");
    node.shutdown().await;
}

#[tokio::test]
async fn bad_tokens_close_with_4001_and_expired_with_4004() {
    let node = start(
        None,
        &["--jwt-audience", "fanout", "--jwt-public-key", RSA_PUBLIC],
    )
    .await;
    let ws = node.ws_url();
    let good = token_with(json!({"sub":"1","exp":now()+60,"aud":"fanout"}));
    let mut c = WsClient::connect(&format!("{ws}?token={good}"))
        .await
        .unwrap();
    c.recv_type("connected").await;
    // RS256 token verified by the PEM key.
    let rs = rs256_token(json!({"sub":"1","exp":now()+60,"aud":"fanout"}));
    let mut c = WsClient::connect(&format!("{ws}?token={rs}"))
        .await
        .unwrap();
    c.recv_type("connected").await;

    let bad_sig = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub":"1","exp":now()+60,"aud":"fanout"}),
        &jsonwebtoken::EncodingKey::from_secret(b"wrong-secret-wrong-secret-wrong"),
    )
    .unwrap();
    assert_eq!(
        close_code_for(&format!("{ws}?token={bad_sig}")).await,
        Some(4001)
    );
    let wrong_aud = token_with(json!({"sub":"1","exp":now()+60,"aud":"other"}));
    assert_eq!(
        close_code_for(&format!("{ws}?token={wrong_aud}")).await,
        Some(4001)
    );
    let expired = token_with(json!({"sub":"1","exp":now()-3600,"aud":"fanout"}));
    assert_eq!(
        close_code_for(&format!("{ws}?token={expired}")).await,
        Some(4004)
    );
    assert_eq!(
        close_code_for(&format!("{ws}?token=not-a-jwt")).await,
        Some(4001)
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_token_that_expires_mid_session_closes_4004_unless_refreshed() {
    let node = start(None, &[]).await;
    let short = token_with(json!({"sub": "8", "exp": now() + 2}));
    let mut lapsing = connect(&node, &short).await;
    let mut refreshed = connect(&node, &short).await;
    let started = std::time::Instant::now();
    let longer = token_with(json!({"sub": "8", "exp": now() + 60}));
    refreshed
        .send(json!({"type": "refresh", "id": 1, "token": longer}))
        .await;
    assert_eq!(refreshed.recv().await, json!({"type": "reply", "id": 1}));
    assert_eq!(lapsing.expect_close().await, Some(4004));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too early"
    );
    // The refreshed connection outlives the first token.
    tokio::time::sleep(Duration::from_secs(2)).await;
    refreshed.send(json!({"type": "ping", "id": 2})).await;
    assert_eq!(refreshed.recv().await, json!({"type": "pong", "id": 2}));
    node.shutdown().await;
}

#[tokio::test]
async fn alg_is_pinned_hs256_token_against_rs256_key_is_refused() {
    // Only an RSA key is configured: an HS256 token (even one "signed" with the public
    // key's bytes, the classic confusion attack) must be refused.
    let node = start_args(&[
        "fanout-edge",
        "--listen",
        "127.0.0.1:0",
        "--jwt-public-key",
        RSA_PUBLIC,
        "--admin-token",
        ADMIN,
    ])
    .await;
    let pem = std::fs::read(RSA_PUBLIC).unwrap();
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub":"1","exp":now()+60}),
        &jsonwebtoken::EncodingKey::from_secret(&pem),
    )
    .unwrap();
    assert_eq!(
        close_code_for(&format!("{}?token={confused}", node.ws_url())).await,
        Some(4001)
    );
    let rs = rs256_token(json!({"sub":"1","exp":now()+60}));
    let mut c = WsClient::connect(&format!("{}?token={rs}", node.ws_url()))
        .await
        .unwrap();
    c.recv_type("connected").await;
    node.shutdown().await;
}

#[tokio::test]
async fn bad_frames_get_bad_request_and_the_connection_stays_usable() {
    let node = start(None, &[]).await;
    let mut c = connect(&node, &token("1", &[])).await;
    c.send_text("{not json").await;
    let r = c.recv_type("error").await;
    assert_eq!(r["code"], "bad_request");
    assert!(r["message"].as_str().unwrap().contains("malformed JSON"));
    c.send(json!({"type":"explode","id":9})).await;
    let r = c.recv_type("error").await;
    assert_eq!(
        (r["code"].as_str(), r["id"].as_u64()),
        (Some("bad_request"), Some(9))
    );
    assert_eq!(r["message"], "unknown type `explode`");
    c.send(json!({"type":"subscribe","id":10})).await;
    let r = c.recv_type("error").await;
    assert_eq!(
        (r["code"].as_str(), r["id"].as_u64()),
        (Some("bad_request"), Some(10))
    );
    assert!(r["message"]
        .as_str()
        .unwrap()
        .contains("missing field `channel`"));
    c.send(json!({"type":"subscribe","id":11,"channel":"no-namespace"}))
        .await;
    assert_eq!(c.recv_type("error").await["code"], "bad_request");
    c.send(json!({"type":"unsubscribe","id":12,"channel":"user:1"}))
        .await;
    assert_eq!(c.recv_type("error").await["code"], "bad_request");
    // Still usable.
    c.send(json!({"type":"ping","id":13})).await;
    assert_eq!(c.recv().await, json!({"type":"pong","id":13}));
    assert_eq!(c.subscribe(14, "user:1").await["type"], "subscribed");
    node.shutdown().await;
}

#[tokio::test]
async fn oversized_frame_closes_with_1009() {
    let cfg = config_file("[limits]\nmax_message_size = 1024\n");
    let node = start(None, &["--config", cfg.to_str().unwrap()]).await;
    let mut c = connect(&node, &token("1", &[])).await;
    // Exactly the limit is fine.
    let filler = "x".repeat(1024 - r#"{"type":"ping","pad":""}"#.len());
    c.send_text(format!(r#"{{"type":"ping","pad":"{filler}"}}"#))
        .await;
    assert_eq!(c.recv_type("pong").await["type"], "pong");
    c.send_text(format!(r#"{{"type":"ping","pad":"{filler}x"}}"#))
        .await;
    assert_eq!(c.expect_close().await, Some(1009));
    node.shutdown().await;
}

#[tokio::test]
async fn first_frame_must_be_auth_within_the_timeout() {
    let cfg = config_file("[limits]\nauth_timeout_secs = 1\n");
    let node = start(None, &["--config", cfg.to_str().unwrap()]).await;
    let mut c = WsClient::connect(&node.ws_url()).await.unwrap();
    assert_eq!(c.expect_close().await, Some(4001));
    let mut c = WsClient::connect(&node.ws_url()).await.unwrap();
    c.send(json!({"type":"subscribe","channel":"user:1"})).await;
    assert_eq!(c.expect_close().await, Some(4001));
    let mut c = WsClient::connect(&node.ws_url()).await.unwrap();
    c.send_text("{not even json").await;
    assert_eq!(c.expect_close().await, Some(4001));
    node.shutdown().await;
}

#[tokio::test]
async fn origin_allowlist_closes_with_1008() {
    let node = start(None, &["--allowed-origins", "https://app.example.com"]).await;
    let url = format!("{}?token={}", node.ws_url(), token("1", &[]));
    let mut c = WsClient::connect_with(&url, &[("Origin", "https://evil.example.com")])
        .await
        .unwrap();
    assert_eq!(c.expect_close().await, Some(1008));
    let mut c = WsClient::connect_with(&url, &[("Origin", "https://app.example.com")])
        .await
        .unwrap();
    c.recv_type("connected").await;
    node.shutdown().await;
}

#[tokio::test]
async fn limits_on_subscriptions_and_flooding() {
    let cfg = config_file(
        "[limits]\nmax_subscriptions = 2\nmessages_per_second = 1\nmessage_burst = 5\nrate_limit_strikes = 3\n",
    );
    let node = start(None, &["--config", cfg.to_str().unwrap()]).await;
    let mut c = connect(&node, &token("1", &["chat:*"])).await;
    assert_eq!(c.subscribe(1, "chat:a").await["type"], "subscribed");
    assert_eq!(c.subscribe(2, "chat:b").await["type"], "subscribed");
    assert_eq!(c.subscribe(3, "chat:c").await["code"], "limit_exceeded");
    // Burst of 5 spent (3 subscribes above); the next frames are rate limited, then 4008.
    for i in 0..10 {
        c.send(json!({"type":"ping","id":100 + i})).await;
    }
    let mut codes = vec![];
    let close = loop {
        match c.next().await {
            Incoming::Frame(f) => codes.push(f["code"].as_str().unwrap_or("pong").to_string()),
            Incoming::Raw(r) => panic!("unexpected {r}"),
            Incoming::Closed { code, .. } => break code,
        }
    };
    assert!(codes.iter().any(|c| c == "rate_limited"), "{codes:?}");
    assert_eq!(close, Some(4008));
    node.shutdown().await;
}

#[tokio::test]
async fn msgpack_subprotocol_speaks_the_same_frames() {
    for backend in Backend::all() {
        let node = start(backend.url().as_deref(), &[]).await;
        let url = format!("{}?token={}", node.ws_url(), token("7", &[]));
        let mut c = WsClient::connect_with(&url, &[("Sec-WebSocket-Protocol", "fanout.msgpack")])
            .await
            .unwrap();
        c.recv_type("connected").await;
        assert_eq!(c.subscribe(1, "user:7").await["type"], "subscribed");
        let (status, ack) = api_publish(&node, "user:7", json!({"n": 1})).await;
        assert_eq!(status, 200, "{ack}");
        let m = c.recv_type("message").await;
        assert_eq!(m["data"], json!({"n": 1}), "{}", backend.name());
        assert_eq!(m["offset"], ack["offset"]);
        node.shutdown().await;
    }
}

#[tokio::test]
async fn api_publish_reaches_subscribers_on_both_brokers() {
    for backend in Backend::all() {
        let node = start(backend.url().as_deref(), &[]).await;
        let mut c = connect(&node, &token("42", &[])).await;
        assert_eq!(c.subscribe(1, "user:42").await["type"], "subscribed");
        for n in 1..=3 {
            let (status, ack) = api_publish(&node, "user:42", json!({"n": n})).await;
            assert_eq!(status, 200, "{}: {ack}", backend.name());
            assert!(ack["epoch"].as_str().is_some());
        }
        let mut last = 0;
        for n in 1..=3 {
            let m = c.recv_type("message").await;
            assert_eq!(m["channel"], "user:42");
            assert_eq!(m["data"], json!({"n": n}));
            let offset = m["offset"].as_u64().unwrap();
            assert!(offset > last);
            last = offset;
            assert!(m["ts"].as_u64().unwrap() > 0);
        }
        // Unsubscribe: no more messages.
        c.send(json!({"type":"unsubscribe","id":2,"channel":"user:42"}))
            .await;
        assert_eq!(
            c.recv().await,
            json!({"type":"unsubscribed","id":2,"channel":"user:42","reason":"client"})
        );
        api_publish(&node, "user:42", json!({"n": 4})).await;
        assert_eq!(c.next_within(Duration::from_millis(300)).await, None);
        node.shutdown().await;
    }
}

/// A client's publish resent under its idempotency key (after a lost connection, say)
/// is applied once: the resend answers the first position with `duplicate`, over the
/// WebSocket and over `/client/publish` alike. Keys are scoped to the user, and bad
/// keys are refused with `bad_request`.
#[tokio::test]
async fn client_publishes_with_one_key_are_applied_once() {
    let cfg = config_file(
        "[namespaces.room]\nsubscribe = \"authenticated\"\npublish = \"authenticated\"\n",
    );
    for backend in Backend::all() {
        let node = start_configured(&backend, &cfg).await;
        let name = backend.name();
        let mut reader = connect(&node, &token("reader", &[])).await;
        assert_eq!(reader.subscribe(1, "room:1").await["type"], "subscribed");
        let mut u1 = connect(&node, &token("u1", &[])).await;
        let publish = |id: u64, n: u64, key: &str| json!({"type": "publish", "id": id, "channel": "room:1", "data": {"n": n}, "idempotency_key": key});

        u1.send(publish(1, 1, "k1")).await;
        let first = u1.recv().await;
        assert_eq!(
            (first["type"].as_str(), first["id"].as_u64()),
            (Some("reply"), Some(1)),
            "{name}: {first}"
        );
        assert_eq!(first["offset"], 1, "{name}: {first}");
        assert!(first.get("duplicate").is_none(), "{name}: {first}");
        // The resend: the first position, nothing published.
        u1.send(publish(2, 1, "k1")).await;
        let again = u1.recv().await;
        assert_eq!(
            (
                again["id"].as_u64(),
                &again["offset"],
                &again["epoch"],
                &again["duplicate"]
            ),
            (Some(2), &first["offset"], &first["epoch"], &json!(true)),
            "{name}: {again}"
        );
        // The same key over HTTP (an event-stream client's resend) is the same publish.
        let client_publish = |body: serde_json::Value| {
            let (addr, bearer) = (node.local_addr(), token("u1", &[]));
            async move {
                let body = body.to_string();
                fanout_testkit::http(addr, "POST", "/client/publish", Some(&bearer), Some(&body))
                    .await
            }
        };
        let (status, text) =
            client_publish(json!({"channel": "room:1", "data": {"n": 1}, "idempotency_key": "k1"}))
                .await;
        let http: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (status, &http["offset"], &http["duplicate"]),
            (200, &json!(1), &json!(true)),
            "{name}: {text}"
        );
        // Another user's key of the same name is another publish.
        let mut u2 = connect(&node, &token("u2", &[])).await;
        u2.send(publish(1, 2, "k1")).await;
        let theirs = u2.recv().await;
        assert_eq!(
            (&theirs["offset"], theirs.get("duplicate")),
            (&json!(2), None),
            "{name}: {theirs}"
        );

        let got: Vec<_> = [
            reader.recv_type("message").await,
            reader.recv_type("message").await,
        ]
        .iter()
        .map(|m| {
            (
                m["offset"].as_u64().unwrap(),
                m["data"]["n"].as_u64().unwrap(),
            )
        })
        .collect();
        assert_eq!(got, vec![(1, 1), (2, 2)], "{name}");
        assert_eq!(
            reader.next_within(Duration::from_millis(300)).await,
            None,
            "{name}"
        );

        // Bad keys: refused, the connection stays usable.
        for (id, key) in [
            (3, "a b".to_string()),
            (4, String::new()),
            (5, "k".repeat(65)),
        ] {
            u1.send(publish(id, 9, &key)).await;
            let e = u1.recv().await;
            assert_eq!(
                (e["type"].as_str(), e["id"].as_u64(), e["code"].as_str()),
                (Some("error"), Some(id), Some("bad_request")),
                "{name}: {key:?} → {e}"
            );
        }
        let (status, text) =
            client_publish(json!({"channel": "room:1", "data": {}, "idempotency_key": "a b"}))
                .await;
        assert_eq!(status, 400, "{name}: {text}");
        assert!(text.contains("bad_request"), "{name}: {text}");
        // A server key of the client form is refused: it could answer a client's publish.
        let body =
            json!({"channel": "room:1", "data": {}, "idempotency_key": "c:0123456789abcdef:k1"});
        let (status, text) = api_publish_body(&node, &body.to_string()).await;
        assert_eq!(status, 400, "{name}: {text}");
        assert!(
            text.contains("reserved for client publishes"),
            "{name}: {text}"
        );
        u1.send(publish(6, 3, &"k".repeat(64))).await;
        assert_eq!(u1.recv().await["offset"], 3, "{name}");
        assert_eq!(reader.recv_type("message").await["data"]["n"], 3, "{name}");
        node.shutdown().await;
    }
}

#[tokio::test]
async fn server_api_needs_the_admin_token() {
    let node = start(None, &[]).await;
    let addr = node.local_addr();
    let body = r#"{"channel":"user:1","data":1}"#;
    let (s, b) = fanout_testkit::http(addr, "POST", "/api/publish", None, Some(body)).await;
    assert_eq!(s, 401, "{b}");
    let (s, _) = fanout_testkit::http(
        addr,
        "POST",
        "/api/publish",
        Some("wrong-token-wrong-token"),
        Some(body),
    )
    .await;
    assert_eq!(s, 401);
    let (s, b) = fanout_testkit::http(addr, "POST", "/api/publish", Some(ADMIN), Some("{")).await;
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("bad_request"));
    let (s, b) = fanout_testkit::http(
        addr,
        "POST",
        "/api/publish",
        Some(ADMIN),
        Some(r#"{"channel":"bad","data":1}"#),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = fanout_testkit::http(addr, "GET", "/api/stats", Some(ADMIN), None).await;
    assert_eq!(s, 200, "{b}");
    let stats: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(stats["node"]["broker"], "memory");
    node.shutdown().await;

    // Keys configured but no admin token: the API is off, and says so.
    let node = start_args(&[
        "fanout-edge",
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret",
        SECRET,
    ])
    .await;
    let (s, b) = fanout_testkit::http(
        node.local_addr(),
        "POST",
        "/api/publish",
        Some(ADMIN),
        Some(body),
    )
    .await;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("FANOUT_ADMIN_TOKEN"));
    node.shutdown().await;
}

#[tokio::test]
async fn admin_disconnect_closes_with_4010() {
    let node = start(None, &[]).await;
    let mut a = connect(&node, &token("9", &[])).await;
    let mut b = connect(&node, &token("9", &[])).await;
    let mut other = connect(&node, &token("10", &[])).await;
    // Not authenticated yet: not a user, and not disconnected.
    let mut anonymous = WsClient::connect(&node.ws_url()).await.unwrap();
    assert_eq!(stats(&node).await["node"]["users"], 2);
    let (s, body) = fanout_testkit::http(
        node.local_addr(),
        "POST",
        "/api/disconnect",
        Some(ADMIN),
        Some(r#"{"user":"9"}"#),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["disconnected"], 2, "{body}");
    assert_eq!(a.expect_close().await, Some(4010));
    assert_eq!(b.expect_close().await, Some(4010));
    other.send(json!({"type":"ping","id":1})).await;
    assert_eq!(other.recv_type("pong").await["id"], 1);
    eventually("user 9 gone", || async {
        stats(&node).await["node"]["users"] == 1
    })
    .await;
    // The anonymous connection still authenticates.
    anonymous
        .send(json!({"type":"auth","token":token("11", &[])}))
        .await;
    assert_eq!(anonymous.recv_type("connected").await["user"], "11");
    node.shutdown().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let node = start(None, &[]).await;
    let (s, b) = fanout_testkit::http(node.local_addr(), "GET", "/healthz", None, None).await;
    assert_eq!((s, b.as_str()), (200, r#"{"status":"ok"}"#));
    let (s, b) = fanout_testkit::http(node.local_addr(), "GET", "/readyz", None, None).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = fanout_testkit::http(node.local_addr(), "GET", "/metrics", None, None).await;
    assert_eq!(s, 200);
    assert!(b.contains("fanout_connections"), "{b}");
    node.shutdown().await;
}

#[tokio::test]
async fn es256_pem_and_jwks_keys() {
    let claims = json!({"sub":"1","exp":now()+60});
    let ec = start_args(&[
        "fanout-edge",
        "--listen",
        "127.0.0.1:0",
        "--jwt-public-key",
        EC_PUBLIC,
    ])
    .await;
    let mut c = WsClient::connect(&format!(
        "{}?token={}",
        ec.ws_url(),
        es256_token(claims.clone())
    ))
    .await
    .unwrap();
    c.recv_type("connected").await;
    // An RS256 token meets no RS256 key here.
    let rs = rs256_token(claims.clone());
    assert_eq!(
        close_code_for(&format!("{}?token={rs}", ec.ws_url())).await,
        Some(4001)
    );
    ec.shutdown().await;

    let jwks = start_args(&["fanout-edge", "--listen", "127.0.0.1:0", "--jwt-jwks", JWKS]).await;
    let good = rs256_token_kid(claims.clone(), Some("test-rsa-1"));
    let mut c = WsClient::connect(&format!("{}?token={good}", jwks.ws_url()))
        .await
        .unwrap();
    c.recv_type("connected").await;
    let unknown = rs256_token_kid(claims.clone(), Some("rotated-away"));
    assert_eq!(
        close_code_for(&format!("{}?token={unknown}", jwks.ws_url())).await,
        Some(4001)
    );
    let no_kid = rs256_token(claims);
    assert_eq!(
        close_code_for(&format!("{}?token={no_kid}", jwks.ws_url())).await,
        Some(4001)
    );
    jwks.shutdown().await;
}

#[tokio::test]
async fn server_pings_reach_clients_and_silent_clients_are_dropped() {
    let cfg = config_file("[limits]\nping_interval_secs = 1\n");
    let node = start(None, &["--config", cfg.to_str().unwrap()]).await;
    let mut live = connect(&node, &token("1", &[])).await;
    let mut silent = connect(&node, &token("2", &[])).await;
    // `live` keeps reading (and so answers pings); `silent` is never polled.
    let until = tokio::time::Instant::now() + Duration::from_millis(8_500);
    while tokio::time::Instant::now() < until {
        assert_eq!(live.next_within(Duration::from_millis(250)).await, None);
    }
    assert!(
        live.pings() >= 7,
        "only {} server pings in 8.5 s",
        live.pings()
    );
    live.send(json!({"type":"ping","id":1})).await;
    assert_eq!(live.recv_type("pong").await["id"], 1);
    // Two intervals + 5 s without a word from `silent`: the server dropped it, without a
    // close frame (a peer that does not read would not get one).
    match silent.next().await {
        Incoming::Closed { code, .. } => assert_eq!(code, None),
        other => panic!("expected the connection to be gone, got {other:?}"),
    }
    node.shutdown().await;
}

#[tokio::test]
async fn a_subscription_token_cannot_open_a_connection() {
    let node = start(None, &[]).await;
    let sub = token_with(json!({"sub":"42","exp":now()+60,"channel":"job_progress:7"}));
    assert_eq!(
        close_code_for(&format!("{}?token={sub}", node.ws_url())).await,
        Some(4001)
    );
    node.shutdown().await;
}

#[tokio::test]
async fn client_close_codes_are_echoed_only_when_valid() {
    let node = start(None, &[]).await;
    let mut c = connect(&node, &token("1", &[])).await;
    c.send_close(4321).await;
    assert_eq!(c.expect_close().await, Some(4321));
    let mut c = connect(&node, &token("1", &[])).await;
    c.send_close(2999).await;
    assert_eq!(c.expect_close().await, Some(1002));
    // Client-initiated closes are counted as such, whatever code the client used.
    let (_, metrics) = fanout_testkit::http(node.local_addr(), "GET", "/metrics", None, None).await;
    assert!(
        metrics.contains(r#"fanout_disconnects_total{code="client"}"#),
        "{metrics}"
    );
    assert!(!metrics.contains(r#"code="4321""#), "{metrics}");
    node.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_every_socket_with_1001_even_before_auth() {
    let node = start(None, &[]).await;
    let mut authed = connect(&node, &token("1", &[])).await;
    let mut anonymous = WsClient::connect(&node.ws_url()).await.unwrap();
    // Let the anonymous upgrade finish before shutting down.
    authed.send(json!({"type":"ping","id":1})).await;
    authed.recv_type("pong").await;
    let stop = tokio::spawn(node.shutdown());
    assert_eq!(authed.expect_close().await, Some(1001));
    assert_eq!(anonymous.expect_close().await, Some(1001));
    stop.await.unwrap();
}

#[tokio::test]
async fn data_too_deep_for_a_value_still_reaches_msgpack_clients() {
    for backend in Backend::all() {
        let node = start(backend.url().as_deref(), &[]).await;
        let url = format!("{}?token={}", node.ws_url(), token("7", &[]));
        let mut mp = WsClient::connect_with(&url, &[("Sec-WebSocket-Protocol", "fanout.msgpack")])
            .await
            .unwrap();
        mp.recv_type("connected").await;
        assert_eq!(mp.subscribe(1, "user:7").await["type"], "subscribed");
        let mut js = connect(&node, &token("7", &[])).await;
        assert_eq!(js.subscribe(1, "user:7").await["type"], "subscribed");
        let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
        let body = format!(r#"{{"channel":"user:7","data":{deep}}}"#);
        let (s, b) = api_publish_body(&node, &body).await;
        assert_eq!(s, 200, "{}: {b}", backend.name());
        let m = mp.recv_type("message").await;
        assert_eq!(m["data_encoding"], "json");
        assert_eq!(m["data"], json!(deep));
        // The node is unharmed: the next message flows to both.
        api_publish(&node, "user:7", json!({"after": 1})).await;
        assert_eq!(mp.recv_type("message").await["data"], json!({"after": 1}));
        // JSON subscribers get the data verbatim (deeper than serde_json parses by default).
        match js.next().await {
            Incoming::Raw(text) => assert!(text.contains(&deep), "{text}"),
            other => panic!("expected the deep frame, got {other:?}"),
        }
        assert_eq!(js.recv_type("message").await["data"], json!({"after": 1}));
        node.shutdown().await;
    }
}

#[tokio::test]
async fn broadcast_publishes_every_channel_or_none_when_one_is_invalid() {
    let node = start(None, &[]).await;
    let mut a = connect(&node, &token("1", &[])).await;
    let mut b = connect(&node, &token("2", &[])).await;
    assert_eq!(a.subscribe(1, "user:1").await["type"], "subscribed");
    assert_eq!(b.subscribe(1, "user:2").await["type"], "subscribed");
    let addr = node.local_addr();
    let (s, body) = fanout_testkit::http(
        addr,
        "POST",
        "/api/broadcast",
        Some(ADMIN),
        Some(r#"{"channels":["user:1","not a channel"],"data":{"x":1}}"#),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(a.next_within(Duration::from_millis(200)).await, None);
    let (s, body) = fanout_testkit::http(
        addr,
        "POST",
        "/api/broadcast",
        Some(ADMIN),
        Some(r#"{"channels":["user:1","user:2"],"data":{"x":2},"event":"note"}"#),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["failed"], 0);
    assert_eq!(v["results"][1]["channel"], "user:2");
    assert_eq!(a.recv_type("message").await["data"], json!({"x": 2}));
    assert_eq!(b.recv_type("message").await["event"], "note");
    node.shutdown().await;
}

#[tokio::test]
async fn drain_refuses_new_sockets_and_closes_the_rest_paced_over_the_window() {
    let node = start(None, &[]).await;
    let t = token("drain", &[]);
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = connect(&node, &t).await;
        assert_eq!(c.subscribe(1, "user:drain").await["type"], "subscribed");
        clients.push(c);
    }
    let addr = node.local_addr();
    let url = node.ws_url();
    let window = Duration::from_millis(1500);
    let started = tokio::time::Instant::now();
    let drain = tokio::spawn(node.drain(window));
    // Not ready at once; new sockets refused with 1001 (reconnect elsewhere).
    let mut not_ready = false;
    for _ in 0..20 {
        if fanout_testkit::http(addr, "GET", "/readyz", None, None)
            .await
            .0
            == 503
        {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(not_ready, "/readyz still 200 while draining");
    let mut late = WsClient::connect(&format!("{url}?token={t}"))
        .await
        .unwrap();
    assert_eq!(late.expect_close().await, Some(1001));
    // Every connection gets 1001, spread over the window rather than all at once.
    let waits = clients.into_iter().map(|mut c| async move {
        assert_eq!(c.expect_close().await, Some(1001));
        started.elapsed()
    });
    let mut closed_at = futures_util::future::join_all(waits).await;
    drain.await.unwrap();
    let total = started.elapsed();
    closed_at.sort();
    let spread = *closed_at.last().unwrap() - closed_at[0];
    assert!(spread >= window / 3, "closes not paced: spread {spread:?}");
    assert!(
        total < window + Duration::from_secs(3),
        "drain took {total:?}"
    );
}
