//! Shared harness: start real edge nodes in-process on 127.0.0.1:0 against the embedded
//! broker or a real redis-server, mint tokens, connect clients.
#![allow(dead_code)]

use clap::Parser;
use fanout_edge::{Args, Node, Settings};
use fanout_testkit::{RedisServer, WsClient};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub const SECRET: &str = "integration-test-secret-0123456789";
pub const ADMIN: &str = "integration-admin-token-0123456789";

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// An HS256 token signed with [`SECRET`].
pub fn token_with(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A connection token for `user` with a `channels` claim, valid for an hour.
pub fn token(user: &str, channels: &[&str]) -> String {
    token_with(json!({"sub": user, "exp": now() + 3600, "channels": channels}))
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// An RS256 token signed with the test RSA key, with an optional `kid`.
pub fn rs256_token_kid(claims: Value, kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_string);
    let key = EncodingKey::from_rsa_pem(&fixture("rsa-test-private.pem")).unwrap();
    encode(&header, &claims, &key).unwrap()
}

pub fn rs256_token(claims: Value) -> String {
    rs256_token_kid(claims, None)
}

/// An ES256 token signed with the test P-256 key.
pub fn es256_token(claims: Value) -> String {
    let key = EncodingKey::from_ec_pem(&fixture("ec-test-private.pem")).unwrap();
    encode(&Header::new(Algorithm::ES256), &claims, &key).unwrap()
}

pub const RSA_PUBLIC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/rsa-test-public.pem"
);
pub const EC_PUBLIC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ec-test-public.pem"
);
pub const JWKS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwks.json");

/// Starts a node with the HS256 test secret, the test admin token and `extra` flags.
pub async fn start(redis: Option<&str>, extra: &[&str]) -> Node {
    let mut args = vec![
        "fanout-edge",
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret",
        SECRET,
        "--admin-token",
        ADMIN,
    ];
    if let Some(url) = redis {
        args.extend(["--redis-url", url]);
    }
    args.extend_from_slice(extra);
    start_args(&args).await
}

pub async fn start_args(args: &[&str]) -> Node {
    let settings = Settings::from_args(Args::try_parse_from(args).unwrap()).unwrap();
    Node::start(settings).await.unwrap()
}

/// Which broker a test runs against.
pub enum Backend {
    Memory,
    Redis(RedisServer),
}

impl Backend {
    /// Both backends: every delivery test runs against each.
    pub fn all() -> Vec<Backend> {
        vec![
            Backend::Memory,
            Backend::Redis(RedisServer::start().expect("redis-server")),
        ]
    }

    pub fn url(&self) -> Option<String> {
        match self {
            Backend::Memory => None,
            Backend::Redis(r) => Some(r.url()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Redis(_) => "redis",
        }
    }
}

/// Starts a node on `backend` with the config file `cfg`.
pub async fn start_configured(backend: &Backend, cfg: &tempfile::TempPath) -> Node {
    start(
        backend.url().as_deref(),
        &["--config", cfg.to_str().unwrap()],
    )
    .await
}

/// Connects with `?token=` and consumes the `connected` frame.
pub async fn connect(node: &Node, token: &str) -> WsClient {
    let mut c = WsClient::connect(&format!("{}?token={token}", node.ws_url()))
        .await
        .unwrap();
    let hello = c.recv_type("connected").await;
    assert_eq!(hello["node"], node.settings().node_id.as_str());
    c
}

/// `POST /api/publish` with the admin token and a body as given.
pub async fn api_publish_body(node: &Node, body: &str) -> (u16, String) {
    api_publish_body_at(node.local_addr(), body).await
}

/// The same, by address (for tasks that do not hold the node).
pub async fn api_publish_body_at(addr: std::net::SocketAddr, body: &str) -> (u16, String) {
    fanout_testkit::http(addr, "POST", "/api/publish", Some(ADMIN), Some(body)).await
}

/// `POST /api/publish` of `data` on `channel` with the admin token.
pub async fn api_publish(node: &Node, channel: &str, data: Value) -> (u16, Value) {
    let body = json!({"channel": channel, "data": data}).to_string();
    let (status, text) = api_publish_body(node, &body).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Writes a config file into a fresh temp dir and returns its path.
pub fn config_file(text: &str) -> tempfile::TempPath {
    use std::io::Write;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.into_temp_path()
}

/// The sum of every sample of `/metrics` whose line starts with `series` (a name, or a
/// name with the start of its labels, e.g. `fanout_x_total{outcome="reset"`).
pub async fn metric(node: &Node, series: &str) -> f64 {
    let text = fanout_testkit::http(node.local_addr(), "GET", "/metrics", None, None)
        .await
        .1;
    text.lines()
        .filter(|l| {
            l.strip_prefix(series).is_some_and(|rest| {
                series.contains('{') || rest.starts_with(' ') || rest.starts_with('{')
            })
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `GET /api/stats` with the admin token.
pub async fn stats(node: &Node) -> Value {
    let (status, body) =
        fanout_testkit::http(node.local_addr(), "GET", "/api/stats", Some(ADMIN), None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The status of `GET /readyz`.
pub async fn readyz(node: &Node) -> u16 {
    fanout_testkit::http(node.local_addr(), "GET", "/readyz", None, None)
        .await
        .0
}

/// Waits (up to 20 s) until `check` holds.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// Frames up to and including the message whose `data.n` is `last`; panics on a close.
pub async fn read_until_n(client: &mut WsClient, last: u64) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let f = client.recv().await;
        let done = f["type"] == "message" && f["data"]["n"] == last;
        frames.push(f);
        if done {
            return frames;
        }
    }
}

/// The `data.n` of every message among `frames`, in order.
pub fn numbers(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["data"]["n"].as_u64().expect("numbered message"))
        .collect()
}

/// A node as its own process (so that it can get SIGTERM or `kill -9`), on a free port,
/// with the test secret and admin token and `extra` flags; returns once `/readyz` is 200.
pub async fn spawn_edge(
    redis_url: &str,
    id: &str,
    extra: &[&str],
) -> (tokio::process::Child, std::net::SocketAddr) {
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], fanout_testkit::free_port()).into();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fanout-edge"))
        .args(["--listen", &addr.to_string(), "--redis-url", redis_url])
        .args([
            "--node-id",
            id,
            "--jwt-secret",
            SECRET,
            "--admin-token",
            ADMIN,
        ])
        .args(extra)
        .env("FANOUT_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually("the edge process ready", || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
            && fanout_testkit::http(addr, "GET", "/readyz", None, None)
                .await
                .0
                == 200
    })
    .await;
    (child, addr)
}

/// Waits (at most 10 s) for a spawned edge process to exit, and asserts it exited 0.
pub async fn exits_cleanly(child: &mut tokio::process::Child) {
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
        .await
        .expect("the process exits within 10 s")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// Sends SIGTERM to a spawned edge process (what an orchestrator does to drain it).
pub fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("the process runs").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(sent.unwrap().success(), "kill -TERM {pid}");
}
