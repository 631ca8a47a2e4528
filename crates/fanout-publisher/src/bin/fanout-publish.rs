//! `fanout-publish --redis-url URL CHANNEL JSON [--event NAME]`: publishes one message
//! with history (offset + epoch) and prints the offset.
//!
//! The publish carries an idempotency key (random, or `--idempotency-key`) and is resent
//! through failovers, slot moves and lost connections until `--deadline-secs` (default
//! 10): exit 0 means it was applied exactly once. Exit 1 past the deadline means it may
//! or may not have been applied; running the command again with the same
//! `--idempotency-key` within the dedup window (5 minutes) applies it at most once.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fanout_publisher::{HistoryPolicy, Publisher, RetryPolicy};
use serde_json::value::RawValue;

#[derive(Parser)]
#[command(
    name = "fanout-publish",
    version,
    about = "Publish one fanout message through Redis"
)]
struct Args {
    /// Redis URL (redis://, rediss://, redis-cluster://, redis-sentinel://).
    #[arg(long, env = "FANOUT_REDIS_URL")]
    redis_url: String,
    /// Channel, e.g. job_progress:7 or user:42.
    channel: String,
    /// The message data, as JSON.
    json: String,
    /// Event name carried with the message.
    #[arg(long)]
    event: Option<String>,
    /// Messages of history to keep for this channel (default: the namespace's).
    #[arg(long)]
    history_size: Option<u32>,
    /// Seconds the history outlives the last publish.
    #[arg(long)]
    history_ttl: Option<u64>,
    /// Print `{"offset":…,"epoch":…}` (plus `"duplicate":true` when the key had already
    /// been applied) instead of the bare offset.
    #[arg(long)]
    json_output: bool,
    /// Idempotency key of this publish (default: a random one). Reuse it when you run the
    /// command again for the same message: it is applied at most once within 5 minutes.
    #[arg(long, env = "FANOUT_IDEMPOTENCY_KEY")]
    idempotency_key: Option<String>,
    /// Seconds to keep trying (connecting and publishing) through transient failures.
    #[arg(long, default_value_t = 10.0)]
    deadline_secs: f64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data = RawValue::from_string(args.json.clone())
        .context("the message data (JSON argument) is not valid JSON")?;
    let key = args
        .idempotency_key
        .clone()
        .unwrap_or_else(fanout_publisher::new_idempotency_key);
    anyhow::ensure!(
        fanout_publisher::valid_idempotency_key(&key),
        "--idempotency-key must be 1 to {} printable ASCII characters without spaces",
        fanout_publisher::MAX_IDEMPOTENCY_KEY_LEN
    );
    anyhow::ensure!(
        args.deadline_secs.is_finite() && args.deadline_secs >= 0.0,
        "--deadline-secs must be a non-negative number"
    );
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs_f64(args.deadline_secs);
    let publisher = connect(&args.redis_url, deadline).await?;
    // What is left of the deadline is the publish's.
    let retry = RetryPolicy {
        deadline: deadline.saturating_duration_since(tokio::time::Instant::now()),
        ..RetryPolicy::default()
    };
    let publisher = publisher.with_retry(retry);
    let publisher = match (args.history_size, args.history_ttl) {
        (None, None) => publisher,
        (size, ttl) => {
            let ns = args
                .channel
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string();
            // Only what was given changes; the rest (a finished job's TTL) stays.
            let d = publisher.history_for(&ns);
            let policy = HistoryPolicy {
                size: size.unwrap_or(d.size),
                ttl: ttl.map(Duration::from_secs).unwrap_or(d.ttl),
                ..d
            };
            publisher.with_history(&ns, policy)
        }
    };
    let ack = publisher
        .publish_with_key(&args.channel, args.event.as_deref(), &data, &key)
        .await
        .with_context(|| format!("publish failed (idempotency key {key})"))?;
    if args.json_output {
        println!("{}", serde_json::to_string(&ack)?);
    } else {
        println!("{}", ack.offset);
    }
    Ok(())
}

/// Connects, retrying with backoff until `deadline` (a failover may leave a node briefly
/// unable to answer).
async fn connect(url: &str, deadline: tokio::time::Instant) -> anyhow::Result<Publisher> {
    let mut backoff = Duration::from_millis(50);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let error = match tokio::time::timeout(
            left.max(Duration::from_millis(100)),
            Publisher::connect(url),
        )
        .await
        {
            Ok(Ok(publisher)) => return Ok(publisher),
            Ok(Err(e @ fanout_publisher::PublishError::Url(_))) => {
                return Err(e).with_context(|| format!("cannot connect to {url}"))
            }
            Ok(Err(e)) => anyhow::Error::from(e),
            Err(_) => anyhow::anyhow!("timed out"),
        };
        if tokio::time::Instant::now() + backoff >= deadline {
            return Err(error).with_context(|| format!("cannot connect to {url}"));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
