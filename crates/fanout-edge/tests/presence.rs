//! Presence and join/leave: `presence` frames and `/api/presence` list every client
//! subscribed to a channel on any node; `join_leave` namespaces announce arrivals and
//! departures; a killed node's clients drop out within the presence TTL.

mod common;

use common::*;
use fanout_testkit::RedisServer;
use serde_json::{json, Value};

const CFG: &str = "[namespaces.chat]\njoin_leave = true\n[namespaces.room]\nhistory_size = 10\n";

async fn api_presence(addr: std::net::SocketAddr, query: &str) -> (u16, Value) {
    let (status, body) = fanout_testkit::http(
        addr,
        "GET",
        &format!("/api/presence{query}"),
        Some(ADMIN),
        None,
    )
    .await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The next frame of type `ty`, skipping presence notices.
async fn next_of(c: &mut fanout_testkit::WsClient, ty: &str) -> Value {
    loop {
        let f = c.recv().await;
        if f["type"] == ty {
            return f;
        }
        assert!(
            f["type"] == "join" || f["type"] == "leave",
            "expected {ty}, got {f}"
        );
    }
}

fn users(clients: &Value) -> Vec<String> {
    let mut u: Vec<String> = clients
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["user"].as_str().unwrap().to_string())
        .collect();
    u.sort();
    u
}

#[tokio::test]
async fn presence_and_join_leave_on_one_node() {
    let cfg = config_file(CFG);
    for backend in Backend::all() {
        let name = backend.name();
        let node = start_configured(&backend, &cfg).await;
        let mut a = connect(&node, &token("1", &["chat:*", "room:*"])).await;
        let mut b = connect(&node, &token("2", &["chat:*"])).await;
        assert_eq!(
            a.subscribe(1, "chat:x").await["type"],
            "subscribed",
            "{name}"
        );
        assert_eq!(
            b.subscribe(1, "chat:x").await["type"],
            "subscribed",
            "{name}"
        );

        // a hears b arrive (its own join came first).
        let join = loop {
            let j = a.recv_type("join").await;
            if j["info"]["user"] == "2" {
                break j;
            }
        };
        assert_eq!(join["channel"], "chat:x", "{name}: {join}");
        assert_eq!(join["info"]["node"], node.settings().node_id.as_str());
        assert!(join["info"]["client"].is_string(), "{join}");

        // Both are present, by frame and by the API.
        a.send(json!({"type":"presence","id":7,"channel":"chat:x"}))
            .await;
        let p = a.recv_type("presence").await;
        assert_eq!(p["id"], 7);
        assert_eq!(users(&p["clients"]), ["1", "2"], "{name}: {p}");
        let (status, body) = api_presence(node.local_addr(), "?channel=chat%3Ax").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(users(&body["clients"]), ["1", "2"], "{name}: {body}");

        // b leaves: a hears it, and presence shrinks.
        b.send(json!({"type":"unsubscribe","id":2,"channel":"chat:x"}))
            .await;
        assert_eq!(next_of(&mut b, "unsubscribed").await["reason"], "client");
        let leave = a.recv_type("leave").await;
        assert_eq!(leave["info"]["user"], "2", "{name}: {leave}");
        let (_, body) = api_presence(node.local_addr(), "?channel=chat:x").await;
        assert_eq!(users(&body["clients"]), ["1"], "{name}: {body}");

        // A disconnect is a leave too.
        assert_eq!(b.subscribe(3, "chat:x").await["type"], "subscribed");
        let _ = a.recv_type("join").await;
        drop(b);
        assert_eq!(a.recv_type("leave").await["info"]["user"], "2", "{name}");

        // Refusals, each with its code.
        a.send(json!({"type":"presence","id":8,"channel":"room:1"}))
            .await;
        let e = next_of(&mut a, "error").await;
        assert_eq!(e["code"], "bad_request", "{e}");
        assert!(
            e["message"].as_str().unwrap().contains("not enabled"),
            "{e}"
        );
        let mut c = connect(&node, &token("3", &[])).await;
        c.send(json!({"type":"presence","id":9,"channel":"chat:x"}))
            .await;
        assert_eq!(c.recv_type("error").await["code"], "forbidden", "{name}");
        c.send(json!({"type":"presence","id":10,"channel":"bad channel"}))
            .await;
        assert_eq!(c.recv_type("error").await["code"], "bad_request");
        let (status, body) = api_presence(node.local_addr(), "").await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("bad_request")),
            "{body}"
        );
        let (status, _) = api_presence(node.local_addr(), "?channel=room:1").await;
        assert_eq!(status, 400);
        let (status, _) = fanout_testkit::http(
            node.local_addr(),
            "GET",
            "/api/presence?channel=chat:x",
            None,
            None,
        )
        .await;
        assert_eq!(status, 401, "admin token required");

        // Quick subscribe/unsubscribe cycles leave nothing behind (writes stay in order).
        let mut d = connect(&node, &token("4", &["chat:*"])).await;
        for i in 0..20u64 {
            d.send(json!({"type":"subscribe","id":i * 2,"channel":"chat:x"}))
                .await;
            d.send(json!({"type":"unsubscribe","id":i * 2 + 1,"channel":"chat:x"}))
                .await;
        }
        // Presence is written asynchronously (in order): it settles on user 1 alone
        // once the 40 writes are through.
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
        eventually("presence settles after quick cycles", || async {
            let (_, body) = api_presence(node.local_addr(), "?channel=chat:x").await;
            users(&body["clients"]) == ["1"]
        })
        .await;
        for _ in 0..10 {
            let (_, body) = api_presence(node.local_addr(), "?channel=chat:x").await;
            assert_eq!(users(&body["clients"]), ["1"], "{name}: stays settled");
        }

        // Shutting down writes the closed connections' leaves before letting Redis go.
        node.shutdown().await;
        if let Backend::Redis(redis) = &backend {
            assert_eq!(
                redis.cli(&["HLEN", "fanout:{chat:x}:presence"]).unwrap(),
                "0"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_nodes_and_drops_a_killed_node() {
    let redis = RedisServer::start().unwrap();
    let cfg = config_file(CFG);
    let a = start(
        Some(&redis.url()),
        &[
            "--node-id",
            "a",
            "--config",
            cfg.to_str().unwrap(),
            "--presence-ttl-secs",
            "3",
        ],
    )
    .await;
    let (mut b, b_addr) = spawn_edge(
        &redis.url(),
        "b",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--presence-ttl-secs",
            "3",
        ],
    )
    .await;
    let mut on_a = connect(&a, &token("1", &["chat:*"])).await;
    assert_eq!(on_a.subscribe(1, "chat:y").await["type"], "subscribed");
    let mut on_b = fanout_testkit::WsClient::connect(&format!(
        "ws://{b_addr}/ws?token={}",
        token("2", &["chat:*"])
    ))
    .await
    .unwrap();
    on_b.recv_type("connected").await;
    assert_eq!(on_b.subscribe(1, "chat:y").await["type"], "subscribed");

    // The join from node b reaches the client on node a.
    let join = loop {
        let j = on_a.recv_type("join").await;
        if j["info"]["user"] == "2" {
            break j;
        }
    };
    assert_eq!(join["info"]["node"], "b", "{join}");
    let (_, body) = api_presence(a.local_addr(), "?channel=chat:y").await;
    assert_eq!(users(&body["clients"]), ["1", "2"], "{body}");
    let mut nodes: Vec<&str> = body["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["node"].as_str().unwrap())
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["a", "b"]);

    // Still there after a few refresh periods (refreshed, not expired) …
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let (_, body) = api_presence(a.local_addr(), "?channel=chat:y").await;
    assert_eq!(users(&body["clients"]), ["1", "2"], "refreshed: {body}");

    // … and node b dies without a word: its client leaves presence within the TTL.
    b.kill().await.unwrap();
    let killed = std::time::Instant::now();
    eventually("the dead node's client gone from presence", || async {
        let (_, body) = api_presence(a.local_addr(), "?channel=chat:y").await;
        users(&body["clients"]) == ["1"]
    })
    .await;
    assert!(killed.elapsed() < std::time::Duration::from_secs(5));
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Refresh at scale. These drive a node's presence directly (`Presence::join`, as a
// subscribe does) so that thousands of entries need no thousands of sockets, and read
// Redis with redis-cli (its own connection, untouched by the node's).

/// The info JSON a subscribe records.
fn info(client: &str) -> String {
    json!({"client": client, "user": "u", "node": "n"}).to_string()
}

/// The stored expiry (ms) of every entry of `channel`'s presence hash.
fn expiries(redis: &RedisServer, channel: &str) -> Vec<u64> {
    let out = redis
        .cli(&["HVALS", &format!("fanout:{{{channel}}}:presence")])
        .unwrap();
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.split_once('|')
                .and_then(|(until, _)| until.parse().ok())
                .unwrap_or_else(|| panic!("bad presence value {l:?}"))
        })
        .collect()
}

/// `calls` of `command` in `INFO commandstats` (0 when never called).
fn calls(redis: &RedisServer, command: &str) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]).unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Waits up to `secs` until `check` holds.
async fn within<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {secs} s: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Joins `per_channel` clients to each of `channels` (no join/leave notices) and waits
/// until the node has written them all.
async fn populate(
    node: &fanout_edge::Node,
    redis: &RedisServer,
    channels: &[String],
    per_channel: usize,
) {
    let presence = node.presence();
    for (c, channel) in channels.iter().enumerate() {
        let channel: std::sync::Arc<str> = channel.as_str().into();
        for i in 0..per_channel {
            let client = format!("c{c}-{i}");
            presence.join(channel.clone(), &client, info(&client), false);
        }
    }
    // A refresh may write entries before the node's queue of joins gets to them: what
    // shows that the queue is through is a last leave (the only HDEL) done after them.
    let hdel = calls(redis, "hdel");
    let marker: std::sync::Arc<str> = "chat:marker".into();
    presence.join(marker.clone(), "marker", info("marker"), false);
    presence.leave(&marker, "marker");
    within(60, "every join written", || async {
        calls(redis, "hdel") > hdel
    })
    .await;
    for c in channels {
        let key = format!("fanout:{{{c}}}:presence");
        assert_eq!(redis.cli(&["HLEN", &key]).unwrap(), per_channel.to_string());
    }
}

/// One refresh sweep over 5,000 entries in 10 channels: every entry's expiry moves on,
/// in one script call per channel — not one HSET + one PEXPIRE round trip per entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_sweep_is_one_round_trip_per_channel() {
    let redis = RedisServer::start().unwrap();
    // TTL 6 s: a sweep every 2 s.
    let node = start(Some(&redis.url()), &["--presence-ttl-secs", "6"]).await;
    let channels: Vec<String> = (0..10).map(|c| format!("chat:big{c}")).collect();
    populate(&node, &redis, &channels, 500).await;

    // A key given a longer expiry (another node's entries may need it) keeps it.
    redis
        .cli(&["PEXPIRE", "fanout:{chat:big0}:presence", "600000"])
        .unwrap();
    redis.cli(&["CONFIG", "RESETSTAT"]).unwrap();
    let counted = std::time::Instant::now();
    let t0 = fanout_protocol::now_ms();
    // Every entry rewritten after t0, i.e. expiring at least a TTL after it.
    within(15, "every entry refreshed", || async {
        channels
            .iter()
            .all(|c| expiries(&redis, c).iter().all(|&u| u >= t0 + 6000))
    })
    .await;
    let sweeps = counted.elapsed().as_secs() / 2 + 2;
    let scripts = calls(&redis, "evalsha") + calls(&redis, "eval");
    let pexpire = calls(&redis, "pexpire");
    assert!(
        scripts >= 10 && scripts <= 10 * sweeps,
        "one script call per channel and sweep ({sweeps} sweeps at most): {scripts} calls"
    );
    assert!(
        pexpire <= scripts,
        "the key's expiry is set inside the script, not per entry: {pexpire} PEXPIREs, {scripts} script calls"
    );
    // Each key expires after its entries (2 TTLs from the refresh).
    for c in &channels {
        let pttl: i64 = redis
            .cli(&["PTTL", &format!("fanout:{{{c}}}:presence")])
            .unwrap()
            .parse()
            .unwrap();
        assert!(pttl > 6000, "{c}: key PTTL {pttl} ms");
        if c == "chat:big0" {
            assert!(pttl > 500_000, "{c}: key expiry shortened to {pttl} ms");
        }
    }
    node.shutdown().await;
}

/// A channel whose refresh fails (a key of the wrong type where its presence hash
/// should be) is counted and skipped: every other channel is still refreshed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_channel_does_not_stop_the_sweep() {
    let redis = RedisServer::start().unwrap();
    let node = start(Some(&redis.url()), &["--presence-ttl-secs", "3"]).await;
    let channels: Vec<String> = (0..10).map(|c| format!("chat:s{c}")).collect();
    populate(&node, &redis, &channels, 20).await;

    let bad = "fanout:{chat:s3}:presence";
    redis.cli(&["DEL", bad]).unwrap();
    redis.cli(&["SET", bad, "not a hash"]).unwrap();
    let t0 = fanout_protocol::now_ms();
    within(8, "every other channel refreshed", || async {
        channels
            .iter()
            .filter(|c| *c != "chat:s3")
            .all(|c| expiries(&redis, c).iter().all(|&u| u >= t0 + 3000))
    })
    .await;
    assert_eq!(redis.cli(&["GET", bad]).unwrap(), "not a hash");
    assert!(
        metric(&node, "fanout_presence_refresh_errors_total").await >= 1.0,
        "the failed channel is counted"
    );
    node.shutdown().await;
}

/// Joins go out while a refresh sweep over 20,000 entries runs: each is in Redis
/// promptly, not after the sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_do_not_wait_behind_a_sweep() {
    let redis = RedisServer::start().unwrap();
    let node = start(Some(&redis.url()), &["--presence-ttl-secs", "3"]).await;
    let channels: Vec<String> = (0..4).map(|c| format!("chat:load{c}")).collect();
    populate(&node, &redis, &channels, 5000).await;

    // For three refresh periods, a join every 100 ms: how long until Redis has it.
    let presence = node.presence();
    let probe: std::sync::Arc<str> = "chat:probe".into();
    let key = "fanout:{chat:probe}:presence";
    let mut slowest = std::time::Duration::ZERO;
    for i in 0..30 {
        let client = format!("p{i}");
        let joined = std::time::Instant::now();
        presence.join(probe.clone(), &client, info(&client), false);
        while redis.cli(&["HEXISTS", key, &client]).unwrap() != "1" {
            assert!(
                joined.elapsed() < std::time::Duration::from_secs(10),
                "join {i} never written"
            );
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        slowest = slowest.max(joined.elapsed());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        slowest < std::time::Duration::from_millis(500),
        "a join waited {slowest:?} to be written"
    );
    node.shutdown().await;
}

/// Pruning racing a refresh: a reader saw two entries expired, and one of them was
/// refreshed before the prune. The prune re-checks each stored expiry as it deletes:
/// the refreshed entry stays, the expired one goes.
#[tokio::test]
async fn prune_keeps_an_entry_refreshed_since_it_was_read() {
    let ttl = std::time::Duration::from_secs(30);
    for backend in Backend::all() {
        let name = backend.name();
        let node = start(backend.url().as_deref(), &[]).await;
        let broker = node.broker();
        let channel = "chat:race";
        // Two entries that expired (a dead node's, say).
        match &backend {
            Backend::Redis(redis) => {
                let key = "fanout:{chat:race}:presence";
                let (gone, stale) = (
                    format!("1|{}", info("gone")),
                    format!("1|{}", info("stale")),
                );
                redis
                    .cli(&["HSET", key, "gone", &gone, "stale", &stale])
                    .unwrap();
            }
            Backend::Memory => {
                for client in ["gone", "stale"] {
                    broker
                        .presence_set(channel, client, &info(client), std::time::Duration::ZERO)
                        .await
                        .unwrap();
                }
            }
        }
        // The reader's view, taken now: both expired …
        let seen_expired = vec!["gone".to_string(), "stale".to_string()];
        // … then `stale` is refreshed (its node is alive after all) …
        broker
            .presence_set(channel, "stale", &info("stale"), ttl)
            .await
            .unwrap();
        // … and the prune acts on the stale view.
        let pruned = broker.presence_prune(channel, &seen_expired).await.unwrap();
        assert_eq!(pruned, 1, "{name}: only the expired entry is deleted");
        let present: Vec<Value> = broker
            .presence(channel)
            .await
            .unwrap()
            .iter()
            .map(|i| serde_json::from_str(i).unwrap())
            .collect();
        assert_eq!(present.len(), 1, "{name}: {present:?}");
        assert_eq!(present[0]["client"], "stale", "{name}");
        if let Backend::Redis(redis) = &backend {
            let key = "fanout:{chat:race}:presence";
            assert_eq!(redis.cli(&["HEXISTS", key, "stale"]).unwrap(), "1");
            assert_eq!(redis.cli(&["HEXISTS", key, "gone"]).unwrap(), "0");
            // A read prunes what expired, and only that.
            let old = format!("1|{}", info("dead"));
            redis.cli(&["HSET", key, "dead", &old]).unwrap();
            assert_eq!(broker.presence(channel).await.unwrap().len(), 1, "{name}");
            assert_eq!(redis.cli(&["HEXISTS", key, "dead"]).unwrap(), "0");
            assert_eq!(redis.cli(&["HEXISTS", key, "stale"]).unwrap(), "1");
        }
        node.shutdown().await;
    }
}

/// In Redis Cluster each channel's refresh (and prune) is one script call in the
/// channel's own slot: entries of channels on every shard are written, refreshed and
/// pruned, and keep their key's expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_and_prune_in_redis_cluster() {
    let cluster = tokio::task::spawn_blocking(|| fanout_testkit::RedisCluster::start(3, 0))
        .await
        .unwrap()
        .expect("redis cluster");
    let node = start(Some(&cluster.url()), &["--presence-ttl-secs", "3"]).await;
    let presence = node.presence();
    let masters = cluster.masters().unwrap();
    // 12 channels, with each channel's primary.
    let channels: Vec<(String, u16)> = (0..12)
        .map(|i| {
            let channel = format!("chat:k{i}");
            let slot = cluster.keyslot(&channel).unwrap();
            (channel, cluster.owner_of_slot(slot, masters[0]).unwrap())
        })
        .collect();
    let mut shards: Vec<u16> = channels.iter().map(|(_, p)| *p).collect();
    shards.sort();
    shards.dedup();
    assert_eq!(shards.len(), 3, "channels on every shard: {channels:?}");
    for (channel, _) in &channels {
        let channel: std::sync::Arc<str> = channel.as_str().into();
        for i in 0..50 {
            let client = format!("{channel}-{i}");
            presence.join(channel.clone(), &client, info(&client), false);
        }
    }
    // Every entry written, then every one refreshed after `t0`.
    let expiries = |channel: &str, port: u16| -> Vec<u64> {
        let key = format!("fanout:{{{channel}}}:presence");
        let values = cluster.node(port).cli(&["HVALS", &key]).unwrap();
        values
            .lines()
            .filter_map(|l| l.split_once('|')?.0.parse().ok())
            .collect()
    };
    within(15, "every entry written", || async {
        channels
            .iter()
            .all(|(c, port)| expiries(c, *port).len() == 50)
    })
    .await;
    let t0 = fanout_protocol::now_ms();
    within(15, "every entry refreshed", || async {
        channels
            .iter()
            .all(|(c, port)| expiries(c, *port).iter().all(|&u| u >= t0 + 3000))
    })
    .await;
    for (channel, port) in &channels {
        let key = format!("fanout:{{{channel}}}:presence");
        let pttl: i64 = cluster
            .node(*port)
            .cli(&["PTTL", &key])
            .unwrap()
            .parse()
            .unwrap();
        assert!(pttl > 3000, "{channel}: key PTTL {pttl} ms");
        assert_eq!(presence.list(channel).await.unwrap().len(), 50, "{channel}");
    }
    // A read prunes an expired entry in the channel's slot, and only that.
    let (channel, port) = &channels[0];
    let key = format!("fanout:{{{channel}}}:presence");
    let dead = format!("1|{}", info("dead"));
    cluster
        .node(*port)
        .cli(&["HSET", &key, "dead", &dead])
        .unwrap();
    assert_eq!(presence.list(channel).await.unwrap().len(), 50);
    assert_eq!(cluster.node(*port).cli(&["HLEN", &key]).unwrap(), "50");
    node.shutdown().await;
}
