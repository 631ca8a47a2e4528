//! Publishes carry an idempotency key and are resent until acknowledged: against real
//! Redis (one server, and a 3-primary cluster with a replica per shard), the script
//! applies a key at most once, a resend after a lost reply is not delivered twice, and
//! the `fanout-publish` CLI, run once per message, gets every message through a
//! `CLUSTER FAILOVER` and a slot migration exactly once and in order to an edge client.

mod common;

use common::ADMIN;

use std::time::{Duration, Instant};

use fanout_edge::Node;
use fanout_protocol::layout;
use fanout_publisher::{DedupPolicy, Publisher, RetryPolicy};
use fanout_testkit::{RedisCluster, RedisServer, WsClient};
use serde_json::{json, value::RawValue, Value};

async fn subscriber(node: &Node, user: &str) -> WsClient {
    let token = common::token(user, &[]);
    let mut c = WsClient::connect(&format!("{}?token={token}", node.ws_url()))
        .await
        .unwrap();
    c.recv_type("connected").await;
    let r = c.subscribe(1, &format!("user:{user}")).await;
    assert_eq!(r["type"], "subscribed", "{r}");
    c
}

/// The `n` of every message until the one numbered `last`, in arrival order.
async fn numbers_until(c: &mut WsClient, last: u64, within: Duration) -> Vec<u64> {
    let mut got = Vec::new();
    tokio::time::timeout(within, async {
        loop {
            let f = c.recv().await;
            if f["type"] != "message" {
                continue;
            }
            let n = f["data"]["n"].as_u64().unwrap();
            got.push(n);
            if n == last {
                break;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("message {last} not received; got {got:?}"));
    got
}

fn raw(v: Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(&v).unwrap()
}

/// Messages a raw `SUBSCRIBE` got on `channel` of the single server.
async fn raw_subscriber(url: &str, channel: &str) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    use fred::prelude::*;
    let client = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    let mut rx = client.message_rx();
    client.subscribe(channel).await.unwrap();
    let (tx, out) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _keep = client;
        while let Ok(m) = rx.recv().await {
            let _ = tx.send(m.value.as_string().unwrap_or_default());
        }
    });
    out
}

#[tokio::test]
async fn the_script_applies_an_idempotency_key_at_most_once() {
    let redis = RedisServer::start().unwrap();
    let channel = "user:1";
    let mut messages = raw_subscriber(&redis.url(), channel).await;
    let publisher = Publisher::connect(&redis.url())
        .await
        .unwrap()
        .with_dedup(DedupPolicy {
            window: Duration::from_secs(1),
            max_keys: 3,
        });

    // The same key twice: one message, one history entry, the same offset.
    let first = publisher
        .publish_with_key(channel, None, &raw(json!({"n": 1})), "key-1")
        .await
        .unwrap();
    let again = publisher
        .publish_with_key(channel, None, &raw(json!({"n": 1})), "key-1")
        .await
        .unwrap();
    assert_eq!((first.offset, first.duplicate), (1, false));
    assert_eq!(
        (again.offset, &again.epoch, again.duplicate),
        (1, &first.epoch, true)
    );
    let history = layout::history_key(channel);
    assert_eq!(redis.cli(&["XLEN", &history]).unwrap(), "1");

    // A publish without a key, as other-language callers (and older versions) send it:
    // 2 keys, 7 arguments, `{offset, epoch}`.
    let body = r#"{"fanout":1,"ts":1,"data":{"n":2}}"#;
    let reply = redis
        .cli(&[
            "EVAL",
            layout::PUBLISH_SCRIPT,
            "2",
            &layout::meta_key(channel),
            &history,
            channel,
            body,
            "100",
            "60",
            "unused",
            "0",
            "0",
        ])
        .unwrap();
    assert_eq!(
        reply.lines().collect::<Vec<_>>(),
        ["2", first.epoch.as_str()]
    );
    // The crate without a key of the caller's: a fresh key per call.
    let third = publisher
        .publish(channel, "", &json!({"n": 3}))
        .await
        .unwrap();
    assert_eq!((third.offset, third.duplicate), (3, false));
    assert_eq!(redis.cli(&["XLEN", &history]).unwrap(), "3");

    // Past the window the key is forgotten (the publish goes out again).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let late = publisher
        .publish_with_key(channel, None, &raw(json!({"n": 4})), "key-1")
        .await
        .unwrap();
    assert_eq!((late.offset, late.duplicate), (4, false));
    // The number of keys is bounded: the oldest is forgotten first.
    for k in ["a", "b", "c"] {
        publisher
            .publish_with_key(channel, None, &raw(json!({"n": 5})), k)
            .await
            .unwrap();
    }
    let dedup = layout::dedup_key(channel);
    let fields: Vec<String> = redis
        .cli(&["HKEYS", &dedup])
        .unwrap()
        .lines()
        .filter(|f| f.starts_with("k:"))
        .map(str::to_string)
        .collect();
    assert_eq!(fields.len(), 3, "{fields:?}");
    assert!(!fields.contains(&"k:key-1".to_string()), "{fields:?}");
    let ttl: i64 = redis.cli(&["PTTL", &dedup]).unwrap().parse().unwrap();
    assert!(
        ttl > 0 && ttl <= 1000,
        "the dedup hash expires with the window: {ttl}"
    );

    let mut got = Vec::new();
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok(m) = messages.try_recv() {
        got.push(
            serde_json::from_str::<Value>(&m).unwrap()["data"]["n"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(
        got,
        [1, 2, 3, 4, 5, 5, 5],
        "each publish once, the duplicate not at all"
    );
}

#[tokio::test]
async fn a_resend_after_an_unanswered_attempt_is_not_delivered_twice() {
    let redis = RedisServer::start().unwrap();
    let channel = "user:2";
    let mut messages = raw_subscriber(&redis.url(), channel).await;
    let publisher = Publisher::connect(&redis.url())
        .await
        .unwrap()
        .with_retry(RetryPolicy {
            deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_millis(300),
            ..RetryPolicy::default()
        });
    // Loads the script, so that every attempt below runs it (no NOSCRIPT detour).
    publisher
        .publish(channel, "", &json!({"n": 1}))
        .await
        .unwrap();

    // Redis holds every write for 1.5 s: the first attempt is sent but unanswered within
    // its 300 ms, so it is resent (through a fresh client, Redis being reachable) — and
    // then every attempt runs when the pause ends.
    redis.cli(&["CLIENT", "PAUSE", "1500", "WRITE"]).unwrap();
    let started = Instant::now();
    let ack = publisher
        .publish(channel, "", &json!({"n": 2}))
        .await
        .unwrap();
    eprintln!("acknowledged after {:?}: {ack:?}", started.elapsed());
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert_eq!(ack.offset, 2);

    let mut got = Vec::new();
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(m) = messages.try_recv() {
        got.push(
            serde_json::from_str::<Value>(&m).unwrap()["data"]["n"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(got, [1, 2], "the resent publish went out once");
    assert_eq!(
        redis.cli(&["XLEN", &layout::history_key(channel)]).unwrap(),
        "2"
    );
    assert_eq!(
        redis
            .cli(&["HGET", &layout::meta_key(channel), "offset"])
            .unwrap(),
        "2"
    );
}

/// Runs `fanout-publish` once per message, 100 messages at 20/s, and calls `disrupt` (in
/// a thread) just before message 30. Returns each run's (exit ok, duration).
async fn publish_100_with_the_cli<F>(url: &str, channel: &str, disrupt: F) -> Vec<(bool, Duration)>
where
    F: FnOnce() + Send + 'static,
{
    let mut disrupt = Some(disrupt);
    let mut disruption = None;
    let mut runs = Vec::new();
    let start = tokio::time::Instant::now();
    for n in 1..=100u64 {
        tokio::time::sleep_until(start + Duration::from_millis(50 * (n - 1))).await;
        if n == 30 {
            disruption = Some(std::thread::spawn(disrupt.take().unwrap()));
        }
        let began = Instant::now();
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fanout-publish"))
            .args([
                "--redis-url",
                url,
                channel,
                &json!({ "n": n }).to_string(),
                "--history-size",
                "1000",
                "--json-output",
            ])
            .output()
            .await
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "message {n}: exit {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        runs.push((out.status.success(), began.elapsed()));
    }
    disruption.unwrap().join().unwrap();
    runs
}

fn report(what: &str, runs: &[(bool, Duration)]) {
    let ok = runs.iter().filter(|r| r.0).count();
    let slow: Vec<(usize, u128)> = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.1 > Duration::from_millis(300))
        .map(|(i, r)| (i + 1, r.1.as_millis()))
        .collect();
    eprintln!(
        "{what}: {ok}/{} acknowledged; runs over 300 ms (message, ms): {slow:?}",
        runs.len()
    );
}

async fn start_cluster() -> std::sync::Arc<RedisCluster> {
    std::sync::Arc::new(
        tokio::task::spawn_blocking(|| RedisCluster::start(3, 1))
            .await
            .unwrap()
            .expect("redis cluster"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_publishes_through_a_cluster_failover_exactly_once() {
    let cluster = start_cluster().await;
    let url = cluster.url();
    let node = common::edge(&url, "e1").await;
    let mut client = subscriber(&node, "31").await;
    let channel = "user:31";
    let slot = cluster.keyslot(channel).unwrap();
    let old = cluster.owner_of_slot(slot, cluster.any().port()).unwrap();

    let c = cluster.clone();
    let runs = publish_100_with_the_cli(&url, channel, move || {
        let new = c.failover(old).expect("failover");
        assert_ne!(new, old);
    })
    .await;
    report("failover", &runs);
    assert!(
        runs.iter().all(|r| r.0),
        "every publish acknowledged (exit 0)"
    );

    let got = numbers_until(&mut client, 100, Duration::from_secs(20)).await;
    assert_eq!(got, (1..=100).collect::<Vec<_>>(), "each once, in order");
    let owner = cluster.owner_of_slot(slot, cluster.any().port()).unwrap();
    assert_ne!(owner, old, "the channel's shard failed over");
    let xlen = cluster
        .node(owner)
        .cli(&["XLEN", &layout::history_key(channel)])
        .unwrap();
    assert_eq!(xlen, "100", "one history entry per message");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_go_through_a_slot_migration_exactly_once() {
    let cluster = start_cluster().await;
    let url = cluster.url();
    let node = common::edge(&url, "e1").await;
    // The CLI publishes on one channel, the edge (`/api/publish`, a long-lived client)
    // on another of the same slot, both while that slot migrates to another shard.
    let cli_channel = "user:32";
    let slot = cluster.keyslot(cli_channel).unwrap();
    let api_user = (0..200_000u64)
        .map(|i| format!("m{i}"))
        .find(|u| keyslot(&format!("user:{u}")) == slot)
        .expect("a channel of the same slot");
    let api_channel = format!("user:{api_user}");
    assert_eq!(cluster.keyslot(&api_channel).unwrap(), slot);
    let mut cli_client = subscriber(&node, "32").await;
    let mut api_client = subscriber(&node, &api_user).await;
    let from = cluster.owner_of_slot(slot, cluster.any().port()).unwrap();
    let to = cluster
        .masters()
        .unwrap()
        .into_iter()
        .find(|&p| p != from)
        .unwrap();

    let api = {
        let addr = node.local_addr();
        let channel = api_channel.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for n in 1..=100u64 {
                let body = json!({"channel": channel, "data": {"n": n}}).to_string();
                let began = Instant::now();
                let (status, text) =
                    fanout_testkit::http(addr, "POST", "/api/publish", Some(ADMIN), Some(&body))
                        .await;
                if status != 200 {
                    eprintln!("api message {n}: {status} {text}");
                }
                statuses.push((status == 200, began.elapsed()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            statuses
        })
    };
    let c = cluster.clone();
    let runs = publish_100_with_the_cli(&url, cli_channel, move || {
        c.move_slot_paced(slot, to, Duration::from_millis(1000))
            .expect("slot moved");
    })
    .await;
    let api_runs = api.await.unwrap();
    report("slot migration, CLI", &runs);
    report("slot migration, /api/publish", &api_runs);
    assert_eq!(
        cluster.owner_of_slot(slot, cluster.any().port()).unwrap(),
        to
    );
    assert!(
        runs.iter().all(|r| r.0),
        "every CLI publish acknowledged (exit 0)"
    );
    assert!(
        api_runs.iter().all(|r| r.0),
        "every /api/publish acknowledged (200)"
    );

    let got = numbers_until(&mut cli_client, 100, Duration::from_secs(20)).await;
    assert_eq!(
        got,
        (1..=100).collect::<Vec<_>>(),
        "CLI: each once, in order"
    );
    let got = numbers_until(&mut api_client, 100, Duration::from_secs(20)).await;
    assert_eq!(
        got,
        (1..=100).collect::<Vec<_>>(),
        "API: each once, in order"
    );
    for ch in [cli_channel, api_channel.as_str()] {
        let xlen = cluster
            .node(to)
            .cli(&["XLEN", &layout::history_key(ch)])
            .unwrap();
        assert_eq!(xlen, "100", "{ch}: one history entry per message");
    }
    node.shutdown().await;
}

/// Redis Cluster's key slot (CRC16/XMODEM of the name, or of its `{hash tag}`).
fn keyslot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = match key.find('{') {
        Some(open) => match key[open + 1..].find('}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    let mut crc: u16 = 0;
    for &b in tagged {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[tokio::test]
async fn the_publish_api_takes_an_idempotency_key() {
    let redis = RedisServer::start().unwrap();
    let node = common::edge(&redis.url(), "api").await;
    let addr = node.local_addr();
    let post = |body: Value, header: Option<&'static str>| async move {
        let body = body.to_string();
        let (status, text) = match header {
            None => {
                fanout_testkit::http(addr, "POST", "/api/publish", Some(ADMIN), Some(&body)).await
            }
            Some(key) => {
                // The testkit's helper sends no extra headers: a raw request.
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                let req = format!(
                    "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\nIdempotency-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(req.as_bytes()).await.unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                let status: u16 = out[9..12].parse().unwrap();
                let text = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
                (status, text)
            }
        };
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, v)
    };
    let (s1, a1) = post(
        json!({"channel": "user:9", "data": {"n": 1}, "idempotency_key": "order-1"}),
        None,
    )
    .await;
    let (s2, a2) = post(
        json!({"channel": "user:9", "data": {"n": 1}}),
        Some("order-1"),
    )
    .await;
    assert_eq!((s1, s2), (200, 200), "{a1} {a2}");
    assert_eq!(a1["offset"], 1);
    assert!(a1.get("duplicate").is_none(), "{a1}");
    assert_eq!(
        (&a2["offset"], &a2["epoch"], &a2["duplicate"]),
        (&a1["offset"], &a1["epoch"], &json!(true))
    );
    let (s3, a3) = post(
        json!({"channel": "user:9", "data": {"n": 2}, "idempotency_key": "order-2"}),
        Some("order-1"),
    )
    .await;
    assert_eq!(s3, 400, "header and body differ: {a3}");
    let (s4, a4) = post(
        json!({"channel": "user:9", "data": {"n": 2}, "idempotency_key": "has space"}),
        None,
    )
    .await;
    assert_eq!(s4, 400, "{a4}");
    let (s5, a5) = post(json!({"channel": "user:9", "data": {"n": 2}}), None).await;
    assert_eq!((s5, &a5["offset"]), (200, &json!(2)));
    assert_eq!(
        redis
            .cli(&["XLEN", &layout::history_key("user:9")])
            .unwrap(),
        "2"
    );
    node.shutdown().await;
}
