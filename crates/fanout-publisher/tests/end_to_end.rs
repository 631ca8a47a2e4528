//! The walking skeleton end to end: two edge nodes on one real Redis; clients of
//! `user:42` on node A and node B both receive what the crate, the `fanout-publish` CLI,
//! the `/api/publish` endpoint and a raw JSON `PUBLISH` send.

mod common;

use common::{token, ADMIN};

use std::time::Duration;

use fanout_edge::Node;
use fanout_publisher::{JobStatus, Publisher};
use fanout_testkit::{RedisServer, WsClient};
use serde_json::{json, Value};

async fn client(node: &Node, token: &str, channel: &str) -> WsClient {
    let mut c = WsClient::connect(&format!("{}?token={token}", node.ws_url()))
        .await
        .unwrap();
    let hello = c.recv_type("connected").await;
    assert_eq!(hello["node"], node.settings().node_id.as_str());
    let r = c.subscribe(1, channel).await;
    assert_eq!(r["type"], "subscribed", "{r}");
    c
}

async fn both_receive(a: &mut WsClient, b: &mut WsClient, data: Value) -> (Value, Value) {
    let ma = a.recv_type("message").await;
    let mb = b.recv_type("message").await;
    assert_eq!(ma["data"], data);
    assert_eq!(mb["data"], data);
    (ma, mb)
}

#[tokio::test]
async fn every_publisher_reaches_clients_on_every_node() {
    let redis = RedisServer::start().unwrap();
    let node_a = common::edge(&redis.url(), "node-a").await;
    let node_b = common::edge(&redis.url(), "node-b").await;
    let t = token("42", &[]);
    let mut a = client(&node_a, &t, "user:42").await;
    let mut b = client(&node_b, &t, "user:42").await;
    let mut nobody = client(&node_b, &token("43", &[]), "user:43").await;

    // 1. The crate.
    let publisher = Publisher::connect(&redis.url()).await.unwrap();
    let ack = publisher
        .user_event(42, "notification", &json!({"via": "crate"}))
        .await
        .unwrap();
    let (ma, mb) = both_receive(&mut a, &mut b, json!({"via": "crate"})).await;
    assert_eq!(ma["event"], "notification");
    assert_eq!(ma["offset"], ack.offset);
    assert_eq!(mb["epoch"], ack.epoch.as_str());

    // 2. The CLI.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fanout-publish"))
        .args([
            "--redis-url",
            &redis.url(),
            "user:42",
            r#"{"via":"cli"}"#,
            "--event",
            "cli",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(printed, ack.offset + 1);
    let (ma, _) = both_receive(&mut a, &mut b, json!({"via": "cli"})).await;
    assert_eq!(ma["offset"], printed);

    // 3. The server API of node A.
    let (status, body) = fanout_testkit::http(
        node_a.local_addr(),
        "POST",
        "/api/publish",
        Some(ADMIN),
        Some(r#"{"channel":"user:42","data":{"via":"api"},"event":"api"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let api_ack: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(api_ack["offset"], printed + 1);
    let (_, mb) = both_receive(&mut a, &mut b, json!({"via": "api"})).await;
    assert_eq!(mb["offset"], api_ack["offset"]);

    // 4. A raw JSON PUBLISH, as from redis-cli or Python: data without an offset.
    redis
        .cli(&["PUBLISH", "user:42", r#"{"via":"raw"}"#])
        .unwrap();
    let (ma, _) = both_receive(&mut a, &mut b, json!({"via": "raw"})).await;
    assert!(ma.get("offset").is_none());

    // 5. Another language running the documented script with plain EVAL.
    let body = format!(
        r#"{{"fanout": 1, "ts": {}, "event": "py", "data": {{"via": "eval"}}}}"#,
        fanout_protocol::now_ms()
    );
    let reply = redis
        .cli(&[
            "EVAL",
            fanout_protocol::layout::PUBLISH_SCRIPT,
            "2",
            "fanout:{user:42}:meta",
            "fanout:{user:42}:history",
            "user:42",
            &body,
            "100",
            "3600",
            "unusedepoch",
            "0",
        ])
        .unwrap();
    let (ma, _) = both_receive(&mut a, &mut b, json!({"via": "eval"})).await;
    assert_eq!(ma["offset"], printed + 2, "{reply}");
    assert_eq!(ma["epoch"], ack.epoch.as_str());
    assert_eq!(ma["event"], "py");

    // The history layout is what docs/protocol.md says.
    assert_eq!(
        redis
            .cli(&["HGET", "fanout:{user:42}:meta", "offset"])
            .unwrap(),
        (printed + 2).to_string()
    );
    assert_eq!(
        redis.cli(&["XLEN", "fanout:{user:42}:history"]).unwrap(),
        "4"
    );

    // Nobody else got any of it.
    assert_eq!(nobody.next_within(Duration::from_millis(200)).await, None);
    node_a.shutdown().await;
    node_b.shutdown().await;
}

#[tokio::test]
async fn job_helpers_and_the_background_handle() {
    let mut redis = RedisServer::start().unwrap();
    let edge = common::edge(&redis.url(), "node-j").await;
    let mut watcher = client(&edge, &token("1", &["job_progress:*"]), "job_progress:77").await;
    let publisher = Publisher::connect(&redis.url()).await.unwrap();
    publisher
        .job_progress(77, 40.0, Some("enriching"))
        .await
        .unwrap();
    let m = watcher.recv_type("message").await;
    assert_eq!(m["event"], "progress");
    assert_eq!(
        m["data"],
        json!({"status":"running","pct":40.0,"message":"enriching"})
    );
    publisher
        .job_completed(77, JobStatus::Succeeded, &json!({"rows": 3}))
        .await
        .unwrap();
    let m = watcher.recv_type("message").await;
    assert_eq!(m["data"], json!({"status":"succeeded","result":{"rows":3}}));

    // The background handle delivers in order...
    let handle = publisher.background(64);
    for pct in [10.0, 20.0, 30.0] {
        assert!(handle.job_progress(78, pct, None));
    }
    assert!(handle.flush(Duration::from_secs(5)).await);
    assert_eq!(handle.published(), 3);

    // ...and during a Redis outage it never blocks: a full queue drops and counts.
    redis.kill();
    let started = std::time::Instant::now();
    let mut accepted = 0;
    for i in 0..500 {
        if handle.job_progress(79, i as f64, None) {
            accepted += 1;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "enqueueing blocked"
    );
    assert!(accepted < 500);
    assert!(handle.dropped() >= (500 - accepted) as u64);
    edge.shutdown().await;
}
