//! `fanout-publish --redis-url URL CHANNEL JSON [--event NAME]`: publishes one message
//! with history (offset + epoch) and prints the offset.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fanout_publisher::{HistoryPolicy, Publisher};
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
    /// Print `{"offset":…,"epoch":…}` instead of the bare offset.
    #[arg(long)]
    json_output: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data = RawValue::from_string(args.json.clone())
        .context("the message data (JSON argument) is not valid JSON")?;
    let publisher =
        tokio::time::timeout(Duration::from_secs(10), Publisher::connect(&args.redis_url))
            .await
            .context("timed out connecting to Redis")?
            .with_context(|| format!("cannot connect to {}", args.redis_url))?;
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
        .publish_raw(&args.channel, args.event.as_deref(), &data)
        .await
        .context("publish failed")?;
    if args.json_output {
        println!("{}", serde_json::to_string(&ack)?);
    } else {
        println!("{}", ack.offset);
    }
    Ok(())
}
