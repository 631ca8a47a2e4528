//! Runs the real `fanout-loadtest` binary, briefly, in every scenario against an edge
//! on a real Redis (over WebSockets, and over event streams where the scenario has
//! them): the tool works end to end, counts what it should, and at this small scale
//! nothing is lost, repeated or reordered.

use clap::Parser;
use fanout_edge::{Args, Node, Settings};
use fanout_testkit::RedisServer;
use serde_json::Value;

const SECRET: &str = "loadtest-smoke-secret-0123456789";
const ADMIN: &str = "loadtest-smoke-admin-0123456789";

async fn edge(redis: Option<&RedisServer>) -> Node {
    let mut args = vec![
        "fanout-edge".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--jwt-secret".into(),
        SECRET.into(),
        "--admin-token".into(),
        ADMIN.into(),
    ];
    if let Some(r) = redis {
        args.extend(["--redis-url".into(), r.url()]);
    }
    Node::start(Settings::from_args(Args::try_parse_from(args).unwrap()).unwrap())
        .await
        .unwrap()
}

/// Runs a scenario with `args` and returns its JSON report.
async fn run(node: &Node, args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let plot = dir.path().join("latency.svg");
    let pid = std::process::id().to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fanout-loadtest"))
        .args(&args[..1])
        .args(["--url", &node.ws_url(), "--jwt-secret", SECRET])
        .args(["--server-pid", &pid, "--json"])
        .arg(&report)
        .args(&args[1..])
        .args(if args[0] == "idle" || args[0] == "churn" {
            vec![]
        } else {
            vec!["--plot".to_string(), plot.display().to_string()]
        })
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    if args[0] != "idle" && args[0] != "churn" {
        let svg = std::fs::read_to_string(&plot).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("percentile"),
            "{svg:.200}"
        );
    }
    assert!(
        r["server_rss_bytes_connected"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    r
}

fn assert_no_loss(r: &Value, expected: u64) {
    assert_eq!(r["expected_deliveries"], expected, "{r}");
    assert_eq!(r["delivered"], expected, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["extra"], 0, "{r}");
    assert_eq!(r["out_of_order"], 0, "{r}");
    assert_eq!(r["clients_unfinished"], 0, "{r}");
    assert!(r["publish_lag_ms"]["max"].is_number(), "{r}");
    assert!(r["latency_ms"]["p99"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["latency_ms"]["count"], expected, "{r}");
}

/// `broadcast`: 100 messages published through Redis to 50 clients over `transport`.
async fn broadcast_through_redis(node: &Node, redis: &RedisServer, transport: &str) -> Value {
    let url = redis.url();
    let args = [
        "broadcast",
        "--transport",
        transport,
        "--redis-url",
        &url,
        "--clients",
        "50",
        "--rate",
        "100",
        "--duration",
        "1",
    ];
    run(node, &args).await
}

#[tokio::test]
async fn broadcast_through_redis_and_through_the_api() {
    let redis = RedisServer::start().unwrap();
    let node = edge(Some(&redis)).await;
    let r = broadcast_through_redis(&node, &redis, "ws").await;
    assert_eq!(r["published"], 100);
    assert_no_loss(&r, 5000);

    let api = format!("http://{}", node.local_addr());
    let r = run(
        &node,
        &[
            "broadcast",
            "--api",
            &api,
            "--admin-token",
            ADMIN,
            "--clients",
            "20",
            "--rate",
            "50",
            "--duration",
            "1",
        ],
    )
    .await;
    assert_eq!(r["published"], 50);
    assert_no_loss(&r, 1000);
    node.shutdown().await;
}

#[tokio::test]
async fn per_user_delivers_each_message_to_its_user_only() {
    let redis = RedisServer::start().unwrap();
    let node = edge(Some(&redis)).await;
    let r = run(
        &node,
        &[
            "per-user",
            "--redis-url",
            &redis.url(),
            "--clients",
            "100",
            "--rate",
            "300",
            "--duration",
            "1",
        ],
    )
    .await;
    assert_eq!(r["published"], 300);
    // One delivery per message: each goes to exactly one user.
    assert_no_loss(&r, 300);
    node.shutdown().await;
}

#[tokio::test]
async fn job_progress_ends_every_watchers_subscription() {
    let redis = RedisServer::start().unwrap();
    let node = edge(Some(&redis)).await;
    let r = run(
        &node,
        &[
            "job-progress",
            "--redis-url",
            &redis.url(),
            "--clients",
            "30",
            "--watchers",
            "3",
            "--duration",
            "1",
        ],
    )
    .await;
    // 10 jobs × (10 progress events + 1 terminal), to 3 watchers each.
    assert_eq!(r["jobs"], 10);
    assert_eq!(r["published"], 110);
    assert_no_loss(&r, 330);
    assert_eq!(r["subscriptions_completed"], 30, "{r}");
    node.shutdown().await;
}

#[tokio::test]
async fn churn_and_idle_on_the_embedded_broker() {
    let node = edge(None).await;
    let r = run(
        &node,
        &[
            "churn",
            "--rate",
            "100",
            "--duration",
            "1",
            "--clients",
            "50",
        ],
    )
    .await;
    assert_eq!(r["cycles_failed"], 0, "{r}");
    assert_eq!(r["cycles_aborted"], 0, "{r}");
    // Exactly rate × duration cycles: every one of them completes on this small scale.
    assert_eq!(r["cycles_started"], 100, "{r}");
    assert_eq!(r["cycles_ok"], 100, "{r}");
    assert_eq!(r["latency_ms"]["count"], 100, "{r}");

    let r = run(&node, &["idle", "--clients", "200", "--duration", "1"]).await;
    assert_eq!(r["still_connected_at_end"], 200, "{r}");
    assert_eq!(r["dropped_while_idle"], 0, "{r}");
    assert!(r["server_rss_bytes_per_connection"].is_number(), "{r}");
    node.shutdown().await;
}

#[tokio::test]
async fn broadcast_and_idle_over_event_streams() {
    let redis = RedisServer::start().unwrap();
    let node = edge(Some(&redis)).await;
    let r = broadcast_through_redis(&node, &redis, "sse").await;
    assert_eq!(r["transport"], "sse", "{r}");
    assert_eq!(r["clients"], 50, "{r}");
    assert_eq!(r["published"], 100, "{r}");
    assert_no_loss(&r, 5000);
    // No stream ended early: every client read until it was told to stop.
    assert_eq!(r["clients_short"], 0, "{r}");
    assert_eq!(r["client_errors"], serde_json::json!([]), "{r}");

    let r = run(
        &node,
        &[
            "idle",
            "--transport",
            "sse",
            "--clients",
            "200",
            "--duration",
            "1",
        ],
    )
    .await;
    assert_eq!(r["transport"], "sse", "{r}");
    assert_eq!(r["still_connected_at_end"], 200, "{r}");
    assert_eq!(r["dropped_while_idle"], 0, "{r}");
    assert!(r["server_rss_bytes_per_connection"].is_number(), "{r}");
    node.shutdown().await;
}

#[tokio::test]
async fn storm_without_events_counts_every_message_once() {
    let redis = RedisServer::start().unwrap();
    let node = edge(Some(&redis)).await;
    let url = redis.url();
    for shared in [None, Some("5")] {
        let mut args = vec![
            "storm",
            "--redis-url",
            &url,
            "--clients",
            "100",
            "--rate",
            "200",
            "--duration",
            "2",
            "--grace",
            "5",
        ];
        if let Some(k) = shared {
            args.extend(["--shared", k]);
        }
        let r = run(&node, &args).await;
        assert_eq!(r["published"], 400, "{r}");
        assert_eq!(r["channel_count"], if shared.is_some() { 5 } else { 100 });
        assert_eq!(r["lost"], 0, "{r}");
        assert_eq!(r["app_duplicates"], 0, "{r}");
        assert_eq!(r["raw_duplicate_frames"], 0, "{r}");
        assert_eq!(r["resets"], 0, "{r}");
        assert_eq!(r["caught_up_at_end"], 100, "{r}");
        assert_eq!(r["clients_unfinished"], 0, "{r}");
        assert_eq!(r["events"], serde_json::json!([]), "{r}");
        assert_eq!(r["outages_before_any_event"], 0, "{r}");
        // Every client's messages: all of its channel's.
        let per_client = if shared.is_some() { 400 / 5 } else { 400 / 100 };
        assert_eq!(r["expected_deliveries"], 100 * per_client, "{r}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_a_clear_error() {
    let bin = env!("CARGO_BIN_EXE_fanout-loadtest");
    for (args, needle) in [
        (
            &[
                "broadcast",
                "--jwt-secret",
                "s",
                "--duration",
                "0",
                "--redis-url",
                "redis://127.0.0.1:1",
            ][..],
            "--duration must be",
        ),
        (&["broadcast", "--jwt-secret", "s"][..], "give --redis-url"),
        (
            &["idle", "--jwt-secret", "s", "--clients", "70000"][..],
            "--clients must be",
        ),
        (
            &["idle", "--jwt-secret", "s", "--url", "http://x:1/ws"][..],
            "--url must be ws://",
        ),
        (
            &[
                "per-user",
                "--jwt-secret",
                "s",
                "--transport",
                "sse",
                "--redis-url",
                "redis://127.0.0.1:1",
            ][..],
            "--transport sse is for broadcast and idle",
        ),
        (
            &[
                "idle",
                "--jwt-secret",
                "s",
                "--transport",
                "sse",
                "--url",
                "ws://127.0.0.1:1/socket",
            ][..],
            "--url must end in /ws",
        ),
        (
            &[
                "storm",
                "--jwt-secret",
                "s",
                "--redis-url",
                "redis://127.0.0.1:1",
                "--kill-pid",
                "1",
            ][..],
            "is not a fanout-edge; refusing to signal it",
        ),
        (
            &[
                "storm",
                "--jwt-secret",
                "s",
                "--redis-url",
                "redis://127.0.0.1:1",
                "--duration",
                "10",
                "--kill-pid",
                "1",
                "--kill-at",
                "12",
            ][..],
            "--kill-at must be within the publishing time",
        ),
    ] {
        let out = tokio::process::Command::new(bin)
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // A token the edge refuses: the run fails, saying why — a close code over
    // WebSockets, an HTTP status over event streams.
    let node = edge(None).await;
    for (transport, why) in [("ws", "4001"), ("sse", "HTTP 401")] {
        let out = tokio::process::Command::new(bin)
            .args([
                "idle",
                "--transport",
                transport,
                "--url",
                &node.ws_url(),
                "--jwt-secret",
                "not-the-secret-0123456789",
                "--clients",
                "3",
                "--duration",
                "1",
            ])
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{transport}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("3 of 3 clients could not connect"),
            "{transport}: {err}"
        );
        assert!(err.contains(why), "{transport}: {err}");
    }
    node.shutdown().await;
}
