//! The scenarios. Each connects its clients, applies its load for `--duration`, waits
//! (bounded) for the last messages, and returns the report.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::{self, now_us, Seen, Shared, Target};
use crate::publish::{message, Sink};
use crate::report::{Report, Sample};
use crate::{transport, Common, PublishOpts, Transport};

pub type Run = Pin<Box<dyn Future<Output = anyhow::Result<Report>> + Send>>;

/// How long one client may take to connect, authenticate and subscribe.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One client to connect: its token's subject and channel patterns, and its channel.
struct Plan {
    sub: String,
    grants: Vec<String>,
    channel: String,
}

/// The connected clients, each reading in its own task.
struct Fleet {
    tasks: Vec<JoinHandle<Seen>>,
    connect_time: Duration,
    stop: CancellationToken,
}

/// Connects and subscribes every planned client over `--transport` (at most
/// `--connect-concurrency` at a time); fails if any of them could not.
async fn connect_all(
    common: &Common,
    target: &Target,
    plans: Vec<Plan>,
    shared: &Arc<Shared>,
) -> anyhow::Result<Fleet> {
    let transport = common.transport;
    if transport == Transport::Sse {
        // A --url with no stream path beside it fails here, once, not in every client.
        target.sse_path()?;
    }
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let stop = CancellationToken::new();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<anyhow::Result<()>>();
    let n = plans.len();
    let mut tasks = Vec::with_capacity(n);
    for (i, plan) in plans.into_iter().enumerate() {
        let token = client::token(&common.jwt_secret, &plan.sub, &plan.grants);
        let (target, gate, shared, stop, ready) = (
            target.clone(),
            gate.clone(),
            shared.clone(),
            stop.clone(),
            ready_tx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("semaphore open");
            let opened = tokio::time::timeout(
                CONNECT_TIMEOUT,
                transport::open(&target, transport, i, &token, &plan.channel),
            )
            .await
            .unwrap_or_else(|_| Err(anyhow!("no subscription within {CONNECT_TIMEOUT:?}")));
            drop(permit);
            match opened {
                Ok(client) => {
                    let _ = ready.send(Ok(()));
                    client.receive(i, shared, stop).await
                }
                Err(e) => {
                    let seen = Seen {
                        closed: Some(e.to_string()),
                        ..Seen::default()
                    };
                    let _ = ready.send(Err(e));
                    seen
                }
            }
        }));
    }
    drop(ready_tx);
    let mut failed = 0usize;
    let mut first = None;
    for _ in 0..n {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                failed += 1;
                first.get_or_insert(e);
            }
            None => break,
        }
    }
    let connect_time = started.elapsed();
    if failed > 0 {
        stop.cancel();
        bail!(
            "{failed} of {n} clients could not connect and subscribe; first error: {:#}",
            first.expect("an error")
        );
    }
    eprintln!("{n} clients connected and subscribed in {connect_time:.2?}");
    Ok(Fleet {
        tasks,
        connect_time,
        stop,
    })
}

impl Fleet {
    /// Waits until `done` holds or `grace` has passed, then stops every client and
    /// collects what each saw; also returns when the waiting ended.
    async fn finish(self, grace: Duration, done: impl Fn() -> bool) -> (Vec<Seen>, Instant) {
        let deadline = Instant::now() + grace;
        while !done() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ended = Instant::now();
        self.stop.cancel();
        let mut out = Vec::with_capacity(self.tasks.len());
        let collect_by = tokio::time::Instant::now() + Duration::from_secs(10);
        for task in self.tasks {
            let abort = task.abort_handle();
            match tokio::time::timeout_at(collect_by, task).await {
                Ok(Ok(seen)) => out.push(seen),
                _ => {
                    abort.abort();
                    out.push(Seen {
                        unfinished: true,
                        closed: Some("did not stop".into()),
                        ..Seen::default()
                    });
                }
            }
        }
        (out, ended)
    }
}

/// When each message of a run is due, and how late the publisher was. A message is
/// stamped when it goes out (latency is publish → receive); how far behind its
/// schedule the publisher fell is measured apart (`publish_lag_ms`), so that a
/// publisher that cannot keep up (coordinated omission) shows, without the load
/// generator's own scheduling delays (timer granularity, a busy runtime) being
/// charged to the server.
#[derive(Clone)]
struct Schedule {
    start: tokio::time::Instant,
    start_us: u64,
    lag: Arc<std::sync::Mutex<hdrhistogram::Histogram<u64>>>,
}

impl Schedule {
    fn now() -> Schedule {
        Schedule {
            start: tokio::time::Instant::now(),
            start_us: now_us(),
            lag: Arc::new(std::sync::Mutex::new(client::histogram())),
        }
    }

    /// Sleeps until `at` after the start; returns the time to stamp the message with
    /// (now, µs) and records how late that is.
    async fn wait(&self, at: Duration) -> u64 {
        let due = self.start + at;
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        let now = now_us();
        let late = now.saturating_sub(self.start_us + at.as_micros() as u64);
        let _ = self
            .lag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(late.max(1));
        now
    }

    /// How late the publisher was, in ms: p50, p99, max.
    fn lag_json(&self) -> Value {
        let h = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        let ms = |v: u64| v as f64 / 1000.0;
        json!({
            "p50": ms(h.value_at_quantile(0.5)),
            "p99": ms(h.value_at_quantile(0.99)),
            "max": ms(h.max()),
        })
    }

    /// Sleeps until message `n` at `rate` per second is due; returns the stamp.
    async fn pace(&self, n: u64, rate: f64) -> u64 {
        self.wait(Duration::from_secs_f64(n as f64 / rate)).await
    }

    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// From the start to `end`.
    fn until(&self, end: Instant) -> Duration {
        end.saturating_duration_since(self.start.into_std())
    }
}

fn padding(opts: &PublishOpts) -> String {
    "x".repeat(opts.payload)
}

/// Loss, duplicates and ordering of a run whose client i expected the numbers
/// `0..expected(i)`. A client that did not stop is counted apart: what it received
/// is unknown, so it is neither lost nor delivered.
fn tally(seen: &[Seen], expected: impl Fn(usize) -> u64) -> Value {
    let (mut want, mut got, mut lost, mut extra, mut disorder, mut short) = (0, 0, 0, 0, 0, 0);
    let mut unfinished = 0;
    let mut closed = Vec::new();
    for (i, s) in seen.iter().enumerate() {
        if s.unfinished {
            unfinished += 1;
            continue;
        }
        let e = expected(i);
        let n = &s.numbers;
        want += e;
        got += s.received;
        // Distinct numbers, so that a duplicate never hides a loss.
        lost += e.saturating_sub(n.unique);
        extra += n.duplicates + n.unnumbered + n.unique.saturating_sub(e);
        disorder += n.reordered;
        if n.unique < e {
            short += 1;
        }
        if let Some(c) = &s.closed {
            if closed.len() < 5 {
                closed.push(c.clone());
            }
        }
    }
    json!({
        "expected_deliveries": want,
        "delivered": got,
        "lost": lost,
        "extra": extra,
        "out_of_order": disorder,
        "clients_short": short,
        "clients_unfinished": unfinished,
        "client_errors": closed,
    })
}

pub async fn broadcast(
    common: Common,
    opts: PublishOpts,
    channel: String,
) -> anyhow::Result<Report> {
    let target = Target::resolve(&common.url, common.sources).await?;
    let sink = Sink::open(&opts).await?;
    let ns = channel.split(':').next().unwrap_or(&channel).to_string();
    let plans = (0..common.clients)
        .map(|i| Plan {
            sub: format!("lt{i}"),
            grants: vec![format!("{ns}:*")],
            channel: channel.clone(),
        })
        .collect();
    let shared = Shared::new();
    let mut sample = Sample::start(&common.server_pids);
    let fleet = connect_all(&common, &target, plans, &shared).await?;
    let connect_time = fleet.connect_time;
    sample.connected(common.clients);

    let total = opts.rate as u64 * common.duration;
    let pad = padding(&opts);
    let start = Schedule::now();
    let mut published = 0u64;
    let mut errors = 0u64;
    for seq in 0..total {
        let sent = start.pace(seq, opts.rate as f64).await;
        match sink
            .publish(&channel, None, &message(seq, sent, &pad, ""))
            .await
        {
            Ok(()) => published += 1,
            Err(e) => {
                errors += 1;
                eprintln!("publish {seq} failed: {e:#}");
                break;
            }
        }
    }
    let publish_time = start.elapsed();
    let expected = published * common.clients as u64;
    let s2 = shared.clone();
    let (seen, ended) = fleet
        .finish(Duration::from_secs(common.grace), move || {
            s2.delivered.load(Ordering::Relaxed) >= expected
        })
        .await;
    sample.finished();
    let mut j = json!({
        "channel": channel,
        "rate_per_second": opts.rate,
        "payload_bytes": opts.payload,
        "published": published,
        "publish_errors": errors,
        "publish_seconds": publish_time.as_secs_f64(),
        "published_per_second": published as f64 / publish_time.as_secs_f64(),
        "publish_lag_ms": start.lag_json(),
    });
    merge(&mut j, tally(&seen, |_| published));
    Ok(Report::new(
        "broadcast",
        &common,
        connect_time,
        j,
        &sample,
        Some(shared.latency()),
        start.until(ended),
    ))
}

pub async fn per_user(common: Common, opts: PublishOpts) -> anyhow::Result<Report> {
    let target = Target::resolve(&common.url, common.sources).await?;
    let sink = Arc::new(Sink::open(&opts).await?);
    let n = common.clients;
    let plans = (0..n)
        .map(|i| Plan {
            sub: format!("lt{i}"),
            grants: vec![],
            channel: format!("user:lt{i}"),
        })
        .collect();
    let shared = Shared::new();
    let mut sample = Sample::start(&common.server_pids);
    let fleet = connect_all(&common, &target, plans, &shared).await?;
    let connect_time = fleet.connect_time;
    sample.connected(n);

    // Each publisher owns every P-th user, so that one user's messages stay in order.
    let publishers = 4.min(n);
    let per = opts.rate as f64 / publishers as f64;
    let total = opts.rate as u64 * common.duration;
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let errors = Arc::new(AtomicU64::new(0));
    let pad = Arc::new(padding(&opts));
    let start = Schedule::now();
    let mut workers = Vec::new();
    for w in 0..publishers {
        let (sink, counts, errors, pad, start) = (
            sink.clone(),
            counts.clone(),
            errors.clone(),
            pad.clone(),
            start.clone(),
        );
        let mine = (total / publishers as u64) + u64::from((w as u64) < total % publishers as u64);
        let users = (n - w).div_ceil(publishers);
        workers.push(tokio::spawn(async move {
            for k in 0..mine {
                let sent = start.pace(k, per).await;
                let user = w + publishers * rand::rng().random_range(0..users);
                let seq = counts[user].load(Ordering::Relaxed);
                let data = message(seq, sent, &pad, "");
                match sink.publish(&format!("user:lt{user}"), None, &data).await {
                    Ok(()) => {
                        counts[user].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("publish to user {user} failed: {e:#}");
                        }
                        return;
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let publish_time = start.elapsed();
    let published: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    let s2 = shared.clone();
    let (seen, ended) = fleet
        .finish(Duration::from_secs(common.grace), move || {
            s2.delivered.load(Ordering::Relaxed) >= published
        })
        .await;
    sample.finished();
    let mut j = json!({
        "rate_per_second": opts.rate,
        "payload_bytes": opts.payload,
        "publishers": publishers,
        "published": published,
        "publish_errors": errors.load(Ordering::Relaxed),
        "publish_seconds": publish_time.as_secs_f64(),
        "published_per_second": published as f64 / publish_time.as_secs_f64(),
        "publish_lag_ms": start.lag_json(),
    });
    merge(&mut j, tally(&seen, |i| counts[i].load(Ordering::Relaxed)));
    Ok(Report::new(
        "per-user",
        &common,
        connect_time,
        j,
        &sample,
        Some(shared.latency()),
        start.until(ended),
    ))
}

pub async fn job_progress(
    common: Common,
    opts: PublishOpts,
    watchers: usize,
    interval_ms: u64,
) -> anyhow::Result<Report> {
    let target = Target::resolve(&common.url, common.sources).await?;
    let sink = Arc::new(Sink::open(&opts).await?);
    let jobs = common.clients / watchers;
    let clients = jobs * watchers;
    // A fresh run id, so that the history of an earlier run's jobs is not replayed.
    let run: u32 = rand::random();
    let job_channel = move |j: usize| format!("job_progress:lt{run:08x}-{j}");
    let plans = (0..clients)
        .map(|i| Plan {
            sub: format!("lt{i}"),
            grants: vec![job_channel(i / watchers)],
            channel: job_channel(i / watchers),
        })
        .collect();
    let shared = Shared::new();
    let mut sample = Sample::start(&common.server_pids);
    let fleet = connect_all(&common, &target, plans, &shared).await?;
    let connect_time = fleet.connect_time;
    sample.connected(clients);

    let steps = (common.duration * 1000 / interval_ms).max(1);
    let interval = Duration::from_millis(interval_ms);
    let errors = Arc::new(AtomicU64::new(0));
    let published = Arc::new(AtomicU64::new(0));
    let pad = Arc::new(padding(&opts));
    let start = Schedule::now();
    let mut tasks = Vec::with_capacity(jobs);
    for j in 0..jobs {
        let (sink, errors, published, pad, start) = (
            sink.clone(),
            errors.clone(),
            published.clone(),
            pad.clone(),
            start.clone(),
        );
        let channel = job_channel(j);
        // Jobs start spread over one interval, so that the load is even.
        let offset = interval.mul_f64(j as f64 / jobs as f64);
        tasks.push(tokio::spawn(async move {
            for step in 0..=steps {
                let sent = start.wait(offset + interval * step as u32).await;
                let (event, extra) = if step == steps {
                    ("completed", r#","status":"succeeded""#.to_string())
                } else {
                    (
                        "progress",
                        format!(r#","status":"running","pct":{}"#, step * 100 / steps),
                    )
                };
                let data = message(step, sent, &pad, &extra);
                match sink.publish(&channel, Some(event), &data).await {
                    Ok(()) => {
                        published.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("publish to {channel} failed: {e:#}");
                        }
                        return;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let publish_time = start.elapsed();
    let expected = (steps + 1) * clients as u64;
    let s2 = shared.clone();
    let (seen, ended) = fleet
        .finish(Duration::from_secs(common.grace), move || {
            s2.delivered.load(Ordering::Relaxed) >= expected
                && s2.completed.load(Ordering::Relaxed) >= clients as u64
        })
        .await;
    sample.finished();
    let completed = seen.iter().filter(|s| s.completed).count();
    let mut j = json!({
        "jobs": jobs,
        "watchers_per_job": watchers,
        "interval_ms": interval_ms,
        "events_per_job": steps + 1,
        "payload_bytes": opts.payload,
        "published": published.load(Ordering::Relaxed),
        "publish_errors": errors.load(Ordering::Relaxed),
        "publish_seconds": publish_time.as_secs_f64(),
        "rate_per_second": (jobs as f64 * 1000.0 / interval_ms as f64).round(),
        "subscriptions_completed": completed,
        "publish_lag_ms": start.lag_json(),
    });
    merge(&mut j, tally(&seen, |_| steps + 1));
    Ok(Report::new(
        "job-progress",
        &common,
        connect_time,
        j,
        &sample,
        Some(shared.latency()),
        start.until(ended),
    ))
}

pub async fn churn(common: Common, rate: u32, channel: Option<String>) -> anyhow::Result<Report> {
    let target = Target::resolve(&common.url, common.sources).await?;
    let shared = Shared::new();
    let gate = Arc::new(Semaphore::new(common.clients));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut sample = Sample::start(&common.server_pids);
    sample.connected(0);
    let start = Schedule::now();
    let end = start.start + Duration::from_secs(common.duration);
    let total = rate as u64 * common.duration;
    let mut started = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    while started < total {
        start.pace(started, rate as f64).await;
        // Behind schedule past the end (the limit of concurrent cycles held it back):
        // stop starting cycles.
        if tokio::time::Instant::now() >= end {
            break;
        }
        let Ok(permit) = tokio::time::timeout_at(end, gate.clone().acquire_owned()).await else {
            break;
        };
        let permit = permit.expect("semaphore open");
        let i = started as usize;
        started += 1;
        let sub = format!("churn{i}");
        let (chan, grants) = match &channel {
            Some(c) => {
                let ns = c.split(':').next().unwrap_or(c);
                (c.clone(), vec![format!("{ns}:*")])
            }
            None => (format!("user:{sub}"), vec![]),
        };
        let token = client::token(&common.jwt_secret, &sub, &grants);
        let (target, shared, ok, failed, first_error) = (
            target.clone(),
            shared.clone(),
            ok.clone(),
            failed.clone(),
            first_error.clone(),
        );
        tasks.spawn(async move {
            let t0 = Instant::now();
            let cycle = tokio::time::timeout(CONNECT_TIMEOUT, async {
                let mut ws = target.connect(i, &token).await?;
                client::subscribe(&mut ws, &chan).await?;
                anyhow::Ok(ws)
            })
            .await
            .unwrap_or_else(|_| Err(anyhow!("no subscription within {CONNECT_TIMEOUT:?}")));
            match cycle {
                Ok(ws) => {
                    shared.record(i, t0.elapsed().as_micros() as u64);
                    client::close(ws).await;
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(format!("{e:#}"));
                }
            }
            drop(permit);
        });
    }
    let load_time = start.elapsed();
    let _ = tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    // Cycles still running this long after the last one started: neither ok nor failed.
    let aborted = tasks.len();
    tasks.abort_all();
    // Let the server finish closing before its memory is read.
    tokio::time::sleep(Duration::from_secs(1)).await;
    sample.finished();
    let ok = ok.load(Ordering::Relaxed);
    let j = json!({
        "rate_per_second": rate,
        "channel": channel.unwrap_or_else(|| "user:churn<i> (one per cycle)".into()),
        "cycles_started": started,
        "cycles_ok": ok,
        "cycles_failed": failed.load(Ordering::Relaxed),
        "cycles_aborted": aborted,
        "first_error": *first_error.lock().unwrap_or_else(|e| e.into_inner()),
        "cycles_per_second": ok as f64 / load_time.as_secs_f64(),
        "latency_measures": "connect → subscribed",
    });
    Ok(Report::new(
        "churn",
        &common,
        Duration::ZERO,
        j,
        &sample,
        Some(shared.latency()),
        load_time,
    ))
}

pub async fn idle(common: Common, channel: Option<String>) -> anyhow::Result<Report> {
    let target = Target::resolve(&common.url, common.sources).await?;
    let plans = (0..common.clients)
        .map(|i| {
            let sub = format!("lt{i}");
            match &channel {
                Some(c) => Plan {
                    sub,
                    grants: vec![format!("{}:*", c.split(':').next().unwrap_or(c))],
                    channel: c.clone(),
                },
                None => Plan {
                    channel: format!("user:{sub}"),
                    sub,
                    grants: vec![],
                },
            }
        })
        .collect();
    let shared = Shared::new();
    let mut sample = Sample::start(&common.server_pids);
    let fleet = connect_all(&common, &target, plans, &shared).await?;
    let connect_time = fleet.connect_time;
    // Let the server settle (allocator, deferred work) before its memory is read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sample.connected(common.clients);
    let hold = Instant::now();
    tokio::time::sleep(Duration::from_secs(common.duration)).await;
    let still_open = fleet.tasks.iter().filter(|t| !t.is_finished()).count();
    let held = hold.elapsed();
    let (seen, _) = fleet.finish(Duration::ZERO, || true).await;
    sample.finished();
    let closed: Vec<&String> = seen
        .iter()
        .filter_map(|s| s.closed.as_ref())
        .take(5)
        .collect();
    let j = json!({
        "channel": channel.unwrap_or_else(|| "user:lt<i> (one per client)".into()),
        "held_seconds": held.as_secs_f64(),
        "still_connected_at_end": still_open,
        "dropped_while_idle": common.clients - still_open,
        "client_errors": closed,
    });
    Ok(Report::new(
        "idle",
        &common,
        connect_time,
        j,
        &sample,
        None,
        held,
    ))
}

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        a.extend(b);
    }
}
