//! Server-Sent Events (`GET /sse`) and the client commands over HTTP (`/client/*`),
//! against real nodes (memory and Redis brokers): events carry the WebSocket frames,
//! `Last-Event-ID` resumes every channel of a stream, refusals are HTTP statuses with
//! JSON errors, token expiry, drain and the outbox bound end streams as they end
//! sockets.

mod common;

use std::time::Duration;

use common::*;
use fanout_testkit::{RedisServer, SseClient, SseEvent};
use serde_json::{json, Value};

const CFG: &str = "[namespaces.room]\nhistory_size = 1000\nsubscribe = \"authenticated\"\npublish = \"authenticated\"\npresence = true\n\
[namespaces.feed]\nhistory_size = 10\nsubscribe = \"authenticated\"\n\
[namespaces.news]\nsubscribe = \"authenticated\"\npublish = \"none\"\n\
[namespaces.chat]\nsubscribe = \"authenticated\"\npublish = \"subscribers\"\n";

async fn sse(node: &fanout_edge::Node, query: &str, headers: &[(&str, &str)]) -> SseClient {
    SseClient::connect(node.local_addr(), &format!("/sse?{query}"), headers)
        .await
        .unwrap()
}

/// The next event that is not a presence notice.
async fn next_of(s: &mut SseClient, event: &str) -> SseEvent {
    let e = s.recv().await;
    assert_eq!(e.event, event, "expected {event}, got {e:?}");
    e
}

/// `n` message events, in order; their `data.n`.
async fn messages(s: &mut SseClient, channel: &str, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < n {
        let e = next_of(s, "message").await;
        let f = e.json();
        assert_eq!(f["channel"], channel, "{f}");
        assert!(e.has_id, "every message event has an id: {e:?}");
        out.push(f["data"]["n"].as_u64().unwrap());
    }
    out
}

async fn publish_n(node: &fanout_edge::Node, channel: &str, from: u64, to: u64) {
    for n in from..=to {
        let (status, body) = api_publish(node, channel, json!({"n": n})).await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test]
async fn a_stream_carries_two_channels_and_resumes_both_from_its_last_event_id() {
    for backend in Backend::all() {
        let name = backend.name();
        let cfg = config_file(CFG);
        let node = start_configured(&backend, &cfg).await;
        let t = token("u1", &[]);
        let mut s = sse(
            &node,
            &format!("channel=room:a&channel=room:b&token={t}"),
            &[],
        )
        .await;
        assert_eq!(s.status, 200, "{name}");
        assert_eq!(s.header("content-type"), Some("text/event-stream"));
        let connected = next_of(&mut s, "connected").await.json();
        assert_eq!(connected["user"], "u1");
        let a = next_of(&mut s, "subscribed").await;
        assert_eq!(a.json()["channel"], "room:a");
        assert!(a.has_id, "a subscribed event carries the positions");
        let b = next_of(&mut s, "subscribed").await;
        assert_eq!(b.json()["channel"], "room:b");
        assert!(
            s.retry.is_some_and(|ms| (1000..3000).contains(&ms)),
            "{:?}",
            s.retry
        );

        publish_n(&node, "room:a", 1, 3).await;
        assert_eq!(messages(&mut s, "room:a", 3).await, vec![1, 2, 3], "{name}");
        publish_n(&node, "room:b", 1, 2).await;
        assert_eq!(messages(&mut s, "room:b", 2).await, vec![1, 2], "{name}");

        // Gone; 30 messages on each channel meanwhile; back with the last event id.
        let last = s.last_event_id().to_string();
        drop(s);
        publish_n(&node, "room:a", 4, 33).await;
        publish_n(&node, "room:b", 3, 32).await;
        let mut s = sse(
            &node,
            &format!("channel=room:a&channel=room:b&token={t}"),
            &[("Last-Event-ID", &last)],
        )
        .await;
        assert_eq!(s.status, 200);
        next_of(&mut s, "connected").await;
        let sub = next_of(&mut s, "subscribed").await.json();
        assert_eq!(
            (sub["channel"].as_str(), sub["recovered"].as_bool()),
            (Some("room:a"), Some(true)),
            "{name}: {sub}"
        );
        assert_eq!(
            messages(&mut s, "room:a", 30).await,
            (4..=33).collect::<Vec<_>>(),
            "{name}"
        );
        let sub = next_of(&mut s, "subscribed").await.json();
        assert_eq!(
            (sub["channel"].as_str(), sub["recovered"].as_bool()),
            (Some("room:b"), Some(true)),
            "{name}: {sub}"
        );
        assert_eq!(
            messages(&mut s, "room:b", 30).await,
            (3..=32).collect::<Vec<_>>(),
            "{name}"
        );
        // Then live ones.
        publish_n(&node, "room:b", 33, 33).await;
        publish_n(&node, "room:a", 34, 34).await;
        assert_eq!(messages(&mut s, "room:b", 1).await, vec![33]);
        assert_eq!(messages(&mut s, "room:a", 1).await, vec![34]);
        // Nothing twice.
        assert!(s.try_next(Duration::from_millis(300)).await.is_none());
        node.shutdown().await;
    }
}

#[tokio::test]
async fn an_id_the_history_no_longer_covers_is_recovered_false_for_that_channel_only() {
    let redis = RedisServer::start().unwrap();
    let backend = Backend::Redis(redis);
    let cfg = config_file(CFG);
    let node = start_configured(&backend, &cfg).await;
    let t = token("u1", &[]);
    let query = format!("channel=feed:x&channel=room:y&token={t}");
    let mut s = sse(&node, &query, &[]).await;
    next_of(&mut s, "connected").await;
    next_of(&mut s, "subscribed").await;
    next_of(&mut s, "subscribed").await;
    publish_n(&node, "feed:x", 1, 1).await;
    assert_eq!(messages(&mut s, "feed:x", 1).await, vec![1]);
    let last = s.last_event_id().to_string();
    drop(s);
    // feed keeps 10 messages: 30 more push the position out of its history.
    publish_n(&node, "feed:x", 2, 31).await;
    publish_n(&node, "room:y", 1, 5).await;
    let mut s = sse(&node, &query, &[("Last-Event-ID", &last)]).await;
    next_of(&mut s, "connected").await;
    let feed = next_of(&mut s, "subscribed").await.json();
    assert_eq!(feed["channel"], "feed:x");
    assert_eq!(feed["recovered"], false, "{feed}");
    let room = next_of(&mut s, "subscribed").await.json();
    assert_eq!(
        (room["channel"].as_str(), room["recovered"].as_bool()),
        (Some("room:y"), Some(true)),
        "{room}"
    );
    assert_eq!(messages(&mut s, "room:y", 5).await, vec![1, 2, 3, 4, 5]);
    node.shutdown().await;
}

#[tokio::test]
async fn an_expired_token_ends_the_stream_with_an_error_event() {
    let node = start(None, &[]).await;
    // Ends at `exp` plus the 5 s leeway the node allows for clock skew.
    let t = token_with(json!({"sub": "u1", "exp": now() + 1}));
    let mut s = sse(&node, &format!("channel=user:u1&token={t}"), &[]).await;
    assert_eq!(s.status, 200);
    next_of(&mut s, "connected").await;
    next_of(&mut s, "subscribed").await;
    let error = next_of(&mut s, "error").await.json();
    assert_eq!(error["code"], "unauthorized", "{error}");
    let close = next_of(&mut s, "close").await.json();
    assert_eq!(close["code"], 4004, "{close}");
    assert!(s.next().await.is_none(), "the stream ended");
    // Back with the same token: refused before any event.
    let again = sse(&node, &format!("channel=user:u1&token={t}"), &[]).await;
    assert_eq!(again.status, 401);
    node.shutdown().await;
}

#[tokio::test]
async fn refused_streams_answer_their_status_with_json() {
    let cfg = config_file(&format!(
        "{CFG}[limits]\nmax_connections = 2\nmax_connections_per_user = 1\nmax_subscriptions = 2\n"
    ));
    let node = start(
        None,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--allowed-origins",
            "https://app.example",
        ],
    )
    .await;
    let t = token("u1", &[]);
    let refused = |status: u16, code: &'static str| {
        move |(s, body): (u16, String)| {
            assert_eq!(s, status, "{body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"]["code"], code, "{body}");
        }
    };
    let get = |query: String, headers: Vec<(&'static str, String)>| {
        let addr = node.local_addr();
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let c = SseClient::connect(addr, &format!("/sse?{query}"), &h)
                .await
                .unwrap();
            let status = c.status;
            (status, c.body().await)
        }
    };
    refused(401, "unauthorized")(get("channel=room:a".into(), vec![]).await);
    refused(401, "unauthorized")(get("channel=room:a&token=not.a.jwt".into(), vec![]).await);
    let expired = token_with(json!({"sub": "u1", "exp": now() - 10}));
    refused(401, "unauthorized")(get(format!("channel=room:a&token={expired}"), vec![]).await);
    // A channel the token does not grant.
    refused(403, "forbidden")(
        get(
            format!("channel=room:a&channel=user:other&token={t}"),
            vec![],
        )
        .await,
    );
    refused(403, "forbidden")(
        get(
            format!("channel=room:a&token={t}"),
            vec![("Origin", "https://evil.example".into())],
        )
        .await,
    );
    refused(400, "bad_request")(get(format!("token={t}"), vec![]).await);
    refused(400, "bad_request")(
        get(format!("channel=room:a&channel=room:a&token={t}"), vec![]).await,
    );
    refused(400, "bad_request")(
        get(
            format!("channel=room:a&channel=room:b&channel=room:c&token={t}"),
            vec![],
        )
        .await,
    );
    refused(400, "bad_request")(get(format!("channel=bad%20name&token={t}"), vec![]).await);
    refused(400, "bad_request")(
        get(
            format!("channel=room:a&token={t}"),
            vec![("Last-Event-ID", "1:e1,2:e2".into())],
        )
        .await,
    );

    // An allowed origin gets its stream, readable by its page (CORS).
    let mut one = sse(
        &node,
        &format!("channel=room:a&token={t}"),
        &[("Origin", "https://app.example")],
    )
    .await;
    assert_eq!(one.status, 200);
    assert_eq!(
        one.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    next_of(&mut one, "connected").await;
    // The user's one connection is taken: 429.
    refused(429, "rate_limited")(get(format!("channel=room:a&token={t}"), vec![]).await);
    // Another user fills the node (two connections): 503.
    let mut two = sse(
        &node,
        &format!("channel=room:a&token={}", token("u2", &[])),
        &[],
    )
    .await;
    next_of(&mut two, "connected").await;
    refused(503, "unavailable")(
        get(format!("channel=room:a&token={}", token("u3", &[])), vec![]).await,
    );
    let refusals = metric(
        &node,
        "fanout_client_http_requests_total{endpoint=\"sse\",status=\"503\"}",
    )
    .await;
    assert!(refusals >= 1.0, "{refusals}");
    drop((one, two));
    node.shutdown().await;
}

#[tokio::test]
async fn sigterm_drains_event_streams_like_sockets() {
    let redis = RedisServer::start().unwrap();
    let (mut child, addr) = spawn_edge(&redis.url(), "sse-drain", &["--drain-secs", "1"]).await;
    let t = token("u1", &[]);
    let mut s = SseClient::connect(addr, &format!("/sse?channel=user:u1&token={t}"), &[])
        .await
        .unwrap();
    assert_eq!(s.status, 200);
    next_of(&mut s, "connected").await;
    next_of(&mut s, "subscribed").await;
    let mut ws = fanout_testkit::WsClient::connect(&format!("ws://{addr}/ws?token={t}"))
        .await
        .unwrap();
    ws.recv_type("connected").await;
    sigterm(&child);
    let close = next_of(&mut s, "close").await.json();
    assert_eq!(close["code"], 1001, "{close}");
    assert!(s.next().await.is_none(), "the stream ended");
    assert_eq!(ws.expect_close().await, Some(1001));
    exits_cleanly(&mut child).await;
}

#[tokio::test]
async fn a_stalled_reader_is_closed_and_other_streams_are_unaffected() {
    let cfg = config_file(&format!(
        "{CFG}[limits]\nqueue_messages = 64\nqueue_bytes = 1048576\n"
    ));
    let node = start(None, &["--config", cfg.to_str().unwrap()]).await;
    let t = token("u1", &[]);
    let query = format!("channel=room:big&token={t}");
    let mut stalled = sse(&node, &query, &[]).await;
    next_of(&mut stalled, "connected").await;
    next_of(&mut stalled, "subscribed").await;
    let mut reader = sse(&node, &query, &[]).await;
    next_of(&mut reader, "connected").await;
    next_of(&mut reader, "subscribed").await;
    // 400 messages of 32 KiB (13 MB): far more than the socket buffers and the
    // 1 MiB outbox of a reader that reads nothing.
    let pad = "x".repeat(32 * 1024);
    let publisher = {
        let addr = node.local_addr();
        tokio::spawn(async move {
            for n in 1..=400u64 {
                let body = json!({"channel": "room:big", "data": {"n": n, "pad": pad}}).to_string();
                let (status, out) = api_publish_body_at(addr, &body).await;
                assert_eq!(status, 200, "{out}");
            }
        })
    };
    assert_eq!(
        messages(&mut reader, "room:big", 400).await,
        (1..=400).collect::<Vec<_>>()
    );
    publisher.await.unwrap();
    eventually("the stalled stream counted as a slow consumer", || async {
        metric(&node, "fanout_slow_consumer_closes_total").await >= 1.0
    })
    .await;
    // Its connection goes: whatever it had buffered, then the end (not a hang).
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while stalled.try_next(Duration::from_secs(10)).await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the stalled stream was never ended");
    node.shutdown().await;
}

#[tokio::test]
async fn a_reader_that_goes_away_ends_its_session() {
    let cfg = config_file(&format!("{CFG}[limits]\nping_interval_secs = 1\n"));
    let node = start(None, &["--config", cfg.to_str().unwrap()]).await;
    let t = token("u1", &[]);
    let mut s = sse(&node, &format!("channel=room:gone&token={t}"), &[]).await;
    next_of(&mut s, "connected").await;
    next_of(&mut s, "subscribed").await;
    assert_eq!(stats(&node).await["node"]["connections"], 1);
    drop(s);
    // Found at the next heartbeat at the latest: the connection, its subscription and
    // its slot are given back.
    eventually("the session of a vanished reader ended", || async {
        let v = stats(&node).await;
        v["node"]["connections"] == 0 && v["node"]["subscriptions"] == 0
    })
    .await;
    node.shutdown().await;
}

#[tokio::test]
async fn client_publish_obeys_the_namespace_rule() {
    let cfg = config_file(&format!(
        "{CFG}[limits]\nmessages_per_second = 1\nmessage_burst = 12\nmax_message_size = 1024\n"
    ));
    let node = start(None, &["--config", cfg.to_str().unwrap()]).await;
    let addr = node.local_addr();
    let t = token("u1", &[]);
    let post = |bearer: Option<String>, body: String| async move {
        let (status, out) = fanout_testkit::http(
            addr,
            "POST",
            "/client/publish",
            bearer.as_deref(),
            Some(&body),
        )
        .await;
        (
            status,
            serde_json::from_str::<Value>(&out).unwrap_or(Value::Null),
        )
    };
    let mut s = sse(
        &node,
        &format!("channel=room:1&channel=chat:1&token={t}"),
        &[],
    )
    .await;
    next_of(&mut s, "connected").await;
    next_of(&mut s, "subscribed").await;
    next_of(&mut s, "subscribed").await;

    // `authenticated`: anyone with a token; the stream gets it.
    let (status, ack) = post(
        Some(t.clone()),
        json!({"channel": "room:1", "data": {"n": 1}}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{ack}");
    assert_eq!(ack["offset"], 1);
    assert!(ack["epoch"].is_string());
    assert_eq!(messages(&mut s, "room:1", 1).await, vec![1]);
    // `subscribers`: whoever may subscribe.
    let (status, ack) = post(
        Some(t.clone()),
        json!({"channel": "chat:1", "data": {"n": 2}, "event": "said"}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{ack}");
    let m = next_of(&mut s, "message").await.json();
    assert_eq!(
        (m["event"].as_str(), m["data"]["n"].as_u64()),
        (Some("said"), Some(2))
    );
    // `none`: workers only.
    let (status, err) = post(
        Some(t.clone()),
        json!({"channel": "news:1", "data": {}}).to_string(),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{err}"
    );
    // A channel of another user's.
    let (status, err) = post(
        Some(t.clone()),
        json!({"channel": "user:other", "data": {}}).to_string(),
    )
    .await;
    assert_eq!(status, 403, "{err}");
    // No token, a bad one; a bad body; too large.
    let (status, err) = post(None, json!({"channel": "room:1", "data": {}}).to_string()).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{err}"
    );
    let (status, _) = post(
        Some("x.y.z".into()),
        json!({"channel": "room:1", "data": {}}).to_string(),
    )
    .await;
    assert_eq!(status, 401);
    let (status, err) = post(Some(t.clone()), "{\"channel\":".into()).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{err}"
    );
    let (status, err) = post(
        Some(t.clone()),
        json!({"channel": "room:1", "data": "x".repeat(2000)}).to_string(),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (413, Some("too_large")),
        "{err}"
    );
    // Presence over HTTP.
    let (status, out) = fanout_testkit::http(
        addr,
        "GET",
        "/client/presence?channel=room:1",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(status, 200, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["clients"].as_array().map(|c| c.len()), Some(1), "{v}");
    let (status, _) = fanout_testkit::http(
        addr,
        "GET",
        "/client/presence?channel=news:1",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(status, 400, "presence is off for news");
    // The burst (12 requests so far, at 1/s) is spent: 429.
    let mut limited = false;
    for _ in 0..5 {
        let (status, _) = post(
            Some(t.clone()),
            json!({"channel": "room:1", "data": {"n": 0}}).to_string(),
        )
        .await;
        limited |= status == 429;
    }
    assert!(limited, "the rate limit applies to HTTP commands");
    node.shutdown().await;
}

#[tokio::test]
async fn curl_shows_job_progress_live() {
    if fanout_testkit::find_binary("curl").is_none() {
        panic!("curl is not installed (scripts/test.sh installs it)");
    }
    let node = start(None, &[]).await;
    let t = token("u1", &["job_progress:9"]);
    let url = format!("{}/sse?channel=job_progress:9&token={t}", node.http_url());
    let mut curl = tokio::process::Command::new("curl")
        .args(["-sN", &url])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(curl.stdout.take().unwrap());
    let mut seen = String::new();
    read_until(&mut out, &mut seen, "event: subscribed").await;
    api_publish(&node, "job_progress:9", json!({"pct": 40})).await;
    read_until(&mut out, &mut seen, "\"pct\":40").await;
    api_publish(&node, "job_progress:9", json!({"status": "succeeded"})).await;
    read_until(&mut out, &mut seen, "\"reason\":\"completed\"").await;
    node.shutdown().await;
}

/// Reads curl's output until it shows `needle` (10 s at most).
async fn read_until(
    out: &mut tokio::io::BufReader<tokio::process::ChildStdout>,
    seen: &mut String,
    needle: &str,
) {
    use tokio::io::AsyncBufReadExt;
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while !seen.contains(needle) {
            let mut line = String::new();
            if out.read_line(&mut line).await.unwrap() == 0 {
                break;
            }
            seen.push_str(&line);
        }
    })
    .await;
    assert!(
        found.is_ok() && seen.contains(needle),
        "no {needle} in {seen}"
    );
}

/// A browser page on another origin asks before it sends its token in a header.
#[tokio::test]
async fn the_cors_preflight_admits_allowed_origins_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = start(None, &["--allowed-origins", "https://app.example"]).await;
    let preflight = |origin: &'static str| {
        let addr = node.local_addr();
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!(
                "OPTIONS /sse?channel=user:1 HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\n\
                 Access-Control-Request-Method: GET\r\n\
                 Access-Control-Request-Headers: authorization, last-event-id\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out.to_ascii_lowercase()
        }
    };
    let ok = preflight("https://app.example").await;
    assert!(ok.starts_with("http/1.1 204"), "{ok}");
    assert!(
        ok.contains("access-control-allow-origin: https://app.example"),
        "{ok}"
    );
    assert!(
        ok.contains("access-control-allow-headers: authorization, content-type, idempotency-key, last-event-id"),
        "{ok}"
    );
    let refused = preflight("https://evil.example").await;
    assert!(refused.starts_with("http/1.1 403"), "{refused}");
    assert!(
        !refused.contains("access-control-allow-origin"),
        "{refused}"
    );
    node.shutdown().await;
}
