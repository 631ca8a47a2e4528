//! No silent loss: history and recovery (`since`, `last`), the job lifecycle, gap repair
//! after Redis drops or restarts, slow consumers and conflation. Every message carries a
//! sequence number `n`, so loss, duplicates and reordering are counted, not guessed.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use fanout_publisher::{HistoryPolicy, Publisher};
use fanout_testkit::{RedisOptions, RedisServer, WsClient};
use serde_json::{json, Value};

/// Publishes `{"n": n}` on `channel` through the node's API for each `n`.
async fn publish_range(
    node: &fanout_edge::Node,
    channel: &str,
    range: std::ops::RangeInclusive<u64>,
) {
    for n in range {
        let (status, body) = api_publish(node, channel, json!({ "n": n })).await;
        assert_eq!(status, 200, "{body}");
    }
}

/// Message offsets among `frames` must rise by exactly one each.
fn assert_consecutive_offsets(frames: &[Value]) {
    let offsets: Vec<u64> = frames
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["offset"].as_u64().expect("offset"))
        .collect();
    for w in offsets.windows(2) {
        assert_eq!(w[1], w[0] + 1, "offsets not consecutive: {offsets:?}");
    }
}

#[tokio::test]
async fn reconnect_with_since_gets_exactly_the_missed_messages_then_live_ones() {
    for backend in Backend::all() {
        let name = backend.name();
        let node = start(backend.url().as_deref(), &[]).await;
        let t = token("7", &[]);
        let mut c = connect(&node, &t).await;
        assert_eq!(c.subscribe(1, "user:7").await["type"], "subscribed");
        publish_range(&node, "user:7", 1..=5).await;
        let seen = read_until_n(&mut c, 5).await;
        assert_eq!(numbers(&seen), (1..=5).collect::<Vec<_>>(), "{name}");
        let last = seen.last().unwrap().clone();
        c.close().await;

        // 50 messages while the client is away.
        publish_range(&node, "user:7", 6..=55).await;

        // It comes back with `since`, while 100 more are being published.
        let mut c = connect(&node, &t).await;
        let live = tokio::spawn({
            let addr = node.local_addr();
            async move {
                for n in 56..=155u64 {
                    let body = json!({"channel": "user:7", "data": {"n": n}}).to_string();
                    let (s, b) = api_publish_body_at(addr, &body).await;
                    assert_eq!(s, 200, "{b}");
                }
            }
        });
        c.send(json!({"type": "subscribe", "id": 2, "channel": "user:7",
                      "since": {"offset": last["offset"], "epoch": last["epoch"]}}))
            .await;
        let sub = c.recv_type("subscribed").await;
        assert_eq!(sub["recovered"], true, "{name}: {sub}");
        assert_eq!(sub["id"], 2);
        assert_eq!(sub["epoch"], last["epoch"]);
        let frames = read_until_n(&mut c, 155).await;
        // Exactly the missed ones, in order, then the live ones: no gap, no duplicate.
        assert_eq!(numbers(&frames), (6..=155).collect::<Vec<_>>(), "{name}");
        assert_consecutive_offsets(&frames);
        live.await.unwrap();
        // Nothing more arrives.
        assert!(
            c.next_within(Duration::from_millis(200)).await.is_none(),
            "{name}: an extra frame arrived"
        );
        assert!(metric(&node, "fanout_recoveries_total{outcome=\"recovered\"").await >= 1.0);
        node.shutdown().await;
    }
}

/// A client that subscribed before a channel's first message and lost its connection
/// recovers the first messages like any others: `subscribed` always carries a position.
#[tokio::test]
async fn a_channel_with_no_history_yet_still_gives_a_position_to_recover_from() {
    for backend in Backend::all() {
        let name = backend.name();
        let node = start(backend.url().as_deref(), &[]).await;
        let t = token("9", &["job_progress:*"]);
        for channel in ["user:9", "job_progress:77"] {
            let mut c = connect(&node, &t).await;
            let sub = c.subscribe(1, channel).await;
            assert_eq!(sub["type"], "subscribed", "{name}: {sub}");
            assert_eq!(sub["offset"], 0, "{name}: {sub}");
            let epoch = sub["epoch"].as_str().expect("an epoch").to_string();
            // A second subscriber before any message sees the same position.
            let mut other = connect(&node, &t).await;
            let again = other.subscribe(1, channel).await;
            assert_eq!(
                (again["offset"].as_u64(), again["epoch"].as_str()),
                (Some(0), Some(epoch.as_str()))
            );
            c.close().await;
            // The channel's first messages, published while the client is away.
            publish_range(&node, channel, 1..=3).await;
            let mut c = connect(&node, &t).await;
            c.send(json!({"type": "subscribe", "id": 2, "channel": channel,
                          "since": {"offset": 0, "epoch": epoch}}))
                .await;
            let sub = c.recv_type("subscribed").await;
            assert_eq!(
                (
                    sub["recovered"].as_bool(),
                    sub["offset"].as_u64(),
                    sub["epoch"].as_str()
                ),
                (Some(true), Some(3), Some(epoch.as_str())),
                "{name}: {sub}"
            );
            let frames = read_until_n(&mut c, 3).await;
            assert_eq!(numbers(&frames), vec![1, 2, 3], "{name} {channel}");
            assert_eq!(
                frames
                    .iter()
                    .filter(|f| f["type"] == "message")
                    .map(|f| f["offset"].as_u64().unwrap())
                    .collect::<Vec<_>>(),
                vec![1, 2, 3]
            );
            assert_eq!(numbers(&read_until_n(&mut other, 3).await), vec![1, 2, 3]);
        }
        node.shutdown().await;
    }
}

#[tokio::test]
async fn last_n_and_unrecoverable_since() {
    let cfg = config_file("[namespaces.feed]\nhistory_size = 10\n");
    for backend in Backend::all() {
        let name = backend.name();
        let node = start_configured(&backend, &cfg).await;
        let t = token("3", &["feed:*"]);
        publish_range(&node, "feed:a", 1..=30).await;
        let mut c = connect(&node, &t).await;

        // `last: 3` → the three newest, oldest first, then live.
        c.send(json!({"type":"subscribe","id":1,"channel":"feed:a","last":3}))
            .await;
        let sub = c.recv_type("subscribed").await;
        assert_eq!(sub["offset"], 30, "{name}: {sub}");
        assert!(sub.get("recovered").is_none(), "{sub}");
        publish_range(&node, "feed:a", 31..=31).await;
        let frames = read_until_n(&mut c, 31).await;
        assert_eq!(numbers(&frames), vec![28, 29, 30, 31], "{name}");
        let epoch = sub["epoch"].as_str().unwrap().to_string();

        // `since` older than the kept history (10 messages) → recovered:false, and the
        // position to continue from; nothing recovered is sent.
        c.send(json!({"type":"subscribe","id":2,"channel":"feed:b","last":0}))
            .await;
        c.recv_type("subscribed").await;
        publish_range(&node, "feed:b", 1..=30).await;
        let feed_b = read_until_n(&mut c, 30).await;
        let mut d = connect(&node, &t).await;
        d.send(json!({"type":"subscribe","id":3,"channel":"feed:b",
                      "since":{"offset": 5, "epoch": sub_epoch(&feed_b)}}))
            .await;
        let s = d.recv_type("subscribed").await;
        assert_eq!(s["recovered"], false, "{name}: trimmed history: {s}");
        assert_eq!(s["offset"], 30);
        assert!(d.next_within(Duration::from_millis(150)).await.is_none());

        // An offset beyond anything published (the largest there is) → recovered:false.
        d.send(json!({"type":"subscribe","id":30,"channel":"feed:c",
                      "since":{"offset": u64::MAX, "epoch": epoch}}))
            .await;
        let s = d.recv_type("subscribed").await;
        assert_eq!(s["recovered"], false, "{name}: {s}");

        // A `since` from another epoch → recovered:false.
        d.send(json!({"type":"subscribe","id":4,"channel":"feed:a",
                      "since":{"offset": 30, "epoch": format!("{epoch}-old")}}))
            .await;
        let s = d.recv_type("subscribed").await;
        assert_eq!(s["recovered"], false, "{name}: {s}");
        assert_eq!(s["epoch"], epoch.as_str());

        // The same epoch and nothing missed → recovered:true with nothing to send.
        let mut e = connect(&node, &t).await;
        e.send(json!({"type":"subscribe","id":5,"channel":"feed:a",
                      "since":{"offset": 31, "epoch": epoch}}))
            .await;
        let s = e.recv_type("subscribed").await;
        assert_eq!(s["recovered"], true, "{name}: {s}");
        assert!(e.next_within(Duration::from_millis(150)).await.is_none());

        // Bad combinations are refused with a clear error, and the socket stays usable.
        for (frame, expect) in [
            (
                json!({"type":"subscribe","id":6,"channel":"feed:c","last":2,"since":{"offset":1,"epoch":"x"}}),
                "cannot be combined",
            ),
            (
                json!({"type":"subscribe","id":7,"channel":"feed:c","last":10001}),
                "at most 10000",
            ),
        ] {
            e.send(frame).await;
            let err = e.recv_type("error").await;
            assert_eq!(err["code"], "bad_request", "{err}");
            assert!(err["message"].as_str().unwrap().contains(expect), "{err}");
        }
        assert!(
            metric(&node, "fanout_recoveries_total{outcome=\"not_recovered\"").await >= 2.0,
            "{name}"
        );
        node.shutdown().await;
    }
}

/// The epoch of the first message among `frames`.
fn sub_epoch(frames: &[Value]) -> String {
    frames
        .iter()
        .find(|f| f["type"] == "message")
        .and_then(|f| f["epoch"].as_str())
        .expect("a message with an epoch")
        .to_string()
}

#[tokio::test]
async fn a_terminal_job_status_completes_current_and_later_subscriptions() {
    let cfg = config_file("[namespaces.job_progress]\nfinished_ttl_secs = 120\n");
    for backend in Backend::all() {
        let name = backend.name();
        let node = start_configured(&backend, &cfg).await;
        let t = token("1", &["job_progress:*"]);
        let mut early = connect(&node, &t).await;
        let s = early.subscribe(1, "job_progress:42").await;
        assert_eq!(s["type"], "subscribed", "{s}");
        let ch = "job_progress:42";
        for pct in [10, 50] {
            api_publish(&node, ch, json!({"status":"running","pct":pct})).await;
        }
        assert_eq!(early.recv_type("message").await["data"]["pct"], 10);
        assert_eq!(early.recv_type("message").await["data"]["pct"], 50);

        // A subscriber arriving mid-job gets the latest state at once.
        let mut mid = connect(&node, &t).await;
        assert_eq!(mid.subscribe(1, ch).await["type"], "subscribed");
        assert_eq!(mid.recv_type("message").await["data"]["pct"], 50, "{name}");

        let (status, _) =
            api_publish(&node, ch, json!({"status":"succeeded","result":{"rows":9}})).await;
        assert_eq!(status, 200);
        for c in [&mut early, &mut mid] {
            let m = c.recv_type("message").await;
            assert_eq!(m["data"]["status"], "succeeded", "{name}");
            let u = c.recv_type("unsubscribed").await;
            assert_eq!(u["reason"], "completed", "{name}: {u}");
            assert_eq!(u["channel"], ch);
            // The subscription is over: unsubscribing is an error, subscribing again works.
            c.send(json!({"type":"unsubscribe","id":9,"channel":ch}))
                .await;
            assert_eq!(c.recv_type("error").await["code"], "bad_request");
        }
        // A subscriber to the finished job gets the final state, then the same end.
        let mut late = connect(&node, &t).await;
        assert_eq!(late.subscribe(1, ch).await["type"], "subscribed");
        assert_eq!(
            late.recv_type("message").await["data"]["status"],
            "succeeded"
        );
        assert_eq!(late.recv_type("unsubscribed").await["reason"], "completed");
        assert_eq!(stats(&node).await["node"]["subscriptions"], 0, "{name}");
        assert!(metric(&node, "fanout_job_subscriptions_completed_total").await >= 3.0);

        if let Backend::Redis(redis) = &backend {
            // Nobody listens any more: the node unsubscribed at Redis.
            eventually("UNSUBSCRIBE of the finished job", || async {
                redis.numsub(ch).unwrap() == 0
            })
            .await;
            // A finished job's history lives `finished_ttl_secs`, not the namespace TTL.
            let ttl: i64 = redis
                .cli(&["TTL", &fanout_protocol::layout::history_key(ch)])
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=120).contains(&ttl), "history TTL {ttl}");
            let ttl: i64 = redis
                .cli(&["TTL", &fanout_protocol::layout::meta_key(ch)])
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=120).contains(&ttl), "meta TTL {ttl}");
        }
        node.shutdown().await;
    }
}

/// A publisher that numbers its messages and remembers which ones Redis acknowledged.
struct Numbered {
    acked: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Numbered {
    /// Publishes `{"n": 0, 1, …}` on `channel` every `every` until stopped (at most
    /// `max` messages). A failed publish is not retried: its `n` is skipped.
    async fn start(url: &str, channel: &'static str, every: Duration, max: u64) -> Numbered {
        let publisher =
            Publisher::connect(url)
                .await
                .unwrap()
                .with_default_history(HistoryPolicy {
                    size: 100_000,
                    ttl: Duration::from_secs(600),
                    finished_ttl: None,
                });
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (acked, stop) = (acked.clone(), stop.clone());
            async move {
                for n in 0..max {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if publisher
                        .publish(channel, "", &json!({ "n": n }))
                        .await
                        .is_ok()
                    {
                        acked.lock().unwrap().push(n);
                    }
                    tokio::time::sleep(every).await;
                }
            }
        });
        Numbered { acked, stop, task }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// Reads `client` until it has the message `last`; asserts every `acked` one arrived,
/// exactly once and in order (a message whose publish failed may or may not arrive).
async fn assert_no_loss(client: &mut WsClient, acked: &[u64], who: &str) -> Vec<Value> {
    let last = *acked.last().expect("something was acknowledged");
    let frames = read_until_n(client, last).await;
    let got = numbers(&frames);
    let mut seen = HashSet::new();
    for w in got.windows(2) {
        assert!(
            w[0] < w[1],
            "{who}: out of order or duplicated: {} then {}",
            w[0],
            w[1]
        );
    }
    seen.extend(got.iter().copied());
    let missing: Vec<u64> = acked
        .iter()
        .filter(|n| !seen.contains(n))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "{who}: {} acknowledged messages never arrived: {:?}…",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    frames
}

#[tokio::test]
async fn kill_9_with_appendonly_loses_nothing_that_was_acknowledged() {
    let mut redis = RedisServer::start_with(RedisOptions {
        appendonly: true,
        ..Default::default()
    })
    .unwrap();
    let node = start(Some(&redis.url()), &[]).await;
    let t = token("9", &[]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = connect(&node, &t).await;
        assert_eq!(c.subscribe(1, "user:9").await["type"], "subscribed");
        clients.push(c);
    }
    let publisher = Numbered::start(&redis.url(), "user:9", Duration::from_millis(2), 20_000).await;
    eventually("100 publishes", || async { publisher.acked() >= 100 }).await;

    redis.kill();
    // Redis is down: sockets stay open, the node says it is not ready, and
    // subscribe and publish answer `unavailable` at once.
    eventually("/readyz 503", || async { readyz(&node).await == 503 }).await;
    let mut other = connect(&node, &token("10", &[])).await;
    let refused = other.subscribe(1, "user:10").await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    let (status, body) = api_publish(&node, "user:9", json!({"n": "x"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("unavailable"))
    );
    let before = publisher.acked();

    redis.restart().unwrap();
    eventually("publishes after the restart", || async {
        publisher.acked() >= before + 300
    })
    .await;
    eventually("/readyz 200", || async { readyz(&node).await == 200 }).await;
    let acked = publisher.finish().await;
    for (i, c) in clients.iter_mut().enumerate() {
        assert_no_loss(c, &acked, &format!("client {i}")).await;
    }
    assert!(metric(&node, "fanout_broker_reconnects_total").await >= 1.0);
    node.shutdown().await;
}

#[tokio::test]
async fn a_restart_without_persistence_tells_clients_recovered_false_with_a_new_epoch() {
    let mut redis = RedisServer::start().unwrap();
    let node = start(Some(&redis.url()), &[]).await;
    let t = token("11", &[]);
    let mut c = connect(&node, &t).await;
    assert_eq!(c.subscribe(1, "user:11").await["type"], "subscribed");
    publish_range(&node, "user:11", 1..=5).await;
    let before = read_until_n(&mut c, 5).await;
    let old_epoch = sub_epoch(&before);

    redis.kill();
    redis.restart().unwrap();
    eventually("/readyz 200", || async { readyz(&node).await == 200 }).await;
    eventually("resubscription", || async {
        redis.numsub("user:11").unwrap() == 1
    })
    .await;
    // `/readyz` may have answered before the node noticed the restart, and its publishing
    // connection can still be reconnecting: 503 (nothing published) until it is back.
    // Resent under one key each, so a 503 that did publish is not published twice.
    for n in 6..=10 {
        let body =
            json!({"channel": "user:11", "data": {"n": n}, "idempotency_key": format!("n{n}")});
        eventually(&format!("publish {n}"), || async {
            api_publish_body(&node, &body.to_string()).await.0 == 200
        })
        .await;
    }

    // The client learns that history was lost: `subscribed` with recovered:false (and
    // the new position), then only messages of the new epoch after that position.
    let frames = read_until_n(&mut c, 10).await;
    let i = frames
        .iter()
        .position(|f| f["type"] == "subscribed")
        .unwrap_or_else(|| panic!("no reset notice in {frames:?}"));
    let notice = &frames[i];
    assert_eq!(notice["recovered"], false, "{notice}");
    assert_eq!(notice["channel"], "user:11");
    assert!(
        notice.get("id").is_none(),
        "an unsolicited notice: {notice}"
    );
    assert_ne!(notice["epoch"], old_epoch.as_str());
    // The reset carries the new position, to recover from next time.
    assert!(notice["epoch"].is_string(), "{notice}");
    let o = notice["offset"]
        .as_u64()
        .expect("the reset carries an offset");
    let after: Vec<&Value> = frames[i + 1..].iter().collect();
    assert!(!after.is_empty());
    for m in &after {
        assert_ne!(m["epoch"], old_epoch.as_str(), "{m}");
        assert_eq!(m["epoch"], notice["epoch"], "{m}");
        assert!(m["offset"].as_u64().unwrap() > o, "{m} after {notice}");
    }
    assert!(metric(&node, "fanout_gap_repairs_total{outcome=\"reset\"").await >= 1.0);
    node.shutdown().await;
}

#[tokio::test]
async fn client_kill_of_the_pubsub_connection_loses_nothing() {
    let redis = RedisServer::start().unwrap();
    let node = start(Some(&redis.url()), &[]).await;
    let t = token("12", &[]);
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = connect(&node, &t).await;
        assert_eq!(c.subscribe(1, "user:12").await["type"], "subscribed");
        clients.push(c);
    }
    let publisher =
        Numbered::start(&redis.url(), "user:12", Duration::from_millis(1), 20_000).await;
    for round in 1..=3 {
        eventually("publishes", || async { publisher.acked() >= round * 300 }).await;
        eventually("the node's subscriber", || async {
            redis.numsub("user:12").unwrap() == 1
        })
        .await;
        let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
        assert_eq!(killed, "1", "the node's one subscriber connection");
    }
    let last = publisher.acked();
    eventually("publishes after the last kill", || async {
        publisher.acked() >= last + 300
    })
    .await;
    let acked = publisher.finish().await;
    assert_eq!(
        acked.len() as u64,
        acked.last().unwrap() + 1,
        "every publish acked"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        assert_no_loss(c, &acked, &format!("client {i}")).await;
    }
    assert!(metric(&node, "fanout_broker_reconnects_total").await >= 3.0);
    assert!(metric(&node, "fanout_repaired_messages_total").await >= 1.0);
    node.shutdown().await;
}

#[tokio::test]
async fn redis_dropping_the_subscriber_over_its_output_buffer_limit_loses_nothing() {
    let redis = RedisServer::start().unwrap();
    redis
        .cli(&[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 64kb 32kb 1",
        ])
        .unwrap();
    let node = start(Some(&redis.url()), &[]).await;
    let t = token("13", &[]);
    let mut c = connect(&node, &t).await;
    assert_eq!(c.subscribe(1, "user:13").await["type"], "subscribed");
    // The client reads all along (it is the node that falls behind, not the client),
    // until the message marked `last`.
    let reader = tokio::spawn(async move {
        let mut frames = Vec::new();
        loop {
            let f = c.recv().await;
            let done = f["data"]["last"] == true;
            frames.push(f);
            if done {
                return frames;
            }
        }
    });
    let publisher = Publisher::connect(&redis.url())
        .await
        .unwrap()
        .with_default_history(HistoryPolicy {
            size: 100_000,
            ttl: Duration::from_secs(600),
            finished_ttl: None,
        });
    // Messages bigger than the hard limit (64 KB): the first one Redis tries to send
    // makes it drop the node's subscriber, and what follows until the node is back is
    // never sent to it. Bursts of them, concurrently, until Redis has dropped the
    // subscriber at least once.
    let blob = "x".repeat(100 * 1024);
    let mut n = 0u64;
    for _ in 0..5 {
        let burst: Vec<_> = (n..n + 50)
            .map(|i| {
                let (publisher, blob) = (&publisher, &blob);
                async move {
                    publisher
                        .publish("user:13", "", &json!({"n": i, "blob": blob}))
                        .await
                }
            })
            .collect();
        for r in futures_util::future::join_all(burst).await {
            r.unwrap();
        }
        n += 50;
        if metric(&node, "fanout_broker_reconnects_total").await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        metric(&node, "fanout_broker_reconnects_total").await >= 1.0,
        "Redis never dropped the node's subscriber"
    );
    // One more after the drop, so that the tail is checked too.
    publisher
        .publish("user:13", "", &json!({"n": n, "last": true}))
        .await
        .unwrap();
    let frames = reader.await.unwrap();
    // Every message, exactly once, in order.
    assert_eq!(numbers(&frames), (0..=n).collect::<Vec<_>>());
    assert_consecutive_offsets(&frames);
    assert!(metric(&node, "fanout_repaired_messages_total").await >= 1.0);
    node.shutdown().await;
}

#[tokio::test]
async fn a_client_over_its_byte_budget_is_closed_4009_and_the_queue_memory_is_accounted() {
    let cfg = config_file("[limits]\nqueue_messages = 100000\nqueue_bytes = 65536\n");
    for backend in Backend::all() {
        let name = backend.name();
        let node = start_configured(&backend, &cfg).await;
        let t = token("14", &["chat:*"]);
        let mut slow = connect(&node, &t).await;
        let mut fast = connect(&node, &t).await;
        assert_eq!(slow.subscribe(1, "chat:big").await["type"], "subscribed");
        assert_eq!(fast.subscribe(1, "chat:big").await["type"], "subscribed");
        let blob = "y".repeat(32 * 1024);
        let total = 600u64;
        let mut peak = 0u64;
        for n in 0..total {
            let (s, b) = api_publish(&node, "chat:big", json!({"n": n, "blob": blob})).await;
            assert_eq!(s, 200, "{b}");
            assert_eq!(fast.recv_type("message").await["data"]["n"], n, "{name}");
            if n % 20 == 0 {
                let q = stats(&node).await["node"]["outbound_queue_bytes"]
                    .as_u64()
                    .unwrap();
                peak = peak.max(q);
            }
        }
        // Never more than the two connections' budgets (plus one message each).
        assert!(peak <= 2 * (65_536 + 33 * 1024), "{name}: peak {peak}");
        // What was in flight, then the close.
        let code = slow.expect_close().await;
        assert_eq!(code, Some(4009), "{name}");
        assert!(metric(&node, "fanout_slow_consumer_closes_total{limit=\"bytes\"").await >= 1.0);
        // Once the slow connection is gone and the fast one has read everything, the
        // node holds no queued bytes.
        eventually("queues drained", || async {
            stats(&node).await["node"]["outbound_queue_bytes"] == 0
        })
        .await;
        node.shutdown().await;
    }
}

#[tokio::test]
async fn a_conflating_namespace_keeps_a_slow_client_with_the_newest_state() {
    let cfg = config_file(
        "[limits]\nqueue_messages = 8\n[namespaces.progress]\nconflate = true\nhistory_size = 0\n",
    );
    for backend in Backend::all() {
        let name = backend.name();
        let node = start_configured(&backend, &cfg).await;
        let t = token("15", &["progress:*"]);
        let mut slow = connect(&node, &t).await;
        assert_eq!(slow.subscribe(1, "progress:p").await["type"], "subscribed");
        // Big messages fill the socket buffers, then the 8-slot queue, while `slow`
        // reads nothing.
        let blob = "z".repeat(32 * 1024);
        let total = 600u64;
        for n in 0..total {
            let (s, b) = api_publish(&node, "progress:p", json!({"n": n, "blob": blob})).await;
            assert_eq!(s, 200, "{b}");
        }
        assert!(
            metric(&node, "fanout_conflated_messages_total").await >= 1.0,
            "{name}: nothing was conflated"
        );
        // It was never closed; it gets messages in order, ending with the newest.
        let frames = read_until_n(&mut slow, total - 1).await;
        let got = numbers(&frames);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{name}: order");
        assert!(
            (got.len() as u64) < total,
            "{name}: conflation dropped nothing"
        );
        assert_eq!(slow.subscribe(2, "progress:q").await["type"], "subscribed");
        node.shutdown().await;
    }
}

/// Notices (join/leave) of a conflating channel cannot be conflated away: once the
/// queue is full they wait beside it, counted and bounded like queued frames, so a
/// client that reads nothing while others come and go is closed 4009, not left to
/// grow for ever.
#[tokio::test]
async fn notices_waiting_for_a_slow_conflating_client_are_bounded() {
    let cfg = config_file(
        "[limits]\nqueue_messages = 8\n[namespaces.room]\nconflate = true\njoin_leave = true\nhistory_size = 0\nsubscribe = \"authenticated\"\n",
    );
    let node = start_configured(&Backend::Memory, &cfg).await;
    let mut slow = connect(&node, &token("1", &[])).await;
    assert_eq!(slow.subscribe(1, "room:r").await["type"], "subscribed");
    let _slow = slow.into_inner();
    // Fill the socket buffers and the queue.
    let blob = "z".repeat(32 * 1024);
    for n in 0..600u64 {
        let (s, b) = api_publish(&node, "room:r", json!({"n": n, "blob": blob})).await;
        assert_eq!(s, 200, "{b}");
    }
    assert!(metric(&node, "fanout_conflated_messages_total").await >= 1.0);
    let series = "fanout_slow_consumer_closes_total{limit=\"messages\"";
    let before = metric(&node, series).await;
    // Others come and go: each join and leave is a notice for the slow client.
    for round in 0..20 {
        let mut c = connect(&node, &token(&format!("u{round}"), &[])).await;
        assert_eq!(c.subscribe(1, "room:r").await["type"], "subscribed");
        c.close().await;
    }
    eventually("the slow client closed for its waiting notices", || async {
        metric(&node, series).await - before >= 1.0
    })
    .await;
    node.shutdown().await;
}

/// A gap whose repair cannot read history (here the channel's history key was
/// overwritten with the wrong type) is not held for ever: after
/// `limits.repair_timeout_secs` the subscribers are told `recovered:false` and get what
/// was held.
#[tokio::test]
async fn a_repair_that_keeps_failing_ends_in_recovered_false() {
    let redis = RedisServer::start().unwrap();
    let cfg = config_file("[limits]\nrepair_timeout_secs = 2\n");
    let node = start(Some(&redis.url()), &["--config", cfg.to_str().unwrap()]).await;
    let mut c = connect(&node, &token("5", &[])).await;
    let sub = c.subscribe(1, "user:5").await;
    let epoch = sub["epoch"].as_str().unwrap().to_string();
    publish_range(&node, "user:5", 1..=1).await;
    assert_eq!(c.recv_type("message").await["offset"], 1);
    // History becomes unreadable, then offset 3 arrives (2 is missing).
    redis.cli(&["DEL", "fanout:{user:5}:meta"]).unwrap();
    redis
        .cli(&["SET", "fanout:{user:5}:meta", "not a hash"])
        .unwrap();
    let envelope =
        format!(r#"{{"fanout":1,"offset":3,"epoch":"{epoch}","data":{{"n":3}},"ts":1}}"#);
    redis.cli(&["PUBLISH", "user:5", &envelope]).unwrap();
    let started = std::time::Instant::now();
    let reset = c.recv_type("subscribed").await;
    assert_eq!(
        (
            reset["recovered"].as_bool(),
            reset["offset"].as_u64(),
            reset["epoch"].as_str()
        ),
        (Some(false), Some(2), Some(epoch.as_str())),
        "{reset}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let m = c.recv_type("message").await;
    assert_eq!(
        (m["offset"].as_u64(), m["data"]["n"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(
        metric(&node, "fanout_gap_repairs_total{outcome=\"abandoned\"").await,
        1.0
    );
    node.shutdown().await;
}

#[tokio::test]
async fn the_liveness_probe_catches_a_frozen_redis() {
    let redis = RedisServer::start().unwrap();
    let node = start(Some(&redis.url()), &["--redis-probe-ms", "300"]).await;
    let mut c = connect(&node, &token("16", &[])).await;
    assert_eq!(c.subscribe(1, "user:16").await["type"], "subscribed");
    // Connections stay open but nothing answers: TCP alone would never notice.
    redis.pause();
    eventually("/readyz 503", || async { readyz(&node).await == 503 }).await;
    assert!(metric(&node, "fanout_broker_probe_failures_total").await >= 1.0);
    redis.resume();
    eventually("/readyz 200", || async { readyz(&node).await == 200 }).await;
    eventually("resubscription", || async {
        redis.numsub("user:16").unwrap() == 1
    })
    .await;
    publish_range(&node, "user:16", 1..=3).await;
    assert_eq!(numbers(&read_until_n(&mut c, 3).await), vec![1, 2, 3]);
    node.shutdown().await;
}
