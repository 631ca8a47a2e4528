//! Runs the real `fanout-loadtest` binary, briefly, against an edge on a real Redis:
//! the tool keeps working, and at this small scale nothing is lost or reordered.

use clap::Parser;
use fanout_edge::{Args, Node, Settings};
use fanout_testkit::RedisServer;

const SECRET: &str = "loadtest-smoke-secret-0123456789";

#[tokio::test]
async fn broadcast_scenario_reports_zero_loss() {
    let redis = RedisServer::start().unwrap();
    let args = [
        "fanout-edge",
        "--listen",
        "127.0.0.1:0",
        "--redis-url",
        &redis.url(),
        "--jwt-secret",
        SECRET,
    ];
    let node = Node::start(Settings::from_args(Args::try_parse_from(args).unwrap()).unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fanout-loadtest"))
        .args([
            "broadcast",
            "--url",
            &node.ws_url(),
            "--jwt-secret",
            SECRET,
            "--redis-url",
            &redis.url(),
        ])
        .args([
            "--clients",
            "50",
            "--rate",
            "100",
            "--duration",
            "1",
            "--json",
        ])
        .arg(&report)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["published"], 100);
    assert_eq!(r["expected_deliveries"], 5000);
    assert_eq!(r["delivered"], 5000, "{r}");
    assert_eq!(r["lost"], 0);
    assert_eq!(r["duplicates_or_reordered"], 0);
    assert!(r["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    node.shutdown().await;
}
