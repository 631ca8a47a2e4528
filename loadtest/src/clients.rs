//! The client fleet: connects, subscribes, counts and times every message.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use tokio::net::TcpSocket;
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::Common;

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What one client saw.
pub struct ClientResult {
    pub received: u64,
    pub duplicates_or_reordered: u64,
    pub latency_us: Histogram<u64>,
    pub closed: Option<String>,
}

pub struct Fleet {
    tasks: Vec<tokio::task::JoinHandle<ClientResult>>,
    expected: watch::Sender<Option<u64>>,
}

fn token(secret: &str, user: &str, channel: &str) -> String {
    let ns = channel.split(':').next().unwrap_or(channel);
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    encode(
        &Header::default(),
        &json!({"sub": user, "exp": exp, "channels": [format!("{ns}:*")]}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding")
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects from 127.0.0.2–127.0.0.9 in turn, so that 10k+ sockets do not run out of
/// source ports on one address.
async fn open(url: &str, host: &str, port: u16, i: usize) -> anyhow::Result<Ws> {
    let target: SocketAddr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| anyhow!("cannot resolve {host}"))?;
    let socket = TcpSocket::new_v4()?;
    if target.ip().is_loopback() {
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8);
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    Ok(ws)
}

impl Fleet {
    pub async fn connect(c: &Common) -> anyhow::Result<Fleet> {
        let parsed = c
            .url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow!("--url must be ws://…"))?;
        let authority = parsed.split('/').next().unwrap_or(parsed);
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("--url needs a port"))?;
        let port: u16 = port.parse().context("port")?;
        let (expected, expected_rx) = watch::channel(None);
        let gate = Arc::new(Semaphore::new(c.connect_concurrency.max(1)));
        let mut ready = Vec::with_capacity(c.clients);
        let mut tasks = Vec::with_capacity(c.clients);
        for i in 0..c.clients {
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
            ready.push(ready_rx);
            let url = format!(
                "{}?token={}",
                c.url,
                token(&c.jwt_secret, &format!("lt-{i}"), &c.channel)
            );
            let host = host.to_string();
            let channel = c.channel.clone();
            let gate = gate.clone();
            let mut expected_rx = expected_rx.clone();
            tasks.push(tokio::spawn(async move {
                let mut result = ClientResult {
                    received: 0,
                    duplicates_or_reordered: 0,
                    latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
                    closed: None,
                };
                let permit = gate.acquire_owned().await.expect("semaphore");
                let ws = async {
                    let mut ws = open(&url, &host, port, i).await?;
                    ws.send(Message::Text(
                        json!({"type":"subscribe","id":1,"channel":channel})
                            .to_string()
                            .into(),
                    ))
                    .await?;
                    while let Some(msg) = ws.next().await {
                        if let Message::Text(t) = msg? {
                            let v: serde_json::Value = serde_json::from_str(&t)?;
                            match v["type"].as_str() {
                                Some("subscribed") => return Ok(ws),
                                Some("error") => return Err(anyhow!("subscribe refused: {v}")),
                                _ => {}
                            }
                        }
                    }
                    Err(anyhow!("closed before subscribed"))
                }
                .await;
                drop(permit);
                let mut ws = match ws {
                    Ok(ws) => {
                        let _ = ready_tx.send(Ok(()));
                        ws
                    }
                    Err(e) => {
                        result.closed = Some(e.to_string());
                        let _ = ready_tx.send(Err(e));
                        return result;
                    }
                };
                let mut next_seq = 0u64;
                loop {
                    if let Some(total) = *expected_rx.borrow() {
                        if result.received >= total {
                            break;
                        }
                    }
                    let msg = tokio::select! {
                        m = ws.next() => m,
                        changed = expected_rx.changed() => {
                            if changed.is_err() { break; }
                            continue;
                        }
                    };
                    match msg {
                        Some(Ok(Message::Text(t))) => {
                            let v: serde_json::Value = match serde_json::from_str(&t) {
                                Ok(v) => v,
                                Err(_) => continue,
                            };
                            if v["type"] != "message" {
                                continue;
                            }
                            let now = now_us();
                            let seq = v["data"]["seq"].as_u64().unwrap_or(u64::MAX);
                            let sent = v["data"]["sent_us"].as_u64().unwrap_or(now);
                            if seq != next_seq {
                                result.duplicates_or_reordered += 1;
                            }
                            next_seq = seq.saturating_add(1);
                            result.received += 1;
                            let _ = result.latency_us.record(now.saturating_sub(sent).max(1));
                        }
                        Some(Ok(Message::Close(f))) => {
                            result.closed = Some(format!("{f:?}"));
                            break;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            result.closed = Some(e.to_string());
                            break;
                        }
                        None => break,
                    }
                }
                let _ = ws.close(None).await;
                result
            }));
        }
        let mut failures = 0;
        let mut first_error = None;
        for r in ready {
            match r.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failures += 1;
                    first_error.get_or_insert(e.to_string());
                }
                Err(_) => failures += 1,
            }
        }
        if failures > 0 {
            return Err(anyhow!(
                "{failures} clients failed to connect; first error: {first_error:?}"
            ));
        }
        Ok(Fleet { tasks, expected })
    }

    /// Tells clients how many messages to expect and collects their results, waiting at
    /// most `grace` for the last messages.
    pub async fn finish(&mut self, expected: u64, grace: Duration) -> Vec<ClientResult> {
        let _ = self.expected.send(Some(expected));
        let deadline = tokio::time::Instant::now() + grace;
        let mut out = Vec::with_capacity(self.tasks.len());
        for task in self.tasks.drain(..) {
            let abort = task.abort_handle();
            match tokio::time::timeout_at(deadline, task).await {
                Ok(Ok(r)) => out.push(r),
                Ok(Err(_)) | Err(_) => {
                    abort.abort();
                    out.push(ClientResult {
                        received: 0,
                        duplicates_or_reordered: 0,
                        latency_us: Histogram::new(3).expect("histogram"),
                        closed: Some("timed out waiting for messages".into()),
                    });
                }
            }
        }
        // Unblock any client still waiting.
        drop(std::mem::replace(
            &mut self.expected,
            watch::channel(None).0,
        ));
        out
    }
}

/// Publishes `total` numbered messages at `--rate`; returns how many were published.
pub async fn publish(c: &Common, total: u64) -> anyhow::Result<u64> {
    let padding = "x".repeat(c.payload);
    let publisher = match &c.redis_url {
        Some(url) => Some(fanout_publisher::Publisher::connect(url).await?),
        None => None,
    };
    let api_addr: Option<SocketAddr> = match (&c.api, &publisher) {
        (Some(api), None) => {
            let authority = api.trim_start_matches("http://").trim_end_matches('/');
            Some(
                tokio::net::lookup_host(authority)
                    .await?
                    .next()
                    .ok_or_else(|| anyhow!("cannot resolve {api}"))?,
            )
        }
        _ => None,
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / c.rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for seq in 0..total {
        tick.tick().await;
        let data = json!({"seq": seq, "sent_us": now_us(), "pad": padding});
        match (&publisher, api_addr) {
            (Some(p), _) => {
                p.publish(&c.channel, "", &data).await?;
            }
            (None, Some(addr)) => {
                let body = json!({"channel": c.channel, "data": data}).to_string();
                let (status, text) = fanout_testkit::http(
                    addr,
                    "POST",
                    "/api/publish",
                    c.admin_token.as_deref(),
                    Some(&body),
                )
                .await;
                if status != 200 {
                    return Err(anyhow!("publish {seq}: HTTP {status}: {text}"));
                }
            }
            _ => unreachable!("checked in main"),
        }
    }
    Ok(total)
}
