//! Where the load test publishes: through Redis with the publisher crate (what job
//! workers do), or through the edge's `POST /api/publish` on kept-alive connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use tokio::sync::Mutex;

use crate::PublishOpts;

/// Kept-alive connections to the publish API (requests on one go one at a time).
const API_CONNECTIONS: usize = 8;

pub enum Sink {
    Redis(fanout_publisher::Publisher),
    Api {
        base: String,
        addr: SocketAddr,
        token: String,
        conns: Vec<Mutex<Option<SendRequest<Full<Bytes>>>>>,
        next: AtomicUsize,
    },
}

impl Sink {
    pub async fn open(opts: &PublishOpts) -> anyhow::Result<Sink> {
        if let Some(url) = &opts.redis_url {
            let publisher = fanout_publisher::Publisher::connect(url)
                .await
                .with_context(|| "connecting the publisher to Redis")?;
            return Ok(Sink::Redis(publisher));
        }
        let (Some(api), Some(token)) = (&opts.api, &opts.admin_token) else {
            bail!("give --redis-url, or --api with --admin-token, to publish");
        };
        let base = api.trim_end_matches('/').to_string();
        let authority = base
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("--api must be http://host:port"))?;
        let addr = tokio::net::lookup_host(authority)
            .await?
            .next()
            .ok_or_else(|| anyhow!("cannot resolve {authority}"))?;
        Ok(Sink::Api {
            base,
            addr,
            token: token.clone(),
            conns: (0..API_CONNECTIONS).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// Publishes `data` (JSON) on `channel`; returns once the publish is acknowledged.
    pub async fn publish(
        &self,
        channel: &str,
        event: Option<&str>,
        data: &RawValue,
    ) -> anyhow::Result<()> {
        match self {
            Sink::Redis(p) => {
                p.publish_raw(channel, event, data).await?;
                Ok(())
            }
            Sink::Api {
                base,
                addr,
                token,
                conns,
                next,
            } => {
                let mut body = serde_json::json!({"channel": channel, "data": data});
                if let Some(event) = event {
                    body["event"] = event.into();
                }
                let body = Bytes::from(body.to_string());
                let i = next.fetch_add(1, Ordering::Relaxed) % conns.len();
                let mut slot = conns[i].lock().await;
                let sender = match slot.as_mut() {
                    Some(s) if !s.is_closed() => s,
                    _ => slot.insert(connect(*addr).await?),
                };
                let req = hyper::Request::post(format!("{base}/api/publish"))
                    .header("Authorization", format!("Bearer {token}"))
                    .header("Content-Type", "application/json")
                    .header("Host", addr.to_string())
                    .body(Full::new(body))?;
                let resp =
                    match tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
                        .await
                    {
                        Ok(r) => r,
                        Err(_) => {
                            *slot = None;
                            bail!("publish {channel}: no answer within 10 s");
                        }
                    };
                let resp = match resp {
                    Ok(r) => r,
                    Err(e) => {
                        *slot = None;
                        return Err(e.into());
                    }
                };
                let status = resp.status();
                let text = resp.into_body().collect().await?.to_bytes();
                if !status.is_success() {
                    bail!(
                        "publish {channel}: HTTP {status}: {}",
                        String::from_utf8_lossy(&text)
                    );
                }
                Ok(())
            }
        }
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A numbered test message: `{"seq":…,"sent_us":…,"pad":"xx…"}` plus `extra` fields.
pub fn message(seq: u64, sent_us: u64, pad: &str, extra: &str) -> Box<RawValue> {
    let json = format!(r#"{{"seq":{seq},"sent_us":{sent_us}{extra},"pad":"{pad}"}}"#);
    RawValue::from_string(json).expect("valid JSON")
}
