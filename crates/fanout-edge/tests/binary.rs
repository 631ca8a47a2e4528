//! The `fanout-edge` binary as a newcomer runs it: dev mode prints a token that works,
//! bad configuration exits 2 naming the setting, SIGTERM closes clients with 1001 and
//! exits 0.

mod common;

use std::process::Stdio;
use std::time::Duration;

use fanout_testkit::WsClient;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn dev_mode_token_works_and_sigterm_closes_with_1001() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fanout-edge"))
        .args(["--listen", "127.0.0.1:0", "--drain-secs", "1"])
        .env("FANOUT_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut url, mut token, mut admin) = (None, None, None);
    while token.is_none() || admin.is_none() || url.is_none() {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("dev mode output within 10 s")
            .unwrap()
            .expect("stdout open");
        if let Some(rest) = line.trim().strip_prefix("websocat '") {
            url = Some(rest.split('?').next().unwrap().to_string());
        } else if let Some(t) = line.trim().strip_prefix("demo user token:") {
            token = Some(t.trim().to_string());
        } else if let Some(t) = line.trim().strip_prefix("admin token:") {
            admin = Some(t.trim().to_string());
        }
    }
    let (url, token, admin) = (url.unwrap(), token.unwrap(), admin.unwrap());
    let mut c = WsClient::connect(&format!("{url}?token={token}"))
        .await
        .unwrap();
    assert_eq!(c.recv_type("connected").await["user"], "demo");
    assert_eq!(c.subscribe(1, "user:demo").await["type"], "subscribed");
    assert_eq!(c.subscribe(2, "job_progress:1").await["type"], "subscribed");
    let addr: std::net::SocketAddr = url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .parse()
        .unwrap();
    let (status, body) = fanout_testkit::http(
        addr,
        "POST",
        "/api/publish",
        Some(&admin),
        Some(r#"{"channel":"user:demo","data":{"hello":"world"}}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        c.recv_type("message").await["data"],
        json!({"hello": "world"})
    );

    common::sigterm(&child);
    // Closed within the 1 s drain window, then the process exits 0.
    assert_eq!(c.expect_close().await, Some(1001));
    common::exits_cleanly(&mut child).await;
}

#[tokio::test]
async fn bad_configuration_exits_2_naming_the_setting() {
    for (args, setting) in [
        (vec!["--listen", "nowhere"], "FANOUT_LISTEN"),
        (vec!["--redis-url", "memcached://x"], "FANOUT_REDIS_URL"),
        (vec!["--jwt-secret", "short"], "FANOUT_JWT_SECRET"),
        (vec!["--jwt-jwks", "/nonexistent.json"], "FANOUT_JWT_JWKS"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_fanout-edge"))
            .args(&args)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(setting), "{args:?}: {stderr}");
    }
}
