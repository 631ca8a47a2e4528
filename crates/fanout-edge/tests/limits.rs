//! Connection limits against a real node: sockets that have not authenticated have
//! their own budget and cannot lock real clients out; per-IP and per-user limits; the
//! node's own capacity; the server API's body deadline. Each refusal carries its close
//! code, a reason, and a count in `fanout_connections_refused_total{limit}`.

mod common;

use std::time::Duration;

use common::*;
use fanout_testkit::{Incoming, WsClient};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn refused(url: &str) -> (Option<u16>, String) {
    let mut c = WsClient::connect(url).await.unwrap();
    match c.next().await {
        Incoming::Closed { code, reason } => (code, reason),
        other => panic!("expected a close, got {other:?}"),
    }
}

async fn refusals(node: &fanout_edge::Node, limit: &str) -> f64 {
    metric(
        node,
        &format!("fanout_connections_refused_total{{limit=\"{limit}\""),
    )
    .await
}

#[tokio::test]
async fn unauthenticated_sockets_cannot_lock_real_clients_out() {
    let cfg = config_file("[limits]\nmax_connections = 5\nmax_pending_auth = 3\n");
    let node = start_configured(&Backend::Memory, &cfg).await;
    let before = refusals(&node, "pending_auth").await;
    // Ten raw upgrades that never authenticate: three are held, the rest refused 1013.
    let mut held = Vec::new();
    let mut codes = Vec::new();
    for _ in 0..10 {
        let mut c = WsClient::connect(&node.ws_url()).await.unwrap();
        match c.next_within(Duration::from_millis(300)).await {
            None => held.push(c),
            Some(Incoming::Closed { code, reason }) => {
                assert!(reason.contains("waiting to authenticate"), "{reason}");
                codes.push(code);
            }
            Some(other) => panic!("{other:?}"),
        }
    }
    assert_eq!((held.len(), codes), (3, vec![Some(1013); 7]));
    assert_eq!(refusals(&node, "pending_auth").await - before, 7.0);
    assert_eq!(metric(&node, "fanout_pending_auth_connections").await, 3.0);
    // Real clients with a token in the handshake get in: the node has room for five.
    let mut real = Vec::new();
    for user in 0..5 {
        real.push(connect(&node, &token(&user.to_string(), &[])).await);
    }
    // The sixth finds the node full.
    let (code, reason) = refused(&format!("{}?token={}", node.ws_url(), token("9", &[]))).await;
    assert_eq!(
        (code, reason.as_str()),
        (Some(1013), "the node is full; try later")
    );
    // A pending socket that authenticates when the node is full is refused, and its
    // pending slot is given back.
    let mut first = held.pop().unwrap();
    first
        .send(json!({"type":"auth","token":token("8", &[])}))
        .await;
    assert_eq!(first.expect_close().await, Some(1013));
    drop(real.pop());
    let mut second = held.pop().unwrap();
    eventually("a connection slot given back", || async {
        metric(&node, "fanout_connections").await < 5.0
    })
    .await;
    second
        .send(json!({"type":"auth","token":token("7", &[])}))
        .await;
    assert_eq!(second.recv_type("connected").await["user"], "7");
    drop(first);
    eventually("one pending socket left", || async {
        metric(&node, "fanout_pending_auth_connections").await == 1.0
    })
    .await;
    node.shutdown().await;
}

#[tokio::test]
async fn per_ip_and_per_user_limits_refuse_with_4008() {
    let cfg = config_file("[limits]\nmax_connections_per_ip = 4\nmax_connections_per_user = 2\n");
    let node = start_configured(&Backend::Memory, &cfg).await;
    let ws = node.ws_url();
    // Per user: two for user 1, the third refused, in the handshake or in `auth`.
    let a = connect(&node, &token("1", &[])).await;
    let _b = connect(&node, &token("1", &[])).await;
    let (code, reason) = refused(&format!("{ws}?token={}", token("1", &[]))).await;
    assert_eq!(
        (code, reason.as_str()),
        (Some(4008), "too many connections for this user")
    );
    let mut c = WsClient::connect(&ws).await.unwrap();
    c.send(json!({"type":"auth","token":token("1", &[])})).await;
    assert_eq!(c.expect_close().await, Some(4008));
    drop(c);
    assert_eq!(refusals(&node, "per_user").await, 2.0);
    eventually("the refused sockets gone", || async {
        metric(&node, "fanout_pending_auth_connections").await == 0.0
    })
    .await;
    // Another user is not affected.
    let _d = connect(&node, &token("2", &[])).await;
    // Per IP: four sockets from 127.0.0.1 are held (a, b, d and one pending).
    let _pending = WsClient::connect(&ws).await.unwrap();
    eventually("four sockets", || async {
        metric(&node, "fanout_pending_auth_connections").await == 1.0
    })
    .await;
    let (code, reason) = refused(&format!("{ws}?token={}", token("3", &[]))).await;
    assert_eq!(
        (code, reason.as_str()),
        (Some(4008), "too many connections from this address")
    );
    assert_eq!(refusals(&node, "per_ip").await, 1.0);
    // A closed connection gives both back.
    a.close().await;
    eventually("the slots given back", || async {
        metric(&node, "fanout_connections").await == 2.0
    })
    .await;
    let mut again = connect(&node, &token("1", &[])).await;
    again.send(json!({"type":"ping","id":1})).await;
    assert_eq!(again.recv_type("pong").await["id"], 1);
    node.shutdown().await;
}

#[tokio::test]
async fn a_server_api_body_that_trickles_in_gets_408_and_the_connection_goes() {
    let cfg = config_file("[limits]\napi_body_timeout_secs = 1\n");
    let node = start_configured(&Backend::Memory, &cfg).await;
    let mut s = tokio::net::TcpStream::connect(node.local_addr())
        .await
        .unwrap();
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"chan"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    // One byte every 300 ms: never the whole body in time.
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            n = s.read(&mut buf) => {
                let n = n.unwrap_or(0);
                if n == 0 { break; }
                response.extend_from_slice(&buf[..n]);
            }
            _ = tokio::time::sleep(Duration::from_millis(300)) => {
                let _ = s.write_all(b"n").await;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no deadline");
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("request body not received within 1 s"),
        "{text}"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        metric(
            &node,
            "fanout_api_requests_total{endpoint=\"publish\",status=\"408\""
        )
        .await,
        1.0
    );
    node.shutdown().await;
}
