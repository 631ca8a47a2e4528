//! Cluster-wide operations across nodes sharing one real Redis: admin disconnects reach
//! every node, and `/api/stats` shows every live node (a killed one drops out within
//! the report TTL).

mod common;

use common::*;
use fanout_testkit::{RedisServer, WsClient};
use serde_json::Value;

async fn connect_url(url: &str, token: &str) -> WsClient {
    let mut c = WsClient::connect(&format!("{url}?token={token}"))
        .await
        .unwrap();
    c.recv_type("connected").await;
    c
}

#[tokio::test]
async fn admin_disconnect_and_stats_span_every_node() {
    let redis = RedisServer::start().unwrap();
    let a = start(
        Some(&redis.url()),
        &["--node-id", "a", "--node-report-ttl-secs", "3"],
    )
    .await;
    let (mut b, b_addr) = spawn_edge(&redis.url(), "b", &["--node-report-ttl-secs", "3"]).await;
    let b_url = format!("ws://{b_addr}/ws");

    let mut on_a = connect(&a, &token("77", &[])).await;
    let mut on_b = connect_url(&b_url, &token("77", &[])).await;
    let mut bystander = connect_url(&b_url, &token("78", &[])).await;

    // The cluster view lists both nodes and sums their connections.
    eventually("both nodes in the cluster view", || async {
        stats(&a).await["cluster"]["nodes"] == 2
    })
    .await;
    let s = stats(&a).await;
    let ids: Vec<&str> = s["cluster"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"], "{s}");

    // One call on node a closes user 77 on both nodes with 4010.
    let (status, body) = fanout_testkit::http(
        a.local_addr(),
        "POST",
        "/api/disconnect",
        Some(ADMIN),
        Some(r#"{"user":"77","reason":"account closed"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["disconnected"], 1, "{body}");
    assert_eq!(body["nodes_notified"], 2, "{body}");
    assert_eq!(on_a.expect_close().await, Some(4010));
    assert_eq!(on_b.expect_close().await, Some(4010));
    bystander
        .send(serde_json::json!({"type":"ping","id":1}))
        .await;
    assert_eq!(bystander.recv_type("pong").await["id"], 1);

    // Node b dies without a word: it leaves the cluster view within the report TTL.
    b.kill().await.unwrap();
    eventually("the dead node gone from the cluster view", || async {
        stats(&a).await["cluster"]["nodes"] == 1
    })
    .await;
    a.shutdown().await;
}
