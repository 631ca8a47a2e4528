//! `fanout-loadtest`: runs a named scenario against any fanout URL and prints loss,
//! latency percentiles (publish → receive) and throughput, as a table and as JSON.
//! Every run is bounded in time and count, and targets the URL given (use loopback).
//!
//! Scenario `broadcast`: C clients subscribe to one channel; messages numbered 0..N are
//! published at a fixed rate (through Redis with `--redis-url`, else through
//! `/api/publish`); each client checks it got every number once, in order.

mod clients;
mod report;

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "fanout-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// C clients on one channel, messages at a fixed rate.
    Broadcast(Common),
}

#[derive(clap::Args, Clone)]
pub struct Common {
    /// WebSocket URL of the edge (or the load balancer).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// HS256 secret the edge verifies (tokens are minted here).
    #[arg(long, env = "FANOUT_JWT_SECRET")]
    pub jwt_secret: String,
    /// Publish through Redis with the publisher crate (what workers do).
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Or publish through the server API of this base URL (http://host:port) …
    #[arg(long)]
    pub api: Option<String>,
    /// … with this admin token.
    #[arg(long, env = "FANOUT_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Clients.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Messages per second.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Seconds of publishing (at most 300).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Bytes of padding per message.
    #[arg(long, default_value_t = 0)]
    pub payload: usize,
    /// Channel to use (its namespace goes into the tokens' `channels` claim).
    #[arg(long, default_value = "loadtest:broadcast")]
    pub channel: String,
    /// PID of the edge, to report its RSS and CPU.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Connections opened at once while connecting.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Write the JSON report here too.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Broadcast(c) => broadcast(c).await,
    }
}

async fn broadcast(c: Common) -> anyhow::Result<()> {
    if c.duration == 0 || c.duration > 300 {
        bail!("--duration must be 1..=300 seconds");
    }
    if c.redis_url.is_none() && (c.api.is_none() || c.admin_token.is_none()) {
        bail!("give --redis-url, or --api with --admin-token, to publish");
    }
    let cpu_before = c.server_pid.and_then(report::cpu_seconds);
    let started = Instant::now();
    let mut fleet = clients::Fleet::connect(&c)
        .await
        .context("connecting clients")?;
    let connect_time = started.elapsed();
    eprintln!(
        "{} clients connected and subscribed in {:.2?}",
        c.clients, connect_time
    );
    let rss_connected = c.server_pid.and_then(report::rss_bytes);

    let total = c.rate as u64 * c.duration;
    let publish_started = Instant::now();
    let published = clients::publish(&c, total).await?;
    let publish_time = publish_started.elapsed();
    // Bounded wait for stragglers.
    let results = fleet.finish(published, Duration::from_secs(10)).await;
    let cpu_after = c.server_pid.and_then(report::cpu_seconds);
    let report = report::Report::build(
        "broadcast",
        &c,
        connect_time,
        publish_time,
        published,
        results,
        rss_connected,
        cpu_before.zip(cpu_after).map(|(a, b)| b - a),
    );
    report.print();
    if let Some(path) = &c.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.json())?)?;
    }
    Ok(())
}
