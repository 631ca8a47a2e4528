//! Behaviour that depends on Redis itself: one subscription per channel per node,
//! resubscription after Redis restarts, and slow consumers (on both brokers).

mod common;

use std::time::Duration;

use common::*;
use fanout_testkit::RedisServer;
use serde_json::json;

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn hundred_local_subscribers_make_one_redis_subscription() {
    let redis = RedisServer::start().unwrap();
    let node = start(Some(&redis.url()), &[]).await;
    let t = token("1", &["chat:*"]);
    let mut clients = Vec::new();
    for _ in 0..100 {
        let mut c = connect(&node, &t).await;
        assert_eq!(c.subscribe(1, "chat:room").await["type"], "subscribed");
        clients.push(c);
    }
    assert_eq!(redis.numsub("chat:room").unwrap(), 1);
    // Every one of them gets a message published once.
    let (status, _) = api_publish(&node, "chat:room", json!({"hello": 1})).await;
    assert_eq!(status, 200);
    for c in clients.iter_mut() {
        assert_eq!(c.recv_type("message").await["data"], json!({"hello": 1}));
    }
    // 99 leave: still subscribed.
    let last = clients.pop().unwrap();
    for mut c in clients {
        c.send(json!({"type":"unsubscribe","channel":"chat:room"}))
            .await;
        c.recv_type("unsubscribed").await;
    }
    assert_eq!(redis.numsub("chat:room").unwrap(), 1);
    // The last one leaves by disconnecting: Redis has no subscriber left.
    last.close().await;
    wait_for("UNSUBSCRIBE", || redis.numsub("chat:room").unwrap() == 0).await;
    node.shutdown().await;
}

#[tokio::test]
async fn subscriptions_come_back_after_redis_restarts() {
    let mut redis = RedisServer::start().unwrap();
    let node = start(Some(&redis.url()), &[]).await;
    let mut a = connect(&node, &token("42", &[])).await;
    let mut b = connect(&node, &token("1", &["job_progress:*"])).await;
    assert_eq!(a.subscribe(1, "user:42").await["type"], "subscribed");
    assert_eq!(b.subscribe(1, "job_progress:7").await["type"], "subscribed");

    redis.kill();
    // While Redis is down, the node says so and sockets stay open.
    let addr = node.local_addr();
    let mut not_ready = false;
    for _ in 0..100 {
        let (s, _) = fanout_testkit::http(addr, "GET", "/readyz", None, None).await;
        if s == 503 {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(not_ready, "/readyz stayed 200 with Redis down");
    redis.restart().unwrap();

    wait_for("resubscription", || {
        redis.numsub("user:42").unwrap() == 1 && redis.numsub("job_progress:7").unwrap() == 1
    })
    .await;
    // Redis came back empty: what its history held is gone, and each subscriber is told
    // so (never silent), with the channel's new position to recover from.
    for (c, channel) in [(&mut a, "user:42"), (&mut b, "job_progress:7")] {
        let reset = c.recv_type("subscribed").await;
        assert_eq!(
            (
                reset["channel"].as_str(),
                reset["recovered"].as_bool(),
                reset["offset"].as_u64()
            ),
            (Some(channel), Some(false), Some(0)),
            "{reset}"
        );
        assert!(reset["epoch"].is_string(), "{reset}");
    }
    // Raw PUBLISH from any language reaches the clients that never reconnected.
    redis
        .cli(&["PUBLISH", "user:42", r#"{"after":"restart"}"#])
        .unwrap();
    redis
        .cli(&["PUBLISH", "job_progress:7", r#"{"pct":40}"#])
        .unwrap();
    let m = a.recv_type("message").await;
    assert_eq!(m["data"], json!({"after": "restart"}));
    assert!(
        m.get("offset").is_none(),
        "a raw PUBLISH carries no offset: {m}"
    );
    assert_eq!(b.recv_type("message").await["data"], json!({"pct": 40}));
    // Both Redis connections are back (the command connection may still be in backoff).
    let mut ready = false;
    for _ in 0..150 {
        if fanout_testkit::http(addr, "GET", "/readyz", None, None)
            .await
            .0
            == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "/readyz did not return to 200 after Redis came back");
    node.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_4009_and_delays_nobody() {
    for backend in Backend::all() {
        let cfg = config_file("[limits]\nqueue_messages = 32\n");
        let node = start_configured(&backend, &cfg).await;
        let t = token("5", &["chat:*"]);
        let mut slow = connect(&node, &t).await;
        let mut fast = connect(&node, &t).await;
        assert_eq!(slow.subscribe(1, "chat:burst").await["type"], "subscribed");
        assert_eq!(fast.subscribe(1, "chat:burst").await["type"], "subscribed");
        // `slow` is never read while we publish; big messages fill the socket buffers,
        // then its queue.
        let blob = "x".repeat(32 * 1024);
        let total = 600;
        let publisher = tokio::spawn({
            let addr = node.local_addr();
            let blob = blob.clone();
            async move {
                for n in 0..total {
                    let body =
                        json!({"channel":"chat:burst","data":{"n":n,"blob":blob}}).to_string();
                    let (s, b) = api_publish_body_at(addr, &body).await;
                    assert_eq!(s, 200, "{b}");
                }
            }
        });
        // The reading client gets every message, in order, while `slow` reads nothing.
        for n in 0..total {
            let m = fast.recv_type("message").await;
            assert_eq!(m["data"]["n"], n, "{}", backend.name());
        }
        publisher.await.unwrap();
        // The slow client finds what was in flight, then the 4009 close.
        // What was in flight, then the close.
        let code = slow.expect_close().await;
        assert_eq!(code, Some(4009), "{}", backend.name());
        let metrics = fanout_testkit::http(node.local_addr(), "GET", "/metrics", None, None)
            .await
            .1;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("fanout_slow_consumer_closes_total") && !l.ends_with(" 0")),
            "{metrics}"
        );
        node.shutdown().await;
    }
}

#[tokio::test]
async fn a_channel_redis_refuses_fails_alone_and_is_retried_until_allowed() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("fanout_edge=debug,fred=debug")
        .with_writer(std::io::stderr)
        .try_init();
    let redis = RedisServer::start().unwrap();
    let node = start(Some(&redis.url()), &[]).await;
    let t = token("1", &["chat:*"]);
    let mut held = connect(&node, &t).await;
    assert_eq!(held.subscribe(1, "chat:held").await["type"], "subscribed");

    // Redis stops allowing chat:held, and the node's subscriber connection is cut: on
    // reconnect the node's resubscription of chat:held is refused (NOPERM).
    redis
        .cli(&[
            "ACL",
            "SETUSER",
            "default",
            "resetchannels",
            "&chat:ok*",
            "&user:*",
        ])
        .unwrap();
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    let addr = node.local_addr();
    let mut ready = false;
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if fanout_testkit::http(addr, "GET", "/readyz", None, None)
            .await
            .0
            == 200
        {
            ready = true;
            break;
        }
    }
    assert!(ready);

    // Other subscribes are unaffected by the refused channel; the refused one fails alone.
    let mut other = connect(&node, &t).await;
    assert_eq!(other.subscribe(1, "chat:ok1").await["type"], "subscribed");
    let r = other.subscribe(2, "chat:denied").await;
    assert_eq!(
        (r["type"].as_str(), r["code"].as_str()),
        (Some("error"), Some("unavailable"))
    );
    assert!(
        !r["message"].as_str().unwrap().contains("NOPERM"),
        "broker details leak: {r}"
    );
    assert_eq!(redis.numsub("chat:held").unwrap(), 0);
    // The refused channel is retried with backoff, not in a tight loop.
    let errors = metric(&node, "fanout_broker_errors_total{op=\"subscribe\"").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let more = metric(&node, "fanout_broker_errors_total{op=\"subscribe\"").await - errors;
    assert!(more <= 6.0, "{more} refused subscribes in 2 s");

    // Allowed again: the retry brings chat:held back without the client doing anything.
    redis
        .cli(&["ACL", "SETUSER", "default", "allchannels"])
        .unwrap();
    wait_for("the retried subscription", || {
        redis.numsub("chat:held").unwrap() == 1
    })
    .await;
    redis
        .cli(&["PUBLISH", "chat:held", r#"{"back":true}"#])
        .unwrap();
    assert_eq!(
        held.recv_type("message").await["data"],
        json!({"back": true})
    );
    node.shutdown().await;
}

/// A subscribe waiting on a Redis that does not answer has a deadline (`unavailable`,
/// with nothing left behind), and the connection's timers keep running meanwhile: the
/// node keeps pinging the client while its subscribe waits.
#[tokio::test]
async fn a_subscribe_stuck_on_the_broker_ends_at_its_deadline_and_the_reader_keeps_its_timers() {
    let redis = RedisServer::start().unwrap();
    let cfg = common::config_file("[limits]\nping_interval_secs = 1\nsubscribe_timeout_secs = 2\n");
    let node = start(Some(&redis.url()), &["--config", cfg.to_str().unwrap()]).await;
    let mut held = connect(&node, &token("1", &[])).await;
    assert_eq!(held.subscribe(1, "user:1").await["type"], "subscribed");
    let mut c = connect(&node, &token("1", &[])).await;
    let subscriptions = metric(&node, "fanout_subscriptions").await;
    // Redis stops answering for 5 s.
    redis.cli(&["CLIENT", "PAUSE", "5000", "ALL"]).unwrap();
    // One channel the node already holds at the broker (its history read waits), one
    // it must subscribe first (its SUBSCRIBE waits).
    let started = std::time::Instant::now();
    let pings_before = c.pings();
    c.send(json!({"type":"subscribe","id":2,"channel":"user:1"}))
        .await;
    let e = c.recv_type("error").await;
    let waited = started.elapsed();
    assert_eq!(
        (e["id"].as_u64(), e["code"].as_str()),
        (Some(2), Some("unavailable")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("within 2 s"), "{e}");
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert!(
        c.pings() > pings_before,
        "no ping while the subscribe waited"
    );
    let mut d = connect(&node, &token("2", &[])).await;
    d.send(json!({"type":"subscribe","id":3,"channel":"user:2"}))
        .await;
    let e = d.recv_type("error").await;
    assert_eq!(
        (e["id"].as_u64(), e["code"].as_str()),
        (Some(3), Some("unavailable")),
        "{e}"
    );
    // Nothing left behind: no joiner in the hub, and the broker subscription nobody
    // holds is let go.
    eventually("the abandoned subscriptions undone", || async {
        metric(&node, "fanout_subscriptions").await == subscriptions
            && redis.numsub("user:2").unwrap() == 0
    })
    .await;
    // The held subscription still works, and a new subscribe succeeds.
    let (status, body) = api_publish(&node, "user:1", json!({"n": 1})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(held.recv_type("message").await["data"]["n"], 1);
    assert_eq!(c.subscribe(4, "user:1").await["type"], "subscribed");
    node.shutdown().await;
}
