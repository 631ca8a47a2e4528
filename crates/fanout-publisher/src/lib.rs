//! # fanout-publisher
//!
//! What job workers link to emit fanout events. Every publish runs one Redis script that
//! gives the message the channel's next offset, appends it to the channel's capped history
//! and publishes the envelope — so clients that were away can recover what they missed.
//!
//! ## Exactly once, through failovers
//!
//! Every logical publish carries an **idempotency key** (16 random bytes as hex, made
//! once per call, or given by the caller with [`Publisher::publish_with_key`]). The
//! script applies a key at most once per channel within [`DedupPolicy::window`]
//! (default 5 minutes): a resend of an applied publish returns the first one's offset
//! and epoch ([`PublishAck::duplicate`]) and publishes nothing. So the publisher
//! resends freely: through `MOVED`/`ASK`/`TRYAGAIN`/`CLUSTERDOWN`, lost connections and
//! timeouts it retries with capped exponential backoff until [`RetryPolicy::deadline`]
//! (default 10 s), and a message is delivered once whether or not an earlier attempt's
//! reply was lost. Errors that are not transient (a script error, a bad channel) are
//! returned at once. Past the deadline the publish fails with
//! [`PublishError::GaveUp`]: it may or may not have been applied — resend it with the
//! same key (within the window) to find out without publishing twice.
//!
//! An attempt that times out while Redis is reachable means the client is stuck (fred
//! 10.1 can wedge a cluster client that gets `ASK` during a slot migration): the
//! publisher then builds a fresh client, swaps it in, logs it and counts it in
//! `fanout_publish_client_rebuilds_total`. Retries and duplicates are counted in
//! `fanout_publish_retries_total` and `fanout_publish_duplicates_total` (the
//! [`metric_names`]).
//!
//! ```
//! # // A real redis-server on a free port (the test kit's), not 6379.
//! # let redis = fanout_testkit::RedisServer::start().expect("redis-server");
//! # let url = redis.url();
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use fanout_publisher::{JobStatus, Publisher};
//!
//! let publisher = Publisher::connect(&url).await?; // e.g. "redis://127.0.0.1:6379"
//! publisher.job_progress("7", 40.0, Some("enriching rows")).await?;
//! let ack = publisher
//!     .publish("user:42", "notification", &serde_json::json!({"text": "export ready"}))
//!     .await?;
//! assert_eq!(ack.offset, 1);
//! println!("offset {} in epoch {}", ack.offset, ack.epoch);
//! publisher.job_completed("7", JobStatus::Succeeded, &serde_json::json!({"rows": 1200})).await?;
//!
//! // In a job loop: never blocks, never fails the job; drops are counted.
//! let handle = publisher.background(1024);
//! handle.job_progress("8", 10.0, None);
//! # Ok::<(), fanout_publisher::PublishError>(())
//! # }).unwrap();
//! ```

mod background;
mod url;

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fanout_protocol::{layout, Channel, ChannelError, Envelope};
use fred::prelude::*;
use serde::Serialize;
use serde_json::value::RawValue;
use thiserror::Error;

pub use background::BackgroundPublisher;
pub use url::{is_cluster_url, redis_config, UrlError};

/// Why a publish failed.
#[derive(Debug, Error)]
pub enum PublishError {
    #[error("invalid channel: {0}")]
    Channel(#[from] ChannelError),
    #[error("data does not serialize to JSON: {0}")]
    Data(#[from] serde_json::Error),
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("redis URL: {0}")]
    Url(#[from] UrlError),
    #[error("unexpected reply from the publish script: {0}")]
    Reply(String),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Transient failures until the retry deadline: the publish may or may not have been
    /// applied. Resending it with the same idempotency key within the dedup window
    /// applies it at most once.
    #[error("publish not acknowledged after {attempts} attempts in {elapsed:?} (retry deadline); it may or may not have been applied; last error: {last}")]
    GaveUp {
        attempts: u32,
        elapsed: Duration,
        last: Box<PublishError>,
    },
}

impl PublishError {
    /// Whether resending the same publish may succeed: connection loss, timeouts, cluster
    /// redirections and transitions (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`,
    /// `LOADING`, `MASTERDOWN`, `READONLY`, `BUSY`). Script errors, bad channels or data,
    /// authentication and configuration errors are not.
    pub fn is_transient(&self) -> bool {
        match self {
            PublishError::Timeout(_) => true,
            PublishError::Redis(e) => is_transient(e),
            _ => false,
        }
    }
}

fn is_transient(e: &fred::error::Error) -> bool {
    use fred::error::ErrorKind as K;
    match e.kind() {
        K::IO | K::Timeout | K::Canceled | K::Routing | K::Cluster | K::Backpressure => true,
        // fred's own word for a write it could not make (the connection went mid-write,
        // as in a failover) with no attempt left: resending under the same key is safe.
        K::Unknown if e.details().starts_with("Too many failed write attempts") => true,
        K::Unknown | K::Protocol => {
            let first = e.details().split_whitespace().next().unwrap_or("");
            matches!(
                first,
                "MOVED"
                    | "ASK"
                    | "TRYAGAIN"
                    | "CLUSTERDOWN"
                    | "LOADING"
                    | "MASTERDOWN"
                    | "READONLY"
                    | "BUSY"
            )
        }
        _ => false,
    }
}

/// The names of the publisher's metrics (through the `metrics` facade; the edge
/// describes them in its Prometheus output).
pub mod metric_names {
    /// Publishes acknowledged by Redis (first applications and duplicates alike).
    pub const PUBLISHED_TOTAL: &str = "fanout_publisher_published_total";
    /// Resends of a publish after a transient failure.
    pub const RETRIES_TOTAL: &str = "fanout_publish_retries_total";
    /// Publishes whose idempotency key had already been applied: nothing was published
    /// again, the first publish's offset was returned.
    pub const DUPLICATES_TOTAL: &str = "fanout_publish_duplicates_total";
    /// Redis clients replaced because they stopped answering while Redis was reachable.
    pub const CLIENT_REBUILDS_TOTAL: &str = "fanout_publish_client_rebuilds_total";
    /// Publishes that failed (by `reason`: `gave_up` after the retry deadline, `error`
    /// for an error that is not transient).
    pub const FAILED_TOTAL: &str = "fanout_publish_failed_total";
}
use metric_names as mn;

/// Where a publication landed in the channel's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PublishAck {
    pub offset: u64,
    pub epoch: String,
    /// `true` when this idempotency key had already been applied: nothing was published
    /// now, and `offset`/`epoch` are where the first publish landed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// How a publish is retried after a transient failure (see the crate documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// How long a publish may take, every attempt and backoff included; `ZERO` = one
    /// attempt, no retry.
    pub deadline: Duration,
    /// How long one attempt may go unanswered. Such an attempt is resent; if Redis is
    /// reachable meanwhile, the client is rebuilt first.
    pub attempt_timeout: Duration,
    /// The first backoff; it doubles after each failed attempt, with jitter.
    pub initial_backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(2),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// How long and how many idempotency keys a channel remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupPolicy {
    /// A key resent within this window is applied at most once. Must exceed the retry
    /// deadline (and any retries of the caller's own).
    pub window: Duration,
    /// At most this many keys per channel: past it the oldest is forgotten even within
    /// the window (only matters above `max_keys / window` publishes per second).
    pub max_keys: u32,
}

impl Default for DedupPolicy {
    fn default() -> Self {
        DedupPolicy {
            window: Duration::from_secs(layout::DEDUP_WINDOW_SECS),
            max_keys: layout::DEDUP_MAX_KEYS,
        }
    }
}

/// A fresh idempotency key: 16 random bytes as 32 hex digits.
pub fn new_idempotency_key() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

/// Whether `key` can be used as an idempotency key: 1 to 128 printable ASCII characters
/// without spaces.
pub fn valid_idempotency_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY_LEN
        && key.bytes().all(|b| b.is_ascii_graphic())
}

/// How much history a namespace keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPolicy {
    /// Messages kept in the stream; 0 keeps none (offsets and epoch are still assigned).
    pub size: u32,
    /// How long history (and the offset/epoch) outlives the last publish.
    pub ttl: Duration,
    /// For `job_progress`: how long a finished job's history lives after its terminal
    /// message (`status` succeeded / failed / cancelled). `None` = `ttl`.
    pub finished_ttl: Option<Duration>,
}

impl Default for HistoryPolicy {
    fn default() -> Self {
        HistoryPolicy {
            size: 100,
            ttl: Duration::from_secs(3600),
            finished_ttl: None,
        }
    }
}

/// The status of a finished job; each one is terminal for `job_progress` subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Succeeded,
    Failed,
    Cancelled,
}

/// A connection to Redis that publishes fanout envelopes. Cheap to clone (clones share
/// the connection, and a rebuilt client).
#[derive(Clone)]
pub struct Publisher {
    conn: Arc<Connection>,
    script_sha: String,
    sharded: bool,
    default_history: HistoryPolicy,
    history: HashMap<String, HistoryPolicy>,
    retry: RetryPolicy,
    dedup: DedupPolicy,
}

/// The current client, replaced when it stops answering.
struct Connection {
    current: RwLock<Current>,
    rebuilding: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Current {
    generation: u64,
    client: Client,
    /// The task driving a client this publisher built (aborted if the client is replaced
    /// and does not quit).
    task: Option<Arc<fred::types::ConnectHandle>>,
}

impl Connection {
    fn current(&self) -> Current {
        self.current.read().expect("publisher client lock").clone()
    }
}

impl Publisher {
    /// Connects to `redis://`, `rediss://`, `redis-cluster://h1:p1,h2:p2` or
    /// `redis-sentinel://s1:p1,s2:p2/<service>` (see [`redis_config`]). Reconnects on its
    /// own after a Redis outage; in a cluster, follows failovers and slot moves.
    pub async fn connect(url: &str) -> Result<Publisher, PublishError> {
        let config = redis_config(url)?;
        let client = Builder::from_config(config)
            .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(5))
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(5);
                c.internal_command_timeout = Duration::from_secs(5);
                // One send per attempt: the publisher resends itself, with the same
                // idempotency key, so that a resend is never applied twice.
                c.max_command_attempts = 1;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build()?;
        let task = client.init().await?;
        let mut publisher = Publisher::from_client(client);
        publisher.set_task(task);
        Ok(publisher)
    }

    /// Wraps an already connected client. If it stops answering, the publisher replaces
    /// it with one made from the same configuration ([`Client::clone_new`]).
    pub fn from_client(client: Client) -> Publisher {
        let sharded = client.is_clustered();
        Publisher {
            conn: Arc::new(Connection {
                current: RwLock::new(Current {
                    generation: 0,
                    client,
                    task: None,
                }),
                rebuilding: tokio::sync::Mutex::new(()),
            }),
            script_sha: sha1_hex(layout::PUBLISH_SCRIPT),
            sharded,
            default_history: HistoryPolicy::default(),
            history: builtin_history(),
            retry: RetryPolicy::default(),
            dedup: DedupPolicy::default(),
        }
    }

    fn set_task(&mut self, task: fred::types::ConnectHandle) {
        self.conn
            .current
            .write()
            .expect("publisher client lock")
            .task = Some(Arc::new(task));
    }

    /// Sets how publishes are retried (default: [`RetryPolicy::default`], 10 s).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Publisher {
        self.retry = retry;
        self
    }

    /// The retry policy in use.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// Sets how long and how many idempotency keys are remembered per channel (default:
    /// [`DedupPolicy::default`], 5 minutes / 10,000).
    pub fn with_dedup(mut self, dedup: DedupPolicy) -> Publisher {
        self.dedup = dedup;
        self
    }

    /// Sets the history kept for channels of `namespace`.
    pub fn with_history(mut self, namespace: &str, policy: HistoryPolicy) -> Publisher {
        self.history.insert(namespace.to_string(), policy);
        self
    }

    /// Sets the history kept for namespaces with no policy of their own.
    pub fn with_default_history(mut self, policy: HistoryPolicy) -> Publisher {
        self.default_history = policy;
        self
    }

    /// The history policy used for channels of `namespace`.
    pub fn history_for(&self, namespace: &str) -> HistoryPolicy {
        self.history
            .get(namespace)
            .copied()
            .unwrap_or(self.default_history)
    }

    /// The Redis client in use now (a new one after a rebuild; cheap to clone).
    pub fn client(&self) -> Client {
        self.conn.current().client
    }

    /// Publishes `data` as `event` on `channel`.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        channel: &str,
        event: &str,
        data: &T,
    ) -> Result<PublishAck, PublishError> {
        let data = serde_json::value::to_raw_value(data)?;
        let event = (!event.is_empty()).then_some(event);
        self.publish_raw(channel, event, &data).await
    }

    /// Publishes already-encoded JSON data, with an optional event name.
    pub async fn publish_raw(
        &self,
        channel: &str,
        event: Option<&str>,
        data: &RawValue,
    ) -> Result<PublishAck, PublishError> {
        let parsed = Channel::parse(channel)?;
        let policy = self.history_for(parsed.namespace());
        self.publish_with_history(channel, event, data, policy)
            .await
    }

    /// Publishes already-encoded JSON data with the caller's idempotency key: calling
    /// this again with the same key (within the dedup window, e.g. after an error or a
    /// crash) returns the first publish's offset and epoch and publishes nothing.
    pub async fn publish_with_key(
        &self,
        channel: &str,
        event: Option<&str>,
        data: &RawValue,
        key: &str,
    ) -> Result<PublishAck, PublishError> {
        let parsed = Channel::parse(channel)?;
        let policy = self.history_for(parsed.namespace());
        self.publish_with_history_key(channel, event, data, policy, key)
            .await
    }

    /// Publishes with an explicit history policy (the edge passes its namespace's), under
    /// a fresh idempotency key.
    pub async fn publish_with_history(
        &self,
        channel: &str,
        event: Option<&str>,
        data: &RawValue,
        policy: HistoryPolicy,
    ) -> Result<PublishAck, PublishError> {
        self.publish_with_history_key(channel, event, data, policy, &new_idempotency_key())
            .await
    }

    /// Publishes with an explicit history policy and idempotency key; retried through
    /// transient failures until the retry deadline, applied at most once.
    pub async fn publish_with_history_key(
        &self,
        channel: &str,
        event: Option<&str>,
        data: &RawValue,
        policy: HistoryPolicy,
        key: &str,
    ) -> Result<PublishAck, PublishError> {
        Channel::parse(channel)?;
        if !valid_idempotency_key(key) {
            return Err(PublishError::Reply(format!(
                "invalid idempotency key {key:?}: 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters, no spaces"
            )));
        }
        // Made once: every resend carries the same body (and `ts`), epoch and key.
        let body = Envelope::encode_body(event, data, fanout_protocol::now_ms());
        let keys = vec![
            layout::meta_key(channel),
            layout::history_key(channel),
            layout::dedup_key(channel),
        ];
        let args: Vec<Value> = vec![
            channel.into(),
            body.into(),
            (policy.size as i64).into(),
            (policy.ttl.as_secs().max(1) as i64).into(),
            new_epoch().into(),
            if self.sharded { "1" } else { "0" }.into(),
            finished_ttl(channel, data, policy).into(),
            key.into(),
            (self.dedup.window.as_secs().max(1) as i64).into(),
            (self.dedup.max_keys.max(1) as i64).into(),
        ];
        let started = tokio::time::Instant::now();
        let deadline = started + self.retry.deadline;
        let mut backoff = self.retry.initial_backoff;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let current = self.conn.current();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let limit = self
                .retry
                .attempt_timeout
                .min(left.max(Duration::from_millis(1)));
            let error = match tokio::time::timeout(
                limit,
                self.run_script(&current.client, &keys, &args),
            )
            .await
            {
                Ok(Ok(reply)) => {
                    let ack = parse_ack(reply)?;
                    metrics::counter!(mn::PUBLISHED_TOTAL).increment(1);
                    if ack.duplicate {
                        metrics::counter!(mn::DUPLICATES_TOTAL).increment(1);
                        tracing::info!(%channel, offset = ack.offset, attempts, "publish was already applied (same idempotency key); not published again");
                    } else if attempts > 1 {
                        tracing::info!(%channel, offset = ack.offset, attempts, elapsed_ms = started.elapsed().as_millis() as u64, "publish acknowledged after retries");
                    }
                    return Ok(ack);
                }
                Ok(Err(e)) => e,
                Err(_) => PublishError::Timeout(limit),
            };
            if !error.is_transient() {
                metrics::counter!(mn::FAILED_TOTAL, "reason" => "error").increment(1);
                return Err(error);
            }
            if matches!(error, PublishError::Timeout(_))
                || matches!(&error, PublishError::Redis(e) if *e.kind() == fred::error::ErrorKind::Timeout)
            {
                self.rebuild_if_stuck(current.generation, limit).await;
            }
            let now = tokio::time::Instant::now();
            if self.retry.deadline.is_zero() || now + backoff >= deadline {
                metrics::counter!(mn::FAILED_TOTAL, "reason" => "gave_up").increment(1);
                tracing::warn!(%channel, attempts, %error, "publish not acknowledged within the retry deadline");
                return Err(PublishError::GaveUp {
                    attempts,
                    elapsed: started.elapsed(),
                    last: Box::new(error),
                });
            }
            metrics::counter!(mn::RETRIES_TOTAL).increment(1);
            tracing::debug!(%channel, attempts, %error, backoff_ms = backoff.as_millis() as u64, "publish failed transiently; resending with the same idempotency key");
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(self.retry.max_backoff);
        }
    }

    /// One attempt: EVALSHA, or EVAL when Redis does not have the script (NOSCRIPT).
    async fn run_script(
        &self,
        client: &Client,
        keys: &[String],
        args: &[Value],
    ) -> Result<Value, PublishError> {
        match client
            .evalsha(self.script_sha.as_str(), keys.to_vec(), args.to_vec())
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => Ok(client
                .eval(layout::PUBLISH_SCRIPT, keys.to_vec(), args.to_vec())
                .await?),
            other => Ok(other?),
        }
    }

    /// An attempt on client `generation` went unanswered for `limit`. If a fresh client
    /// can connect within `limit`, Redis is reachable and the old client is stuck: the
    /// fresh one replaces it. Otherwise Redis is away, and the old client (which
    /// reconnects on its own) stays.
    async fn rebuild_if_stuck(&self, generation: u64, limit: Duration) {
        let _one_at_a_time = self.conn.rebuilding.lock().await;
        let old = self.conn.current();
        if old.generation != generation {
            return; // another publish rebuilt it meanwhile
        }
        let fresh = old.client.clone_new();
        let task = fresh.connect();
        match tokio::time::timeout(limit, fresh.wait_for_connect()).await {
            Ok(Ok(())) => {}
            outcome => {
                tracing::debug!(?outcome, "a fresh Redis client could not connect either: Redis is unreachable; keeping the client");
                task.abort();
                return;
            }
        }
        {
            let mut current = self.conn.current.write().expect("publisher client lock");
            *current = Current {
                generation: generation + 1,
                client: fresh,
                task: Some(Arc::new(task)),
            };
        }
        metrics::counter!(mn::CLIENT_REBUILDS_TOTAL).increment(1);
        tracing::warn!(
            timeout_ms = limit.as_millis() as u64,
            generation = generation + 1,
            "the Redis client did not answer while Redis is reachable; replaced it with a fresh client"
        );
        tokio::spawn(async move {
            // A stuck client may not even quit: its task is then stopped.
            let quit = tokio::time::timeout(Duration::from_secs(2), old.client.quit()).await;
            if quit.is_err() {
                if let Some(task) = old.task {
                    task.abort();
                }
            }
        });
    }

    /// Publishes a progress update for job `job_id` on `job_progress:<job_id>`:
    /// `{"status":"running","pct":…,"message":…}` as event `progress`.
    pub async fn job_progress(
        &self,
        job_id: impl Display,
        pct: f64,
        message: Option<&str>,
    ) -> Result<PublishAck, PublishError> {
        let data = progress_data(pct, message);
        self.publish(&job_channel(job_id), "progress", &data).await
    }

    /// Publishes the end of job `job_id`: `{"status":…,"result":…}` as event `completed`.
    /// The `status` (`succeeded`, `failed`, `cancelled`) marks the message terminal.
    pub async fn job_completed<T: Serialize + ?Sized>(
        &self,
        job_id: impl Display,
        status: JobStatus,
        result: &T,
    ) -> Result<PublishAck, PublishError> {
        let data = completion_data(status, result)?;
        self.publish(&job_channel(job_id), "completed", &data).await
    }

    /// Publishes `event` to user `user_id` (channel `user:<user_id>`).
    pub async fn user_event<T: Serialize + ?Sized>(
        &self,
        user_id: impl Display,
        event: &str,
        data: &T,
    ) -> Result<PublishAck, PublishError> {
        self.publish(&format!("user:{user_id}"), event, data).await
    }

    /// A non-blocking handle for job loops: a bounded queue drained by a background
    /// task. A full queue or a Redis outage never blocks or fails the caller; dropped
    /// messages are counted (`fanout_publisher_dropped_total`) and logged.
    pub fn background(&self, capacity: usize) -> BackgroundPublisher {
        BackgroundPublisher::spawn(self.clone(), capacity)
    }
}

fn builtin_history() -> HashMap<String, HistoryPolicy> {
    HashMap::from([(
        "job_progress".to_string(),
        HistoryPolicy {
            size: 100,
            ttl: Duration::from_secs(24 * 3600),
            finished_ttl: Some(Duration::from_secs(3600)),
        },
    )])
}

pub(crate) fn job_channel(job_id: impl Display) -> String {
    format!("job_progress:{job_id}")
}

pub(crate) fn progress_data(pct: f64, message: Option<&str>) -> serde_json::Value {
    let mut data = serde_json::json!({"status": "running", "pct": pct});
    if let Some(m) = message {
        data["message"] = m.into();
    }
    data
}

pub(crate) fn completion_data<T: Serialize + ?Sized>(
    status: JobStatus,
    result: &T,
) -> Result<serde_json::Value, serde_json::Error> {
    Ok(serde_json::json!({"status": status, "result": serde_json::to_value(result)?}))
}

/// The TTL a terminal `job_progress` message gives its channel's history, else 0.
fn finished_ttl(channel: &str, data: &RawValue, policy: HistoryPolicy) -> i64 {
    match policy.finished_ttl {
        Some(ttl)
            if channel.starts_with("job_progress:") && fanout_protocol::data_is_terminal(data) =>
        {
            ttl.as_secs().max(1) as i64
        }
        _ => 0,
    }
}

/// `{offset, epoch}` or, with an idempotency key, `{offset, epoch, duplicate}`.
fn parse_ack(reply: Value) -> Result<PublishAck, PublishError> {
    let items = match reply {
        Value::Array(items) if items.len() == 2 || items.len() == 3 => items,
        other => return Err(PublishError::Reply(format!("{other:?}"))),
    };
    let offset = items[0]
        .as_u64()
        .ok_or_else(|| PublishError::Reply(format!("{:?}", items[0])))?;
    let epoch = items[1]
        .as_string()
        .ok_or_else(|| PublishError::Reply(format!("{:?}", items[1])))?;
    let duplicate = items.get(2).and_then(|d| d.as_u64()) == Some(1);
    Ok(PublishAck {
        offset,
        epoch,
        duplicate,
    })
}

/// `d` ± 25 %, so that publishers that failed together do not resend in lockstep.
fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::random_range(0.75..1.25);
    d.mul_f64(f)
}

/// A fresh epoch: 12 random alphanumerics, used only if the channel has none yet.
fn new_epoch() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 12)
}

fn sha1_hex(text: &str) -> String {
    fred::util::sha1_hash(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_payloads() {
        assert_eq!(
            progress_data(40.0, Some("rows")),
            serde_json::json!({"status":"running","pct":40.0,"message":"rows"})
        );
        assert_eq!(
            completion_data(JobStatus::Cancelled, &serde_json::json!(null)).unwrap(),
            serde_json::json!({"status":"cancelled","result":null})
        );
        assert_eq!(job_channel(7), "job_progress:7");
    }

    #[test]
    fn idempotency_keys() {
        let a = new_idempotency_key();
        assert_eq!(a.len(), 32);
        assert!(valid_idempotency_key(&a));
        assert_ne!(a, new_idempotency_key());
        assert!(!valid_idempotency_key(""));
        assert!(!valid_idempotency_key("a b"));
        assert!(!valid_idempotency_key(&"x".repeat(129)));
    }

    #[test]
    fn transient_errors() {
        use fred::error::{Error, ErrorKind};
        let redis = |kind, text: &str| PublishError::Redis(Error::new(kind, text.to_string()));
        assert!(redis(ErrorKind::Cluster, "MOVED 12 127.0.0.1:7001").is_transient());
        assert!(redis(ErrorKind::IO, "connection reset").is_transient());
        assert!(redis(
            ErrorKind::Unknown,
            "TRYAGAIN Multiple keys request during rehashing of slot"
        )
        .is_transient());
        assert!(redis(ErrorKind::Unknown, "LOADING Redis is loading").is_transient());
        assert!(redis(ErrorKind::Unknown, "Too many failed write attempts.").is_transient());
        assert!(PublishError::Timeout(Duration::from_secs(1)).is_transient());
        assert!(!redis(ErrorKind::Unknown, "ERR Error running script").is_transient());
        assert!(!redis(ErrorKind::Auth, "NOAUTH").is_transient());
        assert!(!PublishError::Reply("x".into()).is_transient());
    }

    #[test]
    fn acks_with_and_without_the_duplicate_flag() {
        let ack = parse_ack(Value::Array(vec![5.into(), "E".into()])).unwrap();
        assert!(!ack.duplicate && ack.offset == 5);
        let ack = parse_ack(Value::Array(vec![5.into(), "E".into(), 1.into()])).unwrap();
        assert!(ack.duplicate && ack.epoch == "E");
        assert_eq!(
            serde_json::to_string(&PublishAck {
                offset: 1,
                epoch: "E".into(),
                duplicate: false
            })
            .unwrap(),
            r#"{"offset":1,"epoch":"E"}"#
        );
    }

    #[test]
    fn script_sha_matches_redis() {
        // SHA1 of the script as Redis computes it for EVALSHA.
        assert_eq!(
            sha1_hex("return 1"),
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }
}
