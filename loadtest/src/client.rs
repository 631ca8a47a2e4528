//! One load-test client: connects (from a spread of loopback source addresses),
//! subscribes, then counts, orders and times every message it receives. The
//! accounting of a frame ([`account`]) is the transport's: a WebSocket text frame here,
//! an event's `data` in [`crate::sse`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use hdrhistogram::Histogram;
use http_body_util::Empty;
use hyper::header::{CONNECTION, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;

pub type Ws = FragmentCollector<TokioIo<Upgraded>>;

/// Microseconds since the Unix epoch (the clock publishers stamp `sent_us` with).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A latency histogram in microseconds, 1 µs … 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Where the clients connect.
#[derive(Clone)]
pub struct Target {
    url: String,
    host: String,
    addr: SocketAddr,
    sources: u8,
}

impl Target {
    pub async fn resolve(url: &str, sources: u8) -> anyhow::Result<Target> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow!("--url must be ws://host:port/path"))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().context("port in --url")?),
            None => (authority, 80),
        };
        let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .next()
            .ok_or_else(|| anyhow!("cannot resolve {host}"))?;
        Ok(Target {
            url: url.to_string(),
            host: authority.to_string(),
            addr,
            sources,
        })
    }

    /// `host:port`, for the `Host` header.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The event-stream path beside the WebSocket one (`…/ws` → `…/sse`, the query
    /// kept), so that a prefix a load balancer routes on stays the same.
    pub fn sse_path(&self) -> anyhow::Result<String> {
        let rest = self.url.strip_prefix("ws://").unwrap_or(&self.url);
        let path = rest.find('/').map_or("/", |at| &rest[at..]);
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let Some(prefix) = path.strip_suffix("/ws") else {
            bail!("with --transport sse, --url must end in /ws (streams are opened at …/sse)");
        };
        Ok(match query {
            Some(q) => format!("{prefix}/sse?{q}"),
            None => format!("{prefix}/sse"),
        })
    }

    /// Opens a TCP connection; on loopback from 127.0.0.(2 + i mod sources).
    pub async fn tcp(&self, i: usize) -> anyhow::Result<tokio::net::TcpStream> {
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if self.addr.ip().is_loopback() && self.addr.is_ipv4() {
            // Let connect() pick the port (per destination): bind() with port 0 would
            // search the whole range of the source address for each of 10k sockets.
            let on: libc::c_int = 1;
            // SAFETY: a valid socket fd and a c_int option value of the stated size.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    &on as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            let source = Ipv4Addr::new(127, 0, 0, 2 + (i % self.sources as usize) as u8);
            socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
        }
        let stream = socket.connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Connects client `i` with `token` and completes the WebSocket handshake.
    pub async fn connect(&self, i: usize, token: &str) -> anyhow::Result<Ws> {
        let stream = self.tcp(i).await?;
        self.upgrade(stream, token, true).await
    }

    /// The WebSocket handshake with `token` on a connected `stream`. Without
    /// `auto_close` a close frame is handed over unanswered (answering it first can fail
    /// when the peer is gone already, and the frame, with its code, is then lost).
    pub async fn upgrade(
        &self,
        stream: tokio::net::TcpStream,
        token: &str,
        auto_close: bool,
    ) -> anyhow::Result<Ws> {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        let uri = format!(
            "http{}{sep}token={token}",
            self.url.strip_prefix("ws").unwrap_or(&self.url)
        );
        let req = hyper::Request::builder()
            .method("GET")
            .uri(uri)
            .header("Host", &self.host)
            .header(UPGRADE, "websocket")
            .header(CONNECTION, "upgrade")
            .header(
                "Sec-WebSocket-Key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("Sec-WebSocket-Version", "13")
            .body(Empty::<Bytes>::new())?;
        let (mut ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, req, stream).await?;
        ws.set_auto_close(auto_close);
        Ok(FragmentCollector::new(ws))
    }
}

struct SpawnExecutor;

impl<Fut> hyper::rt::Executor<Fut> for SpawnExecutor
where
    Fut: std::future::Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::spawn(fut);
    }
}

/// An HS256 connection token for `sub` with these `channels` patterns, valid 1 h.
pub fn token(secret: &str, sub: &str, channels: &[String]) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    encode(
        &Header::default(),
        &json!({"sub": sub, "exp": exp, "channels": channels}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding")
}

/// The fields of a server frame the clients look at; the rest is skipped unparsed.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    ts: Option<u64>,
    #[serde(default, borrow)]
    reason: Option<&'a str>,
    #[serde(default, borrow)]
    code: Option<&'a str>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    sent_us: Option<u64>,
}

/// Sends `subscribe` for `channel` and waits for `subscribed` (or the error).
pub async fn subscribe(ws: &mut Ws, channel: &str) -> anyhow::Result<()> {
    let frame = json!({"type": "subscribe", "id": 1, "channel": channel}).to_string();
    ws.write_frame(Frame::text(Payload::Owned(frame.into_bytes())))
        .await?;
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Text => {
                let f: Incoming<'_> = serde_json::from_slice(&frame.payload)?;
                match f.kind {
                    "subscribed" => return Ok(()),
                    "error" => bail!(
                        "subscribe {channel} refused: {}",
                        String::from_utf8_lossy(&frame.payload)
                    ),
                    _ => {}
                }
            }
            OpCode::Close => bail!("closed before subscribed: {}", close_reason(&frame.payload)),
            _ => {}
        }
    }
}

fn close_reason(payload: &[u8]) -> String {
    if payload.len() >= 2 {
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        format!("{code} {}", String::from_utf8_lossy(&payload[2..]))
    } else {
        "no code".into()
    }
}

/// What every client of a run shares: counters and the latency histogram (sharded, so
/// that thousands of clients do not each carry a histogram, nor contend on one).
pub struct Shared {
    pub delivered: AtomicU64,
    /// Clients whose job subscription ended with `unsubscribed: completed`.
    pub completed: AtomicU64,
    hist: Vec<Mutex<Histogram<u64>>>,
}

const HIST_SHARDS: usize = 32;

impl Shared {
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared {
            delivered: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            hist: (0..HIST_SHARDS).map(|_| Mutex::new(histogram())).collect(),
        })
    }

    pub fn record(&self, i: usize, micros: u64) {
        let mut h = self.hist[i % HIST_SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let _ = h.record(micros.max(1));
    }

    pub fn latency(&self) -> Histogram<u64> {
        let mut all = histogram();
        for h in &self.hist {
            all.add(&*h.lock().unwrap_or_else(|e| e.into_inner()))
                .expect("same bounds");
        }
        all
    }
}

/// Message numbers past this are not tracked (a stray or corrupt `seq`).
const MAX_SEQ: u64 = 1 << 28;

/// Which message numbers a client has seen, one bit each: loss, duplicates and
/// reordering are counted exactly, not inferred from a count.
#[derive(Default, Debug)]
pub struct Numbers {
    bits: Vec<u64>,
    /// One past the highest number seen.
    next: u64,
    /// Distinct numbers seen.
    pub unique: u64,
    /// A number seen again.
    pub duplicates: u64,
    /// A number seen after a higher one (late, but not lost).
    pub reordered: u64,
    /// Messages without a usable `seq`.
    pub unnumbered: u64,
}

impl Numbers {
    /// Whether `seq` was seen.
    pub fn has(&self, seq: u64) -> bool {
        self.bits
            .get((seq / 64) as usize)
            .is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    pub fn see(&mut self, seq: Option<u64>) {
        let Some(seq) = seq.filter(|s| *s < MAX_SEQ) else {
            self.unnumbered += 1;
            return;
        };
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.bits[word] |= bit;
        self.unique += 1;
        if seq < self.next {
            self.reordered += 1;
        } else {
            self.next = seq + 1;
        }
    }
}

/// What one client saw.
#[derive(Default, Debug)]
pub struct Seen {
    /// Message frames, all of them.
    pub received: u64,
    pub numbers: Numbers,
    /// The client did not stop when told to: what it received is unknown.
    pub unfinished: bool,
    /// `unsubscribed` with reason `completed` (a job ended).
    pub completed: bool,
    /// How the connection ended before the client stopped, if it did.
    pub closed: Option<String>,
}

/// Accounts one server frame (its JSON) that client `i` received at `now` (µs): a
/// message's `seq` is tracked and its publish → receive latency recorded when it
/// carries its send time; a job's end and an error are noted.
pub fn account(json: &[u8], now: u64, i: usize, shared: &Shared, seen: &mut Seen) {
    let Ok(f) = serde_json::from_slice::<Incoming<'_>>(json) else {
        return;
    };
    match f.kind {
        "message" => {
            let data = f.data.unwrap_or(Data {
                seq: None,
                sent_us: None,
            });
            seen.numbers.see(data.seq);
            seen.received += 1;
            shared.delivered.fetch_add(1, Ordering::Relaxed);
            if let Some(sent) = data.sent_us.or(f.ts.map(|ms| ms * 1000)) {
                shared.record(i, now.saturating_sub(sent));
            }
        }
        "unsubscribed" if f.reason == Some("completed") => {
            seen.completed = true;
            shared.completed.fetch_add(1, Ordering::Relaxed);
        }
        "error" => {
            seen.closed
                .get_or_insert(format!("error frame: {}", f.code.unwrap_or("?")));
        }
        _ => {}
    }
}

/// Reads until `stop` (or the connection ends), accounting every text frame.
pub async fn receive(mut ws: Ws, i: usize, shared: Arc<Shared>, stop: CancellationToken) -> Seen {
    let mut seen = Seen::default();
    loop {
        let frame = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            f = ws.read_frame() => f,
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                seen.closed = Some(e.to_string());
                return seen;
            }
        };
        match frame.opcode {
            OpCode::Text => account(&frame.payload, now_us(), i, &shared, &mut seen),
            OpCode::Close => {
                seen.closed = Some(format!("closed: {}", close_reason(&frame.payload)));
                return seen;
            }
            _ => {}
        }
    }
    let _ = ws.write_frame(Frame::close(1000, b"")).await;
    seen
}

/// Sends a close frame and waits (briefly) for the server's.
pub async fn close(mut ws: Ws) {
    if ws.write_frame(Frame::close(1000, b"")).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(f) = ws.read_frame().await {
            if f.opcode == OpCode::Close {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::Numbers;

    #[test]
    fn numbers_count_loss_duplicates_and_reordering_exactly() {
        let mut n = Numbers::default();
        // 0 1 3 2 3 5, and one without a number: 4 is lost, 3 is duplicated, 2 is late.
        for seq in [0, 1, 3, 2, 3, 5] {
            n.see(Some(seq));
        }
        n.see(None);
        n.see(Some(u64::MAX));
        assert_eq!(n.unique, 5);
        assert_eq!(n.duplicates, 1);
        assert_eq!(n.reordered, 1);
        assert_eq!(n.unnumbered, 2);
        // A duplicate does not hide a loss: 6 expected, 5 distinct seen.
        assert_eq!(6 - n.unique, 1);
    }
}
