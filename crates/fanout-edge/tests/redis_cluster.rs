//! A real 3-primary Redis Cluster (with a replica per shard) behind three edges:
//! sharded pub/sub delivers channels of every shard to clients on every edge, a
//! coordinated failover of one shard and a slot move mid-stream lose nothing that was
//! acknowledged, and the control channel (admin disconnect) reaches every edge.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fanout_publisher::{HistoryPolicy, Publisher};
use fanout_testkit::RedisCluster;
use serde_json::{json, Value};

/// One channel per shard: `room:<i>` names whose slots are served by each primary.
fn channel_per_shard(cluster: &RedisCluster) -> Vec<(String, u16)> {
    let masters = cluster.masters().unwrap();
    let mut picked: BTreeMap<u16, String> = BTreeMap::new();
    for i in 0..1000 {
        let channel = format!("room:{i}");
        let slot = cluster.keyslot(&channel).unwrap();
        let owner = cluster.owner_of_slot(slot, masters[0]).unwrap();
        picked.entry(owner).or_insert(channel);
        if picked.len() == masters.len() {
            break;
        }
    }
    assert_eq!(picked.len(), 3, "a channel on every shard");
    picked.into_iter().map(|(port, ch)| (ch, port)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_pubsub_survives_failover_and_slot_moves_without_loss() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| RedisCluster::start(3, 1))
            .await
            .unwrap()
            .expect("redis cluster"),
    );
    let url = cluster.url();
    let cfg = config_file("[namespaces.room]\nhistory_size = 10000\nhistory_ttl_secs = 600\n");
    let mut edges = Vec::new();
    for id in ["c1", "c2", "c3"] {
        edges.push(
            start(
                Some(&url),
                &["--node-id", id, "--config", cfg.to_str().unwrap()],
            )
            .await,
        );
    }
    let channels = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || channel_per_shard(&cluster))
            .await
            .unwrap()
    };

    eprintln!("channels (name, primary): {channels:?}");
    // A client on every edge, subscribed to a channel on every shard.
    let t = token("5", &["room:*"]);
    let mut clients = Vec::new();
    for edge in &edges {
        let mut c = connect(edge, &t).await;
        for (i, (channel, _)) in channels.iter().enumerate() {
            let s = c.subscribe(i as u64 + 1, channel).await;
            assert_eq!(s["type"], "subscribed", "{s}");
        }
        clients.push(c);
    }
    // Connecting to three primaries is not a reconnect.
    for edge in &edges {
        assert_eq!(metric(edge, "fanout_broker_reconnects_total").await, 0.0);
    }
    // Each channel's subscription lives on its own shard.
    for (channel, port) in &channels {
        let out = cluster
            .node(*port)
            .cli(&["PUBSUB", "SHARDNUMSUB", channel])
            .unwrap();
        assert!(out.ends_with('3'), "3 edges SSUBSCRIBEd {channel}: {out}");
    }

    // A publisher numbers messages per channel at ~600/s in all.
    let publisher = Publisher::connect(&url).await.unwrap().with_history(
        "room",
        HistoryPolicy {
            size: 10_000,
            ttl: Duration::from_secs(600),
            finished_ttl: None,
        },
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Publishing goes on while a slot migrates: a publish that meets ASK or TRYAGAIN
    // is resent with its idempotency key (and a wedged client rebuilt), see
    // docs/operations.md.
    let names: Vec<String> = channels.iter().map(|(c, _)| c.clone()).collect();
    let pub_task = {
        let stop = stop.clone();
        let names = names.clone();
        tokio::spawn(async move {
            let mut acked: HashMap<String, Vec<u64>> = HashMap::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 20_000 {
                n += 1;
                for ch in &names {
                    // Resent through the failover and the migration: every publish is
                    // acknowledged.
                    match publisher.publish(ch, "", &json!({ "n": n })).await {
                        Ok(_) => acked.entry(ch.clone()).or_default().push(n),
                        Err(e) => panic!("publish {ch} #{n} not acknowledged: {e}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // A last, acknowledged message per channel marks the end.
            n += 1;
            for ch in &names {
                for attempt in 0.. {
                    match publisher.publish(ch, "", &json!({ "n": n })).await {
                        Ok(_) => {
                            acked.entry(ch.clone()).or_default().push(n);
                            break;
                        }
                        Err(e) if attempt < 20 => {
                            eprintln!("last publish {ch} not acknowledged: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("{ch}: no publish for 5 s: {e}"),
                    }
                }
            }
            (acked, n)
        })
    };

    tokio::time::sleep(Duration::from_millis(800)).await;
    // Fail over the shard of the first channel while messages flow.
    let old = channels[0].1;
    let new = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.failover(old))
            .await
            .unwrap()
            .expect("failover")
    };
    assert_ne!(old, new);
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Then move the slot of the second channel (and its history) to the third shard,
    // as resharding does: its owner changes without any new connection.
    let (moved, target) = (channels[1].0.clone(), channels[2].1);
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || {
            let slot = cluster.keyslot(&moved)?;
            cluster.move_slot(slot, target)
        })
        .await
        .unwrap()
        .expect("slot moved");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, last) = pub_task.await.unwrap();

    for (i, c) in clients.iter_mut().enumerate() {
        let mut got: HashMap<String, Vec<u64>> = HashMap::new();
        let mut done = 0;
        while done < names.len() {
            let f = c.recv().await;
            if f["type"] != "message" {
                continue;
            }
            let n = f["data"]["n"].as_u64().unwrap();
            got.entry(f["channel"].as_str().unwrap().to_string())
                .or_default()
                .push(n);
            if n == last {
                done += 1;
            }
        }
        for ch in &names {
            let got = &got[ch];
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "client {i} {ch}: in order, no duplicates"
            );
            let missing: Vec<u64> = acked[ch]
                .iter()
                .filter(|n| got.binary_search(n).is_err())
                .copied()
                .collect();
            assert!(
                missing.is_empty(),
                "client {i} {ch}: acknowledged messages lost: {missing:?}"
            );
            assert!(acked[ch].len() > 100, "{ch}: the stream ran");
        }
    }
    // Every edge saw the slot map change and resubscribed at the new primary.
    for edge in &edges {
        assert!(metric(edge, "fanout_broker_topology_changes_total").await >= 1.0);
    }
    let out = cluster
        .node(new)
        .cli(&["PUBSUB", "SHARDNUMSUB", &channels[0].0])
        .unwrap();
    assert!(out.ends_with('3'), "resubscribed at the new primary: {out}");
    let out = cluster
        .node(channels[2].1)
        .cli(&["PUBSUB", "SHARDNUMSUB", &channels[1].0])
        .unwrap();
    assert!(
        out.ends_with('3'),
        "resubscribed where the slot moved: {out}"
    );

    // The control channel is sharded too: an admin disconnect reaches all three edges.
    let (status, body) = fanout_testkit::http(
        edges[1].local_addr(),
        "POST",
        "/api/disconnect",
        Some(ADMIN),
        Some(r#"{"user":"5"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["nodes_notified"], 3, "{body}");
    for c in clients.iter_mut() {
        loop {
            match c.next().await {
                fanout_testkit::Incoming::Closed { code, .. } => {
                    assert_eq!(code, Some(4010));
                    break;
                }
                fanout_testkit::Incoming::Frame(_) => continue,
                other => panic!("expected 4010, got {other:?}"),
            }
        }
    }
    for edge in edges {
        edge.shutdown().await;
    }
}

/// One shard that stops answering delays only its own channels: a subscribe to a
/// channel of another shard is served at once, not queued behind the stuck one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_shard_delays_only_its_own_subscribes() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| RedisCluster::start(3, 0))
            .await
            .unwrap()
            .expect("redis cluster"),
    );
    let cfg = config_file(
        "[limits]\nsubscribe_timeout_secs = 3\n[namespaces.room]\nsubscribe = \"authenticated\"\n",
    );
    let node = start(Some(&cluster.url()), &["--config", cfg.to_str().unwrap()]).await;
    let channels = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || channel_per_shard(&cluster))
            .await
            .unwrap()
    };
    let (stuck, stuck_port) = channels[0].clone();
    let (free, _) = channels[1].clone();
    // The stuck shard's primary stops answering for 4 s.
    cluster
        .node(stuck_port)
        .cli(&["CLIENT", "PAUSE", "4000", "ALL"])
        .unwrap();
    let mut a = connect(&node, &token("1", &[])).await;
    let mut b = connect(&node, &token("2", &[])).await;
    a.send(json!({"type":"subscribe","id":1,"channel":stuck}))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let r = b.subscribe(1, &free).await;
    let took = started.elapsed();
    assert_eq!(r["type"], "subscribed", "{r}");
    assert!(
        took < Duration::from_millis(1500),
        "the free shard's subscribe waited {took:?}"
    );
    // The stuck one ends at its deadline, and works once the shard answers again.
    let e = a.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{e}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut ok = false;
    for id in 2..10 {
        let r = a.subscribe(id, &stuck).await;
        if r["type"] == "subscribed" {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(ok, "the stuck shard's channel never subscribed");
    node.shutdown().await;
}
