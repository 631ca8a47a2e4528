//! Three edge processes behind a real HAProxy running `deploy/haproxy/haproxy.cfg`
//! (cookie affinity, `/readyz` health checks): a client that brings its cookie back
//! lands on the same node, one without it lands anywhere and still recovers, and a
//! SIGTERM to one edge under load moves its clients to the others with nothing lost,
//! counted by sequence numbers.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use fanout_publisher::{HistoryPolicy, Publisher};
use fanout_testkit::{Haproxy, Incoming, RedisServer, WsClient};
use serde_json::{json, Value};
use tokio::process::Child;

const NAMESPACES: &str = "[namespaces.room]\nhistory_size = 10000\nhistory_ttl_secs = 600\n";

fn haproxy_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/haproxy/haproxy.cfg")
}

/// Redis, three edge processes (`edge1..3`, drain window 2 s) and HAProxy in front.
async fn lb_cluster() -> (RedisServer, Vec<(Child, SocketAddr)>, Haproxy) {
    let redis = RedisServer::start().unwrap();
    let cfg = config_file(NAMESPACES);
    let extra = ["--config", cfg.to_str().unwrap(), "--drain-secs", "2"];
    let mut edges = Vec::new();
    for id in ["edge1", "edge2", "edge3"] {
        edges.push(spawn_edge(&redis.url(), id, &extra).await);
    }
    // The config file is read at start; the edges no longer need it.
    drop(cfg);
    let addrs: Vec<SocketAddr> = edges.iter().map(|e| e.1).collect();
    let lb = Haproxy::start(&haproxy_config(), &addrs).unwrap();
    (redis, edges, lb)
}

/// Connects through the balancer, optionally with a cookie; returns the client, the node
/// it landed on and the affinity cookie it was given (if any).
async fn via_lb(
    lb: &Haproxy,
    token: &str,
    cookie: Option<&str>,
) -> (WsClient, String, Vec<String>) {
    let url = format!("{}?token={token}", lb.ws_url());
    let headers: Vec<(&str, &str)> = cookie.map(|c| ("Cookie", c)).into_iter().collect();
    let mut c = WsClient::connect_with(&url, &headers).await.unwrap();
    let hello = c.recv_type("connected").await;
    let node = hello["node"].as_str().unwrap().to_string();
    let cookies = c.cookies();
    (c, node, cookies)
}

async fn publisher(redis: &RedisServer) -> Publisher {
    Publisher::connect(&redis.url())
        .await
        .unwrap()
        .with_history(
            "room",
            HistoryPolicy {
                size: 10_000,
                ttl: Duration::from_secs(600),
                finished_ttl: None,
            },
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_affinity_and_recovery_on_another_node() {
    // The edges live as long as this binding.
    let (redis, _edges, lb) = lb_cluster().await;
    let t = token("9", &["room:*"]);

    // The first connection gets a cookie naming its node; bringing it back lands there.
    let (first, node, cookies) = via_lb(&lb, &t, None).await;
    let cookie = cookies
        .iter()
        .find(|c| c.starts_with("FANOUTNODE="))
        .unwrap_or_else(|| panic!("an affinity cookie: {cookies:?}"))
        .clone();
    drop(first);
    let mut held = Vec::new();
    for _ in 0..6 {
        let (c, again, _) = via_lb(&lb, &t, Some(&cookie)).await;
        assert_eq!(again, node, "with {cookie}");
        held.push(c);
    }
    // Without it, connections spread (least connections) over every node.
    let mut seen = HashSet::new();
    let mut others = Vec::new();
    for _ in 0..6 {
        let (c, n, _) = via_lb(&lb, &t, None).await;
        seen.insert(n);
        others.push(c);
    }
    assert!(seen.len() >= 2, "spread over nodes: {seen:?}");
    drop(others);
    drop(held);

    // A subscriber on the cookie's node goes away, 20 messages are published, and it
    // comes back without the cookie on another node: `since` recovers exactly those.
    let publisher = publisher(&redis).await;
    let (mut c, _, _) = via_lb(&lb, &t, Some(&cookie)).await;
    let s = c.subscribe(1, "room:lobby").await;
    assert_eq!(s["type"], "subscribed", "{s}");
    let ack = publisher
        .publish("room:lobby", "", &json!({"n": 0}))
        .await
        .unwrap();
    let m = c.recv_type("message").await;
    assert_eq!(m["offset"], ack.offset);
    drop(c);
    for n in 1..=20u64 {
        publisher
            .publish("room:lobby", "", &json!({"n": n}))
            .await
            .unwrap();
    }
    let mut elsewhere = None;
    let mut held = Vec::new();
    for _ in 0..12 {
        let (c, n, _) = via_lb(&lb, &t, None).await;
        if n != node {
            elsewhere = Some((c, n));
            break;
        }
        held.push(c);
    }
    let (mut c, other) = elsewhere.expect("a connection on another node");
    assert_ne!(other, node);
    c.send(json!({"type":"subscribe","id":2,"channel":"room:lobby",
        "since":{"offset": ack.offset, "epoch": ack.epoch}}))
        .await;
    let s = c.recv_type("subscribed").await;
    assert_eq!(s["recovered"], true, "{s}");
    let frames = read_until_n(&mut c, 20).await;
    assert_eq!(numbers(&frames), (1..=20).collect::<Vec<_>>());
    drop(lb);
}

/// A client that follows a channel through closes: on 1001 it reconnects through the
/// balancer and resumes with `since`; returns every number it got, in order.
async fn follower(lb_url: String, t: String, last: u64) -> (Vec<u64>, Vec<String>) {
    let mut got = Vec::new();
    let mut nodes = Vec::new();
    let mut position: Option<(u64, String)> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    'connect: loop {
        assert!(tokio::time::Instant::now() < deadline, "follower timed out");
        let Ok(mut c) = WsClient::connect(&format!("{lb_url}?token={t}")).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let hello = match c.next().await {
            Incoming::Frame(f) if f["type"] == "connected" => f,
            // Refused by a draining node that HAProxy has not marked down yet.
            _ => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        nodes.push(hello["node"].as_str().unwrap().to_string());
        let mut sub = json!({"type":"subscribe","id":1,"channel":"room:load"});
        if let Some((offset, epoch)) = &position {
            sub["since"] = json!({"offset": offset, "epoch": epoch});
        }
        c.send(sub).await;
        loop {
            match c.next().await {
                Incoming::Frame(f) if f["type"] == "subscribed" => {
                    if position.is_some() {
                        assert_eq!(f["recovered"], true, "resumed without loss: {f}");
                    }
                }
                Incoming::Frame(f) if f["type"] == "message" => {
                    let n = f["data"]["n"].as_u64().unwrap();
                    got.push(n);
                    position = Some((
                        f["offset"].as_u64().unwrap(),
                        f["epoch"].as_str().unwrap().to_string(),
                    ));
                    if n == last {
                        return (got, nodes);
                    }
                }
                Incoming::Frame(f) => panic!("unexpected frame {f}"),
                Incoming::Closed { code, .. } => {
                    assert_eq!(code, Some(1001), "only a drain closes");
                    continue 'connect;
                }
                Incoming::Raw(r) => panic!("unexpected {r}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_moves_clients_without_loss() {
    let (redis, mut edges, lb) = lb_cluster().await;
    let addrs: Vec<SocketAddr> = edges.iter().map(|e| e.1).collect();
    let t = token("11", &["room:*"]);
    let publisher = publisher(&redis).await;
    // Give the channel a position before anyone subscribes.
    publisher
        .publish("room:load", "", &json!({"n": 0}))
        .await
        .unwrap();

    const CLIENTS: usize = 30;
    const LAST: u64 = 800;
    let mut followers = Vec::new();
    for _ in 0..CLIENTS {
        followers.push(tokio::spawn(follower(lb.ws_url(), t.clone(), LAST)));
    }
    // Everyone subscribed (each edge reports its subscriptions).
    eventually("every follower subscribed", || async {
        let mut total = 0;
        for a in &addrs {
            let (_, body) = fanout_testkit::http(*a, "GET", "/api/stats", Some(ADMIN), None).await;
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            total += v["node"]["subscriptions"].as_u64().unwrap_or(0);
        }
        total == CLIENTS as u64
    })
    .await;

    // ~200 messages/s for 4 s; SIGTERM to the busiest edge after 1 s.
    let pub_task = tokio::spawn(async move {
        for n in 1..=LAST {
            publisher
                .publish("room:load", "", &json!({"n": n}))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut busiest = (0, 0);
    for (i, a) in addrs.iter().enumerate() {
        let (_, body) = fanout_testkit::http(*a, "GET", "/api/stats", Some(ADMIN), None).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        let conns = v["node"]["connections"].as_u64().unwrap();
        if conns > busiest.1 {
            busiest = (i, conns);
        }
    }
    assert!(busiest.1 > 0);
    let (victim, _) = &mut edges[busiest.0];
    let pid = victim.id().unwrap();
    let started = std::time::Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), victim.wait())
        .await
        .expect("the drained edge exits within its window")
        .unwrap();
    assert!(exit.success(), "exit 0 after a drain: {exit}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "drain window 2 s (+ shutdown): {:?}",
        started.elapsed()
    );
    pub_task.await.unwrap();

    let victim_id = format!("edge{}", busiest.0 + 1);
    let mut moved = 0;
    for f in followers {
        let (got, nodes) = f.await.unwrap();
        // Subscribed before the first: every number once, in order, up to the last.
        assert_eq!(
            got,
            (1..=LAST).collect::<Vec<_>>(),
            "a follower lost or repeated messages (nodes {nodes:?})"
        );
        if nodes.first() == Some(&victim_id) {
            moved += 1;
            assert!(nodes.len() >= 2, "moved off the drained node: {nodes:?}");
            assert!(nodes[1..].iter().all(|n| n != &victim_id), "{nodes:?}");
        }
    }
    assert_eq!(
        moved as u64, busiest.1,
        "every client of the drained node moved"
    );
    drop(lb);
}
