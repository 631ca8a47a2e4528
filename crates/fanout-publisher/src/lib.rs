//! # fanout-publisher
//!
//! What job workers link to emit fanout events. Every publish runs one Redis script that
//! gives the message the channel's next offset, appends it to the channel's capped history
//! and publishes the envelope — so clients that were away can recover what they missed.
//!
//! ```no_run
//! # async fn run() -> Result<(), fanout_publisher::PublishError> {
//! use fanout_publisher::{JobStatus, Publisher};
//!
//! let publisher = Publisher::connect("redis://127.0.0.1:6379").await?;
//! publisher.job_progress("7", 40.0, Some("enriching rows")).await?;
//! let ack = publisher
//!     .publish("user:42", "notification", &serde_json::json!({"text": "export ready"}))
//!     .await?;
//! println!("offset {} in epoch {}", ack.offset, ack.epoch);
//! publisher.job_completed("7", JobStatus::Succeeded, &serde_json::json!({"rows": 1200})).await?;
//!
//! // In a job loop: never blocks, never fails the job; drops are counted.
//! let handle = publisher.background(1024);
//! handle.job_progress("8", 10.0, None);
//! # Ok(()) }
//! ```

mod background;
mod url;

use std::collections::HashMap;
use std::fmt::Display;
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
}

/// Where a publication landed in the channel's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PublishAck {
    pub offset: u64,
    pub epoch: String,
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

/// A connection to Redis that publishes fanout envelopes. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    script_sha: String,
    sharded: bool,
    default_history: HistoryPolicy,
    history: HashMap<String, HistoryPolicy>,
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
                // No blind resend: a publish whose reply was lost may have been applied,
                // and sending it again would deliver it twice under a new offset.
                c.max_command_attempts = 1;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build()?;
        client.init().await?;
        Ok(Publisher::from_client(client))
    }

    /// Wraps an already connected client.
    pub fn from_client(client: Client) -> Publisher {
        let sharded = client.is_clustered();
        Publisher {
            client,
            script_sha: sha1_hex(layout::PUBLISH_SCRIPT),
            sharded,
            default_history: HistoryPolicy::default(),
            history: builtin_history(),
        }
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

    /// The underlying Redis client.
    pub fn client(&self) -> &Client {
        &self.client
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

    /// Publishes with an explicit history policy (the edge passes its namespace's).
    pub async fn publish_with_history(
        &self,
        channel: &str,
        event: Option<&str>,
        data: &RawValue,
        policy: HistoryPolicy,
    ) -> Result<PublishAck, PublishError> {
        Channel::parse(channel)?;
        let body = Envelope::encode_body(event, data, fanout_protocol::now_ms());
        let keys = vec![layout::meta_key(channel), layout::history_key(channel)];
        let args: Vec<Value> = vec![
            channel.into(),
            body.into(),
            (policy.size as i64).into(),
            (policy.ttl.as_secs().max(1) as i64).into(),
            new_epoch().into(),
            if self.sharded { "1" } else { "0" }.into(),
            finished_ttl(channel, data, policy).into(),
        ];
        let reply: Value = match self
            .client
            .evalsha(self.script_sha.as_str(), keys.clone(), args.clone())
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                self.client.eval(layout::PUBLISH_SCRIPT, keys, args).await?
            }
            other => other?,
        };
        let ack = parse_ack(reply)?;
        metrics::counter!("fanout_publisher_published_total").increment(1);
        Ok(ack)
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

fn parse_ack(reply: Value) -> Result<PublishAck, PublishError> {
    let items = match reply {
        Value::Array(items) if items.len() == 2 => items,
        other => return Err(PublishError::Reply(format!("{other:?}"))),
    };
    let offset = items[0]
        .as_u64()
        .ok_or_else(|| PublishError::Reply(format!("{:?}", items[0])))?;
    let epoch = items[1]
        .as_string()
        .ok_or_else(|| PublishError::Reply(format!("{:?}", items[1])))?;
    Ok(PublishAck { offset, epoch })
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
    fn script_sha_matches_redis() {
        // SHA1 of the script as Redis computes it for EVALSHA.
        assert_eq!(
            sha1_hex("return 1"),
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }
}
