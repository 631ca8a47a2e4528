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
