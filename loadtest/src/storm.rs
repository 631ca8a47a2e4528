//! The `storm` scenario: C clients behind one URL (the load balancer of a cluster), each
//! on its own `user:` channel or on one of K shared channels, while numbered messages
//! are published at a steady rate to every channel. One edge is drained (SIGTERM), later
//! another is killed (SIGKILL); every client reconnects as the fanout browser SDK does
//! ([`Policy`]), resubscribes with `since` = the last position it processed, and must get
//! `recovered: true` and every message it missed.
//!
//! Per event: how long each affected client took from its disconnect to being
//! subscribed again *and* caught up with the newest message published on its channel
//! before that subscription was confirmed; messages lost, duplicates the SDK would have
//! delivered, raw duplicate frames, `recovered: false` resets, and the connect rate the
//! surviving edges saw (successful connections per 100 ms window, from the clients'
//! side: each `connected` frame names its node).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use fastwebsockets::{Frame, OpCode, Payload};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::client::{self, now_us, Numbers, Target, Ws};
use crate::publish::{message, Sink};
use crate::report::{Report, Sample, StormPlot};
use crate::{Common, PublishOpts};

#[derive(Args, Clone)]
pub struct StormOpts {
    /// Put client i on one of K shared channels (`loadtest:storm-<run>-<i mod K>`)
    /// instead of its own `user:` channel.
    #[arg(long)]
    pub shared: Option<usize>,
    /// PID of an edge to drain (SIGTERM) at --drain-at; it must be a fanout-edge.
    #[arg(long)]
    pub drain_pid: Option<u32>,
    /// PID of an edge to kill (SIGKILL) at --kill-at; it must be a fanout-edge.
    #[arg(long)]
    pub kill_pid: Option<u32>,
    /// Seconds after publishing started when --drain-pid is drained.
    #[arg(long, default_value_t = 5.0)]
    pub drain_at: f64,
    /// Seconds after publishing started when --kill-pid is killed.
    #[arg(long, default_value_t = 15.0)]
    pub kill_at: f64,
    /// Reconnect on fixed delays (250 ms × 2^attempt, capped at 10 s; after 1001 at
    /// once) instead of the SDK's full jitter, for comparison.
    #[arg(long)]
    pub no_jitter: bool,
}

impl StormOpts {
    pub fn check(&self, common: &Common) -> anyhow::Result<()> {
        let duration = common.duration as f64;
        for (name, at, pid) in [
            ("--drain-at", self.drain_at, self.drain_pid),
            ("--kill-at", self.kill_at, self.kill_pid),
        ] {
            if pid.is_some() && !(at >= 0.0 && at < duration) {
                bail!("{name} must be within the publishing time (0..{duration} s)");
            }
        }
        if let (Some(a), Some(b)) = (self.drain_pid, self.kill_pid) {
            if a == b {
                bail!("--drain-pid and --kill-pid must be different edges");
            }
        }
        if let Some(k) = self.shared {
            if k == 0 || k > common.clients {
                bail!("--shared must be 1..=--clients");
            }
        }
        for pid in [self.drain_pid, self.kill_pid].into_iter().flatten() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .with_context(|| format!("no process {pid}"))?;
            if !String::from_utf8_lossy(&cmdline).contains("fanout-edge") {
                bail!("process {pid} is not a fanout-edge; refusing to signal it");
            }
        }
        Ok(())
    }
}

/// The SDK's reconnect policy: full-jitter exponential backoff
/// `random(0, min(max, min × 2^attempt))`; after 1001 (a drain) a random 0–1 s; some
/// codes stop. Without jitter: `min(max, min × 2^attempt)`, and after 1001 at once.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub jitter: bool,
    pub min: Duration,
    pub max: Duration,
}

/// What a client does after its connection ended (or an attempt failed).
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Wait this long, then reconnect; `backoff` when it counts as an attempt.
    Retry {
        after: Duration,
        backoff: bool,
    },
    Stop,
}

impl Policy {
    pub const SDK: Policy = Policy {
        jitter: true,
        min: Duration::from_millis(250),
        max: Duration::from_secs(10),
    };

    /// The ceiling of attempt `attempt` (0-based).
    fn ceiling(&self, attempt: u32) -> Duration {
        self.min
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max)
    }

    /// After a close with `code` (`None`: no close frame — 1006, an abrupt EOF, or an
    /// attempt that failed before the upgrade), at backoff attempt `attempt`.
    pub fn next(&self, code: Option<u16>, attempt: u32, rng: &mut impl Rng) -> Next {
        match code {
            Some(1001) => Next::Retry {
                after: if self.jitter {
                    Duration::from_secs_f64(rng.random_range(0.0..1.0))
                } else {
                    Duration::ZERO
                },
                backoff: false,
            },
            // Stop: disconnected by an administrator, Origin refused, forbidden, and
            // client bugs (a protocol violation, bad UTF-8, a message too large).
            Some(4010 | 1008 | 4003 | 1002 | 1007 | 1009) => Next::Stop,
            // 1006 / EOF, 1011, 1013, 4008, 4009, and anything else (4001, 4004: a
            // fresh token is what this client already has): back off.
            _ => {
                let ceiling = self.ceiling(attempt);
                Next::Retry {
                    after: if self.jitter {
                        ceiling.mul_f64(rng.random_range(0.0..1.0))
                    } else {
                        ceiling
                    },
                    backoff: true,
                }
            }
        }
    }
}

/// Longest one attempt (connect, upgrade, subscribe) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connection attempts one client makes in a run.
const MAX_ATTEMPTS: u32 = 200;
/// Width of a connect-rate window.
const WINDOW: Duration = Duration::from_millis(100);
/// Most distinct nodes told apart in the timeline.
const MAX_NODES: usize = 8;

/// A position: offset and epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct Position {
    pub offset: u64,
    pub epoch: String,
}

/// What the SDK keeps per channel: the position of the last message it delivered to the
/// application (or of `subscribed`, before any), and it drops a message at or below it.
#[derive(Default, Debug)]
pub struct Sdk {
    pub position: Option<Position>,
    /// Seqs delivered to the application: a second delivery is an application duplicate.
    pub app: Numbers,
    /// Every numbered frame received: a second one is a raw duplicate frame.
    pub raw: Numbers,
    /// Messages dropped by offset (already processed).
    pub dropped: u64,
    /// `recovered: false` (solicited or not): the application reloads.
    pub resets: u64,
    pub recovered: u64,
    /// The lowest seq not delivered yet (all below it were).
    pub contiguous: u64,
}

impl Sdk {
    /// A `subscribed` frame: `since` is what was asked (`None` on a first subscribe).
    pub fn subscribed(&mut self, asked: bool, recovered: Option<bool>, pos: Option<Position>) {
        match recovered {
            Some(true) => self.recovered += 1,
            Some(false) => {
                self.resets += 1;
                self.position = pos;
            }
            // A first subscribe: the position to recover from later.
            None if !asked || self.position.is_none() => self.position = pos,
            None => {}
        }
    }

    /// A message frame; returns whether the application got it.
    pub fn message(&mut self, seq: Option<u64>, pos: Option<Position>) -> bool {
        self.raw.see(seq);
        if let (Some(p), Some(last)) = (&pos, &self.position) {
            if p.epoch == last.epoch && p.offset <= last.offset {
                self.dropped += 1;
                return false;
            }
        }
        if pos.is_some() {
            self.position = pos;
        }
        self.app.see(seq);
        if let Some(s) = seq {
            if s == self.contiguous {
                self.contiguous += 1;
                while self.app.has(self.contiguous) {
                    self.contiguous += 1;
                }
            }
        }
        true
    }
}

/// One outage of one client: from the disconnect to subscribed and caught up.
#[derive(Clone, Debug)]
struct Outage {
    /// Index into the run's events (0: before any event).
    event: usize,
    start: Instant,
    /// The node the client was connected to.
    node: Option<usize>,
    attempts: u32,
    /// When the attempt that succeeded started (its connect).
    last_attempt: Option<Instant>,
    /// When that attempt's TCP connection was established.
    tcp: Option<Instant>,
    /// When that attempt's upgrade completed.
    upgraded: Option<Instant>,
    subscribed: Option<Instant>,
    end: Option<Instant>,
}

/// What every client shares.
struct Ctx {
    target: Target,
    channels: Vec<String>,
    /// Messages acknowledged so far per channel (seqs 0..n).
    published: Vec<AtomicU64>,
    /// Per client: the lowest seq it has not been delivered yet.
    contiguous: Vec<AtomicU64>,
    /// Per client: in an outage now.
    down: Vec<AtomicBool>,
    policy: Policy,
    stop: CancellationToken,
    gate: Semaphore,
    subscribed_once: AtomicUsize,
    /// Events fired so far (clients tag an outage with the latest).
    events_fired: AtomicUsize,
    t0: Instant,
    timeline: Timeline,
}

/// Counts per 100 ms window since the start of the run.
struct Timeline {
    upgrades: Vec<AtomicU32>,
    subscribed: Vec<AtomicU32>,
    /// Per node slot: `connected` frames naming it.
    connected: Vec<Vec<AtomicU32>>,
    nodes: Mutex<Vec<String>>,
}

impl Timeline {
    fn new(windows: usize) -> Timeline {
        let v = || (0..windows).map(|_| AtomicU32::new(0)).collect::<Vec<_>>();
        Timeline {
            upgrades: v(),
            subscribed: v(),
            connected: (0..MAX_NODES).map(|_| v()).collect(),
            nodes: Mutex::new(Vec::new()),
        }
    }

    fn window(t0: Instant, at: Instant) -> usize {
        (at.saturating_duration_since(t0).as_millis() / WINDOW.as_millis()) as usize
    }

    fn bump(series: &[AtomicU32], w: usize) {
        if let Some(c) = series.get(w) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The slot of node `name` (a new one if there is room).
    fn node(&self, name: &str) -> Option<usize> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = nodes.iter().position(|n| n == name) {
            return Some(i);
        }
        if nodes.len() < MAX_NODES {
            nodes.push(name.to_string());
            return Some(nodes.len() - 1);
        }
        None
    }
}

/// One client's own state, returned when it stops.
#[derive(Default)]
struct ClientRun {
    sdk: Sdk,
    node: Option<usize>,
    outages: Vec<Outage>,
    current: Option<Outage>,
    /// Caught up once this seq is delivered (`None`: not waiting).
    target: Option<u64>,
    attempts: u64,
    failed_attempts: u64,
    closes: BTreeMap<String, u64>,
    /// Failed attempts by event index and how they failed.
    failures: BTreeMap<(usize, String), u64>,
    /// Application duplicates and resets per event index.
    dup_by_event: BTreeMap<usize, u64>,
    resets_by_event: BTreeMap<usize, u64>,
    gave_up: Option<String>,
    first_error: Option<String>,
}

/// How a connection (or an attempt) ended.
enum Ended {
    /// Told to stop.
    Stopped,
    /// A close frame with this code, or none.
    Closed(Option<u16>, String),
}

#[derive(Deserialize)]
struct In<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    node: Option<&'a str>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default, borrow)]
    epoch: Option<&'a str>,
    #[serde(default)]
    recovered: Option<bool>,
    #[serde(default)]
    data: Option<InData>,
    #[serde(default, borrow)]
    code: Option<&'a str>,
}

#[derive(Deserialize)]
struct InData {
    #[serde(default)]
    seq: Option<u64>,
}

fn position(f: &In<'_>) -> Option<Position> {
    Some(Position {
        offset: f.offset?,
        epoch: f.epoch?.to_string(),
    })
}

/// Answers the server's close frame with its code, as a browser does (best effort: the
/// server may be gone).
async fn answer_close(ws: &mut Ws, code: Option<u16>) {
    let frame = match code {
        Some(c) => Frame::close(c, b""),
        None => Frame::close_raw(Vec::new().into()),
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.write_frame(frame)).await;
}

fn close_code(payload: &[u8]) -> (Option<u16>, String) {
    if payload.len() >= 2 {
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        (
            Some(code),
            format!("{code} {}", String::from_utf8_lossy(&payload[2..])),
        )
    } else {
        (None, "close without a code".into())
    }
}

impl ClientRun {
    fn event_now(ctx: &Ctx) -> usize {
        ctx.events_fired.load(Ordering::Acquire)
    }

    /// The connection was lost (or never made): an outage starts unless one is under way.
    fn disconnected(&mut self, ctx: &Ctx, i: usize, at: Instant) {
        if self.current.is_none() {
            self.current = Some(Outage {
                event: Self::event_now(ctx),
                start: at,
                node: self.node,
                attempts: 0,
                last_attempt: None,
                tcp: None,
                upgraded: None,
                subscribed: None,
                end: None,
            });
            ctx.down[i].store(true, Ordering::Release);
        }
        self.target = None;
    }

    fn caught_up(&mut self, ctx: &Ctx, i: usize, at: Instant) {
        self.target = None;
        if let Some(mut o) = self.current.take() {
            o.end = Some(at);
            self.outages.push(o);
        }
        ctx.down[i].store(false, Ordering::Release);
    }

    fn publish_contiguous(&self, ctx: &Ctx, i: usize) {
        ctx.contiguous[i].store(self.sdk.contiguous, Ordering::Release);
    }

    /// One frame of a live connection.
    fn frame(&mut self, ctx: &Ctx, i: usize, payload: &[u8]) {
        let Ok(f) = serde_json::from_slice::<In<'_>>(payload) else {
            return;
        };
        match f.kind {
            "message" => {
                let seq = f.data.as_ref().and_then(|d| d.seq);
                let before = self.sdk.app.duplicates;
                self.sdk.message(seq, position(&f));
                if self.sdk.app.duplicates > before {
                    *self.dup_by_event.entry(Self::event_now(ctx)).or_default() += 1;
                }
                self.publish_contiguous(ctx, i);
                if let Some(t) = self.target {
                    if self.sdk.contiguous >= t {
                        self.caught_up(ctx, i, Instant::now());
                    }
                }
            }
            // Unsolicited: a position reset (history lost); reload and go on.
            "subscribed" => {
                if f.recovered == Some(false) {
                    *self
                        .resets_by_event
                        .entry(Self::event_now(ctx))
                        .or_default() += 1;
                }
                self.sdk.subscribed(true, f.recovered, position(&f));
            }
            "error" => {
                self.first_error
                    .get_or_insert(format!("error frame: {}", f.code.unwrap_or("?")));
            }
            _ => {}
        }
    }

    /// Connects, subscribes (with `since` when it has a position) and waits for
    /// `subscribed`; returns the socket, or how the attempt ended.
    async fn open(&mut self, ctx: &Ctx, i: usize, ch: usize, token: &str) -> Result<Ws, Ended> {
        let channel = &ctx.channels[ch];
        let stream = match ctx.target.tcp(i).await {
            Ok(s) => s,
            Err(e) => return Err(Ended::Closed(None, format!("connect: {e:#}"))),
        };
        if let Some(o) = self.current.as_mut() {
            o.tcp = Some(Instant::now());
        }
        let mut ws = match ctx.target.upgrade(stream, token, false).await {
            Ok(ws) => ws,
            Err(e) => return Err(Ended::Closed(None, format!("upgrade: {e:#}"))),
        };
        let upgraded = Instant::now();
        Timeline::bump(&ctx.timeline.upgrades, Timeline::window(ctx.t0, upgraded));
        if let Some(o) = self.current.as_mut() {
            o.upgraded = Some(upgraded);
        }
        let asked = self.sdk.position.is_some();
        let mut sub = json!({"type": "subscribe", "id": 1, "channel": channel});
        if let Some(p) = &self.sdk.position {
            sub["since"] = json!({"offset": p.offset, "epoch": p.epoch});
        }
        if let Err(e) = ws
            .write_frame(Frame::text(Payload::Owned(sub.to_string().into_bytes())))
            .await
        {
            // Refused right after the upgrade (a draining node): its close frame may
            // have arrived already and tells why.
            let code = tokio::time::timeout(Duration::from_secs(1), async {
                loop {
                    match ws.read_frame().await {
                        Ok(f) if f.opcode == OpCode::Close => return Some(close_code(&f.payload)),
                        Ok(_) => {}
                        Err(_) => return None,
                    }
                }
            })
            .await
            .ok()
            .flatten();
            return Err(match code {
                Some((code, text)) => Ended::Closed(code, format!("before subscribed: {text}")),
                None => Ended::Closed(None, format!("send subscribe: {e}")),
            });
        }
        loop {
            let frame = match ws.read_frame().await {
                Ok(f) => f,
                Err(e) => return Err(Ended::Closed(None, format!("before subscribed: {e}"))),
            };
            match frame.opcode {
                OpCode::Text => {
                    let Ok(f) = serde_json::from_slice::<In<'_>>(&frame.payload) else {
                        continue;
                    };
                    match f.kind {
                        "connected" => {
                            let now = Instant::now();
                            self.node = f.node.and_then(|n| ctx.timeline.node(n));
                            if let Some(n) = self.node {
                                Timeline::bump(
                                    &ctx.timeline.connected[n],
                                    Timeline::window(ctx.t0, now),
                                );
                            }
                        }
                        "subscribed" => {
                            let now = Instant::now();
                            Timeline::bump(&ctx.timeline.subscribed, Timeline::window(ctx.t0, now));
                            if f.recovered == Some(false) {
                                *self
                                    .resets_by_event
                                    .entry(Self::event_now(ctx))
                                    .or_default() += 1;
                            }
                            self.sdk.subscribed(asked, f.recovered, position(&f));
                            // The newest message published before now must arrive.
                            let newest = ctx.published[ch].load(Ordering::Acquire);
                            if let Some(o) = self.current.as_mut() {
                                o.subscribed = Some(now);
                            }
                            // After a reset the application reloads: nothing to catch up.
                            if self.sdk.contiguous >= newest || f.recovered == Some(false) {
                                self.caught_up(ctx, i, now);
                            } else {
                                self.target = Some(newest);
                            }
                            return Ok(ws);
                        }
                        "error" => {
                            let msg = format!(
                                "subscribe refused: {}",
                                String::from_utf8_lossy(&frame.payload)
                            );
                            let _ = ws.write_frame(Frame::close(1000, b"")).await;
                            return Err(Ended::Closed(None, msg));
                        }
                        _ => {}
                    }
                }
                OpCode::Close => {
                    let (code, text) = close_code(&frame.payload);
                    answer_close(&mut ws, code).await;
                    return Err(Ended::Closed(code, format!("before subscribed: {text}")));
                }
                _ => {}
            }
        }
    }

    /// Reads a live connection until it ends or the run stops.
    async fn live(&mut self, ctx: &Ctx, i: usize, mut ws: Ws) -> Ended {
        loop {
            let frame = tokio::select! {
                biased;
                _ = ctx.stop.cancelled() => {
                    let _ = ws.write_frame(Frame::close(1000, b"")).await;
                    return Ended::Stopped;
                }
                f = ws.read_frame() => f,
            };
            match frame {
                Err(e) => return Ended::Closed(None, format!("abrupt: {e}")),
                Ok(frame) => match frame.opcode {
                    OpCode::Text => self.frame(ctx, i, &frame.payload),
                    OpCode::Close => {
                        let (code, text) = close_code(&frame.payload);
                        answer_close(&mut ws, code).await;
                        return Ended::Closed(code, text);
                    }
                    _ => {}
                },
            }
        }
    }
}

/// A failed attempt's reason without what differs between clients (numbers in it).
fn failure_kind(why: &str) -> String {
    let kind: String = why
        .chars()
        .take(80)
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect();
    kind.replace("###", "#").replace("##", "#")
}

fn close_key(code: Option<u16>) -> String {
    code.map_or_else(|| "none (1006)".to_string(), |c| c.to_string())
}

/// One client, for the whole run: connects, reads, and reconnects by the policy.
async fn client_task(ctx: Arc<Ctx>, i: usize, ch: usize, token: String) -> ClientRun {
    let mut run = ClientRun::default();
    let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
    let mut attempt = 0u32;
    let mut first = true;
    let mut delay = Duration::ZERO;
    for _ in 0..MAX_ATTEMPTS {
        if !delay.is_zero() {
            tokio::select! {
                _ = ctx.stop.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        if ctx.stop.is_cancelled() {
            break;
        }
        run.attempts += 1;
        if let Some(o) = run.current.as_mut() {
            o.attempts += 1;
            o.last_attempt = Some(Instant::now());
        }
        // The first connection waits its turn (the fleet connects at a bounded
        // concurrency); reconnects go at once, as independent browsers would.
        let permit = if first {
            Some(ctx.gate.acquire().await.expect("semaphore open"))
        } else {
            None
        };
        let opened = tokio::select! {
            _ = ctx.stop.cancelled() => break,
            r = tokio::time::timeout(ATTEMPT_TIMEOUT, run.open(&ctx, i, ch, &token)) => r,
        };
        drop(permit);
        let ended = match opened {
            Ok(Ok(ws)) => {
                if first {
                    ctx.subscribed_once.fetch_add(1, Ordering::AcqRel);
                    first = false;
                }
                attempt = 0;
                run.publish_contiguous(&ctx, i);
                let ended = run.live(&ctx, i, ws).await;
                if let Ended::Closed(code, _) = &ended {
                    *run.closes.entry(close_key(*code)).or_default() += 1;
                    run.disconnected(&ctx, i, Instant::now());
                }
                ended
            }
            Ok(Err(ended)) => {
                run.failed_attempts += 1;
                if let Ended::Closed(_, why) = &ended {
                    let key = (ClientRun::event_now(&ctx), failure_kind(why));
                    *run.failures.entry(key).or_default() += 1;
                }
                if !first {
                    run.disconnected(&ctx, i, Instant::now());
                }
                ended
            }
            Err(_) => {
                run.failed_attempts += 1;
                let key = (ClientRun::event_now(&ctx), "attempt timed out".to_string());
                *run.failures.entry(key).or_default() += 1;
                if !first {
                    run.disconnected(&ctx, i, Instant::now());
                }
                Ended::Closed(None, format!("attempt took over {ATTEMPT_TIMEOUT:?}"))
            }
        };
        match ended {
            Ended::Stopped => break,
            Ended::Closed(code, why) => match ctx.policy.next(code, attempt, &mut rng) {
                Next::Stop => {
                    run.gave_up = Some(why);
                    break;
                }
                Next::Retry { after, backoff } => {
                    if first {
                        run.first_error.get_or_insert(why);
                    }
                    if backoff {
                        attempt = attempt.saturating_add(1);
                    }
                    delay = after;
                }
            },
        }
    }
    run
}

/// Sends `signal` to `pid`.
fn signal(pid: u32, signal: libc::c_int) -> anyhow::Result<()> {
    // SAFETY: kill(2) with a pid checked to be a fanout-edge at the start of the run.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("signal {pid}"));
    }
    Ok(())
}

fn percentiles_ms(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    let ms = |v: u64| v as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50": ms(h.value_at_quantile(0.5)),
        "p90": ms(h.value_at_quantile(0.9)),
        "p99": ms(h.value_at_quantile(0.99)),
        "max": ms(h.max()),
    })
}

struct Event {
    name: &'static str,
    pid: u32,
    at: Instant,
}

pub async fn storm(common: Common, opts: PublishOpts, storm: StormOpts) -> anyhow::Result<Report> {
    let target = Target::resolve(&common.url, common.sources).await?;
    let sink = Arc::new(Sink::open(&opts).await?);
    let n = common.clients;
    // A fresh run id: no earlier run's history or position is replayed.
    let run_id: u32 = rand::random();
    let (channels, grants): (Vec<String>, Vec<String>) = match storm.shared {
        Some(k) => (
            (0..k)
                .map(|c| format!("loadtest:storm-{run_id:08x}-{c}"))
                .collect(),
            vec!["loadtest:*".to_string()],
        ),
        None => (
            (0..n).map(|i| format!("user:st{run_id:08x}-{i}")).collect(),
            vec![],
        ),
    };
    let n_ch = channels.len();
    let chan_of = move |i: usize| i % n_ch;
    let policy = Policy {
        jitter: !storm.no_jitter,
        ..Policy::SDK
    };
    let windows = ((common.deadline().as_secs() + 60) * 1000 / WINDOW.as_millis() as u64) as usize;
    let t0 = Instant::now();
    let ctx = Arc::new(Ctx {
        target,
        published: (0..channels.len()).map(|_| AtomicU64::new(0)).collect(),
        channels,
        contiguous: (0..n).map(|_| AtomicU64::new(0)).collect(),
        down: (0..n).map(|_| AtomicBool::new(false)).collect(),
        policy,
        stop: CancellationToken::new(),
        gate: Semaphore::new(common.connect_concurrency.max(1)),
        subscribed_once: AtomicUsize::new(0),
        events_fired: AtomicUsize::new(0),
        t0,
        timeline: Timeline::new(windows),
    });
    let mut sample = Sample::start(&common.server_pids);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let sub = format!("st{run_id:08x}-{i}");
        let token = client::token(&common.jwt_secret, &sub, &grants);
        tasks.push(tokio::spawn(client_task(ctx.clone(), i, chan_of(i), token)));
    }
    // Everyone subscribed once, within a bound.
    let connect_by = Instant::now() + Duration::from_secs(60 + n as u64 / 500);
    while ctx.subscribed_once.load(Ordering::Acquire) < n {
        if Instant::now() > connect_by {
            ctx.stop.cancel();
            bail!(
                "only {} of {n} clients subscribed within {:?}",
                ctx.subscribed_once.load(Ordering::Acquire),
                connect_by - t0
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect_time = t0.elapsed();
    eprintln!("{n} clients connected and subscribed in {connect_time:.2?}");
    sample.connected(n);

    // Publishers: each owns every P-th channel (one channel's messages stay in order)
    // and goes round its channels at its share of the rate.
    let publishers = 4.min(n_ch);
    let per = opts.rate as f64 / publishers as f64;
    let total = opts.rate as u64 * common.duration;
    let pad = Arc::new("x".repeat(opts.payload));
    let errors = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let t_start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..publishers {
        let (sink, ctx, pad, errors) = (sink.clone(), ctx.clone(), pad.clone(), errors.clone());
        let mine = (total / publishers as u64) + u64::from((w as u64) < total % publishers as u64);
        let owned = (n_ch - w).div_ceil(publishers);
        workers.push(tokio::spawn(async move {
            for k in 0..mine {
                let due = start + Duration::from_secs_f64(k as f64 / per);
                tokio::time::sleep_until(due).await;
                let c = w + publishers * (k as usize % owned);
                let seq = ctx.published[c].load(Ordering::Relaxed);
                let data = message(seq, now_us(), &pad, "");
                match sink.publish(&ctx.channels[c], None, &data).await {
                    Ok(()) => {
                        ctx.published[c].fetch_add(1, Ordering::AcqRel);
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("publish to {} failed: {e:#}", ctx.channels[c]);
                        }
                        return;
                    }
                }
            }
        }));
    }
    // The events, on their own clock.
    let mut planned: Vec<(f64, &'static str, u32, libc::c_int)> = Vec::new();
    if let Some(pid) = storm.drain_pid {
        planned.push((storm.drain_at, "drain", pid, libc::SIGTERM));
    }
    if let Some(pid) = storm.kill_pid {
        planned.push((storm.kill_at, "kill", pid, libc::SIGKILL));
    }
    planned.sort_by(|a, b| a.0.total_cmp(&b.0));
    let events: Arc<Mutex<Vec<Event>>> = Arc::new(Mutex::new(Vec::new()));
    let driver = {
        let (ctx, events) = (ctx.clone(), events.clone());
        tokio::spawn(async move {
            for (at, name, pid, sig) in planned {
                tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
                events
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Event {
                        name,
                        pid,
                        at: Instant::now(),
                    });
                // Counted before the signal: every disconnect it causes is tagged with it.
                ctx.events_fired.fetch_add(1, Ordering::AcqRel);
                eprintln!("{name}: signal {sig} to {pid} at T+{at} s");
                signal(pid, sig)?;
            }
            anyhow::Ok(())
        })
    };
    for w in workers {
        w.await?;
    }
    driver.await??;
    let publish_time = t_start.elapsed();
    let final_counts: Vec<u64> = ctx
        .published
        .iter()
        .map(|p| p.load(Ordering::Acquire))
        .collect();
    let published: u64 = final_counts.iter().sum();

    // Every client caught up with the last message of its channel and connected, or
    // the grace period is over.
    let grace_by = Instant::now() + Duration::from_secs(common.grace);
    let caught_up = |ctx: &Ctx| {
        (0..n)
            .filter(|&i| {
                ctx.contiguous[i].load(Ordering::Acquire) >= final_counts[chan_of(i)]
                    && !ctx.down[i].load(Ordering::Acquire)
            })
            .count()
    };
    while caught_up(&ctx) < n && Instant::now() < grace_by {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ended = Instant::now();
    let caught = caught_up(&ctx);
    ctx.stop.cancel();
    sample.finished();
    let mut runs = Vec::with_capacity(n);
    let collect_by = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut unfinished = 0;
    for task in tasks {
        let abort = task.abort_handle();
        match tokio::time::timeout_at(collect_by, task).await {
            Ok(Ok(r)) => runs.push(Some(r)),
            _ => {
                abort.abort();
                unfinished += 1;
                runs.push(None);
            }
        }
    }

    let events = std::mem::take(&mut *events.lock().unwrap_or_else(|e| e.into_inner()));
    let nodes = ctx
        .timeline
        .nodes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let node_name = |n: Option<usize>| {
        n.and_then(|n| nodes.get(n).cloned())
            .unwrap_or_else(|| "?".into())
    };
    // Totals.
    let (mut lost, mut app_dup, mut raw_dup, mut dropped, mut resets, mut recovered) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut attempts, mut failed) = (0u64, 0u64);
    let mut closes: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut gave_up = Vec::new();
    let mut errors_seen = Vec::new();
    let mut short = 0;
    for (i, r) in runs.iter().enumerate() {
        let Some(r) = r else { continue };
        let want = final_counts[chan_of(i)];
        let got = (0..want).filter(|s| r.sdk.app.has(*s)).count() as u64;
        lost += want - got;
        if got < want {
            short += 1;
        }
        app_dup += r.sdk.app.duplicates + r.sdk.app.unnumbered;
        raw_dup += r.sdk.raw.duplicates;
        dropped += r.sdk.dropped;
        resets += r.sdk.resets;
        recovered += r.sdk.recovered;
        attempts += r.attempts;
        failed += r.failed_attempts;
        for (k, v) in &r.closes {
            *closes.entry(k.clone()).or_default() += v;
        }
        for ((_, k), v) in &r.failures {
            *failures.entry(k.clone()).or_default() += v;
        }
        if let Some(g) = &r.gave_up {
            if gave_up.len() < 5 {
                gave_up.push(g.clone());
            }
        }
        if let Some(e) = &r.first_error {
            if errors_seen.len() < 5 {
                errors_seen.push(e.clone());
            }
        }
    }
    let gave_up_count = runs
        .iter()
        .flatten()
        .filter(|r| r.gave_up.is_some())
        .count();

    // Per event: its outages, from the event until the next one (or the end).
    let ends: Vec<Instant> = events.iter().skip(1).map(|e| e.at).chain([ended]).collect();
    let mut plot = StormPlot {
        window_ms: WINDOW.as_millis() as u64,
        start_offset_s: t_start.duration_since(t0).as_secs_f64(),
        connected: Vec::new(),
        upgrades: Vec::new(),
        events: Vec::new(),
        reconnect: Vec::new(),
    };
    let last_window = Timeline::window(t0, ended) + 1;
    let series = |s: &[AtomicU32]| -> Vec<u32> {
        s.iter()
            .take(last_window)
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    };
    for (k, name) in nodes.iter().enumerate() {
        plot.connected
            .push((name.clone(), series(&ctx.timeline.connected[k])));
    }
    // By name, so that a node has the same colour in every run.
    plot.connected.sort_by(|a, b| a.0.cmp(&b.0));
    plot.upgrades = series(&ctx.timeline.upgrades);
    let mut event_json = Vec::new();
    for (e, ev) in events.iter().enumerate() {
        let idx = e + 1;
        let mut h = client::histogram();
        let mut to_sub = client::histogram();
        let mut served = client::histogram();
        let mut upgrade = client::histogram();
        let mut tcp = client::histogram();
        let mut affected = 0u64;
        let mut unrecovered = 0u64;
        let mut left: BTreeMap<String, u64> = BTreeMap::new();
        let mut event_attempts = 0u64;
        let (mut dups, mut rs) = (0u64, 0u64);
        let mut failed_kinds: BTreeMap<String, u64> = BTreeMap::new();
        for r in runs.iter().flatten() {
            let mine: Vec<&Outage> = r
                .outages
                .iter()
                .chain(r.current.as_ref())
                .filter(|o| o.event == idx)
                .collect();
            if !mine.is_empty() {
                affected += 1;
            }
            for o in mine {
                *left.entry(node_name(o.node)).or_default() += 1;
                event_attempts += u64::from(o.attempts);
                match o.end {
                    Some(end) => {
                        let _ = h.record(end.duration_since(o.start).as_micros().max(1) as u64);
                    }
                    None => unrecovered += 1,
                }
                if let Some(s) = o.subscribed {
                    let _ = to_sub.record(s.duration_since(o.start).as_micros().max(1) as u64);
                    if let Some(a) = o.last_attempt {
                        let _ = served.record(s.duration_since(a).as_micros().max(1) as u64);
                        if let Some(t) = o.tcp {
                            let _ = tcp.record(t.duration_since(a).as_micros().max(1) as u64);
                        }
                        if let Some(u) = o.upgraded {
                            let _ = upgrade.record(u.duration_since(a).as_micros().max(1) as u64);
                        }
                    }
                }
            }
            for ((e, k), v) in &r.failures {
                if *e == idx {
                    *failed_kinds.entry(k.clone()).or_default() += v;
                }
            }
            dups += r.dup_by_event.get(&idx).copied().unwrap_or(0);
            rs += r.resets_by_event.get(&idx).copied().unwrap_or(0);
        }
        // The connect rate in the event's span: all edges together, and the busiest one.
        let (w0, w1) = (
            Timeline::window(t0, ev.at),
            Timeline::window(t0, ends[e]) + 1,
        );
        let span = |s: &[u32]| s.get(w0..w1.min(s.len())).unwrap_or(&[]).to_vec();
        let mut sum = vec![0u32; w1.saturating_sub(w0)];
        let mut per_node = serde_json::Map::new();
        for (name, s) in &plot.connected {
            let s = span(s);
            for (k, v) in s.iter().enumerate() {
                if let Some(t) = sum.get_mut(k) {
                    *t += v;
                }
            }
            per_node.insert(name.clone(), json!(s.iter().max().copied().unwrap_or(0)));
        }
        let upgrades_peak = span(&plot.upgrades).iter().max().copied().unwrap_or(0);
        event_json.push(json!({
            "event": ev.name,
            "pid": ev.pid,
            "at_seconds": ev.at.duration_since(t_start).as_secs_f64(),
            "clients_affected": affected,
            "left_nodes": left,
            "reconnect_ms": percentiles_ms(&h),
            "to_subscribed_ms": percentiles_ms(&to_sub),
            "last_attempt_connect_to_subscribed_ms": percentiles_ms(&served),
            "last_attempt_connect_to_upgraded_ms": percentiles_ms(&upgrade),
            "last_attempt_tcp_connect_ms": percentiles_ms(&tcp),
            "unrecovered": unrecovered,
            "attempts": event_attempts,
            "failed_attempts_by_kind": failed_kinds,
            "app_duplicates": dups,
            "resets": rs,
            "peak_connects_per_100ms": sum.iter().max().copied().unwrap_or(0),
            "peak_connects_per_100ms_by_node": per_node,
            "peak_upgrades_per_100ms": upgrades_peak,
        }));
        plot.events
            .push((ev.name.to_string(), ev.at.duration_since(t0).as_secs_f64()));
        plot.reconnect.push((ev.name.to_string(), h));
    }
    // Outages that no event explains (before the first one).
    let stray = runs
        .iter()
        .flatten()
        .flat_map(|r| r.outages.iter().chain(r.current.as_ref()))
        .filter(|o| o.event == 0)
        .count();

    let j = json!({
        "channels": if storm.shared.is_some() { "shared" } else { "user:<i> (one per client)" },
        "channel_count": n_ch,
        "jitter": policy.jitter,
        "reconnect_policy": if policy.jitter {
            "full jitter: random(0, min(10 s, 250 ms × 2^attempt)); 1001: random 0–1 s"
        } else {
            "fixed: min(10 s, 250 ms × 2^attempt); 1001: at once"
        },
        "rate_per_second": opts.rate,
        "payload_bytes": opts.payload,
        "publishers": publishers,
        "published": published,
        "publish_errors": errors.load(Ordering::Relaxed),
        "publish_seconds": publish_time.as_secs_f64(),
        "expected_deliveries": (0..n).map(|i| final_counts[chan_of(i)]).sum::<u64>(),
        "lost": lost,
        "clients_short": short,
        "app_duplicates": app_dup,
        "raw_duplicate_frames": raw_dup,
        "dropped_by_offset": dropped,
        "resets": resets,
        "recovered": recovered,
        "caught_up_at_end": caught,
        "clients_unfinished": unfinished,
        "clients_gave_up": gave_up_count,
        "gave_up_reasons": gave_up,
        "attempts": attempts,
        "failed_attempts": failed,
        "closes_by_code": closes,
        "failed_attempts_by_kind": failures,
        "outages_before_any_event": stray,
        "events": event_json,
        "nodes": nodes,
        "client_errors": errors_seen,
    });
    let load = ended.saturating_duration_since(t_start);
    Ok(Report::new("storm", &common, connect_time, j, &sample, None, load).with_storm(plot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_is_the_sdks() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let sdk = Policy::SDK;
        for attempt in 0..12 {
            let ceiling =
                Duration::from_millis(250 * (1u64 << attempt)).min(Duration::from_secs(10));
            for code in [
                None,
                Some(1006),
                Some(1011),
                Some(1013),
                Some(4008),
                Some(4009),
            ] {
                match sdk.next(code, attempt, &mut rng) {
                    Next::Retry { after, backoff } => {
                        assert!(backoff);
                        assert!(after < ceiling, "{after:?} {ceiling:?}");
                    }
                    Next::Stop => panic!("{code:?} stops"),
                }
                let fixed = Policy {
                    jitter: false,
                    ..sdk
                };
                assert_eq!(
                    fixed.next(code, attempt, &mut rng),
                    Next::Retry {
                        after: ceiling,
                        backoff: true
                    }
                );
            }
        }
        match sdk.next(Some(1001), 5, &mut rng) {
            Next::Retry { after, backoff } => {
                assert!(!backoff && after < Duration::from_secs(1));
            }
            Next::Stop => panic!("1001 stops"),
        }
        let fixed = Policy {
            jitter: false,
            ..sdk
        };
        assert_eq!(
            fixed.next(Some(1001), 5, &mut rng),
            Next::Retry {
                after: Duration::ZERO,
                backoff: false
            }
        );
        for code in [4010, 1008, 4003] {
            assert_eq!(sdk.next(Some(code), 0, &mut rng), Next::Stop);
        }
        // Full jitter spreads: not all draws land in one tenth of the range.
        let draws: Vec<Duration> = (0..100)
            .map(|_| match sdk.next(None, 3, &mut rng) {
                Next::Retry { after, .. } => after,
                Next::Stop => unreachable!(),
            })
            .collect();
        assert!(draws.iter().any(|d| *d < Duration::from_millis(500)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(1500)));
    }

    fn pos(offset: u64) -> Option<Position> {
        Some(Position {
            offset,
            epoch: "E".into(),
        })
    }

    #[test]
    fn the_sdk_drops_by_offset_and_counts_what_it_would_deliver_twice() {
        let mut sdk = Sdk::default();
        sdk.subscribed(false, None, pos(0));
        assert!(sdk.message(Some(0), pos(1)));
        assert!(sdk.message(Some(1), pos(2)));
        // Reconnected with since 2: recovered; the replay repeats offset 2 (dropped) and
        // brings 3.
        sdk.subscribed(true, Some(true), pos(3));
        assert_eq!(
            sdk.position,
            pos(2),
            "a recovered subscribe keeps the position"
        );
        assert!(!sdk.message(Some(1), pos(2)));
        assert!(sdk.message(Some(2), pos(3)));
        assert_eq!(
            (sdk.dropped, sdk.raw.duplicates, sdk.app.duplicates),
            (1, 1, 0)
        );
        assert_eq!(sdk.contiguous, 3);
        // A message with a new offset but a seq delivered already: an application
        // duplicate (the server sent it twice under two offsets).
        assert!(sdk.message(Some(2), pos(4)));
        assert_eq!(sdk.app.duplicates, 1);
        // A reset moves the position to what the server gives.
        sdk.subscribed(true, Some(false), pos(10));
        assert_eq!((sdk.resets, sdk.position.clone()), (1, pos(10)));
        // A gap: 4 missing, so contiguous waits at 3 until it arrives.
        assert!(sdk.message(Some(4), pos(11)));
        assert_eq!(sdk.contiguous, 3);
        assert!(sdk.message(Some(3), pos(12)));
        assert_eq!(sdk.contiguous, 5);
    }
}
