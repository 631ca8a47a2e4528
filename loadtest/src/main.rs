//! `fanout-loadtest`: runs a named scenario against a fanout edge — one node, the local
//! cluster behind haproxy, or any `ws://` URL — and prints a table and JSON: loss,
//! latency percentiles (publish → receive, HDR histogram), throughput, and the server's
//! RSS and CPU when given its PIDs. `--plot` writes the latency distribution as SVG.
//!
//! Scenarios:
//! - `broadcast`: C clients on one channel, numbered messages at a fixed rate.
//! - `per-user`: client i on `user:lt<i>`, messages to random users at a fixed rate.
//! - `job-progress`: J jobs with W watchers each; every job publishes progress every
//!   100 ms, then a terminal event that ends its subscriptions.
//! - `churn`: connect → authenticate → subscribe → close, at a fixed rate.
//! - `idle`: C connected, authenticated, subscribed clients held for a while: connect
//!   time and server memory per connection.
//! - `storm`: C clients through a load balancer reconnect, as the browser SDK does,
//!   while one edge is drained and another killed: reconnect time per client, loss,
//!   duplicates, resets, and the connect rate the surviving edges see.
//!
//! `--transport sse` (broadcast, idle) has each client open an event stream
//! (`GET /sse?channel=…`, beside the WebSocket `--url`) instead of a WebSocket; its
//! messages are counted and timed the same way.
//!
//! Every run is bounded: durations are capped, every wait has a deadline, and the whole
//! run has a hard time limit. Tokens are minted here (HS256, `--jwt-secret`). Clients
//! connect from 127.0.0.2–127.0.0.9 when the target is on loopback, so that 10k+
//! sockets do not exhaust one address's source ports.

mod client;
mod publish;
mod report;
mod scenario;
mod sse;
mod storm;
mod transport;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "fanout-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// C clients on one channel; numbered messages at --rate per second.
    Broadcast {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        publish: PublishOpts,
        /// Channel every client subscribes to (its namespace goes into the tokens'
        /// `channels` claim).
        #[arg(long, default_value = "loadtest:broadcast")]
        channel: String,
    },
    /// Client i on `user:lt<i>`; --rate messages per second in all, each to a random user.
    PerUser {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        publish: PublishOpts,
    },
    /// --clients / --watchers jobs on `job_progress:lt<j>`, each publishing progress
    /// every --interval-ms for --duration seconds, then `status: succeeded`.
    JobProgress {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        publish: PublishOpts,
        /// Watchers per job.
        #[arg(long, default_value_t = 3)]
        watchers: usize,
        /// Milliseconds between a job's progress events.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
    /// Connect → authenticate → subscribe → close cycles at --rate per second for
    /// --duration seconds, at most --clients in flight.
    Churn {
        #[command(flatten)]
        common: Common,
        /// Cycles started per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// Subscribe every cycle to this one channel instead of its own `user:` channel.
        #[arg(long)]
        channel: Option<String>,
    },
    /// C clients connected, authenticated and subscribed (each on its own `user:`
    /// channel, or all on --channel), held for --duration seconds.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Subscribe every client to this one channel instead of its own `user:` channel.
        #[arg(long)]
        channel: Option<String>,
    },
    /// C clients (default 10,000) through one URL, each on its own `user:` channel (or
    /// one of --shared K), --rate messages per second over all channels (default 2000)
    /// for --duration seconds (default 30); --drain-pid is drained at --drain-at and
    /// --kill-pid killed at --kill-at; clients reconnect as the browser SDK does and
    /// resubscribe with `since`. Reports reconnect times per event, loss, duplicates,
    /// resets and the peak connect rate.
    Storm {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        publish: PublishOpts,
        #[command(flatten)]
        storm: storm::StormOpts,
    },
}

#[derive(Args, Clone)]
pub struct Common {
    /// WebSocket URL of an edge or of the load balancer in front of the edges.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// HS256 secret the edge verifies (tokens are minted here).
    #[arg(long, env = "FANOUT_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// Clients (for churn: the most cycles in flight).
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Seconds of load (publishing, churning or holding idle), at most 300.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// PID of an edge whose RSS and CPU to report; repeat for a cluster (summed).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 512)]
    pub connect_concurrency: usize,
    /// Source addresses 127.0.0.2 … 127.0.0.(1+N) for loopback targets (1–8).
    #[arg(long, default_value_t = 8)]
    pub sources: u8,
    /// Seconds to wait for the last messages once publishing ended.
    #[arg(long, default_value_t = 10)]
    pub grace: u64,
    /// Write the JSON report here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the latency distribution here (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// How clients connect: WebSocket, or Server-Sent Events at the `/sse` beside
    /// --url's `/ws` (broadcast and idle only).
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Ws,
    Sse,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}

#[derive(Args, Clone)]
pub struct PublishOpts {
    /// Publish through Redis with the publisher crate, as job workers do.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Or through `POST /api/publish` of this base URL (http://host:port) …
    #[arg(long)]
    pub api: Option<String>,
    /// … with this admin token.
    #[arg(long, env = "FANOUT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Messages per second (broadcast, per-user).
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Bytes of padding in every message.
    #[arg(long, default_value_t = 0)]
    pub payload: usize,
}

/// The most clients or cycles in flight one run may open.
const MAX_CLIENTS: usize = 60_000;

impl Common {
    fn check(&self) -> anyhow::Result<()> {
        if self.duration == 0 || self.duration > 300 {
            bail!("--duration must be 1..=300 seconds");
        }
        if self.clients == 0 || self.clients > MAX_CLIENTS {
            bail!("--clients must be 1..={MAX_CLIENTS}");
        }
        if !(1..=8).contains(&self.sources) {
            bail!("--sources must be 1..=8");
        }
        if self.grace > 120 {
            bail!("--grace must be at most 120 seconds");
        }
        Ok(())
    }

    /// For the scenarios that have no event-stream clients.
    fn ws_only(&self, scenario: &str) -> anyhow::Result<()> {
        if self.transport == Transport::Sse {
            bail!(
                "--transport sse is for broadcast and idle; {scenario} runs over WebSockets only"
            );
        }
        Ok(())
    }

    /// The hard limit of the whole run: connecting, the load, the grace period, and
    /// slack for reporting.
    fn deadline(&self) -> Duration {
        Duration::from_secs(self.duration + self.grace + 180)
    }
}

impl PublishOpts {
    fn check(&self) -> anyhow::Result<()> {
        if self.redis_url.is_none() && (self.api.is_none() || self.admin_token.is_none()) {
            bail!("give --redis-url, or --api with --admin-token, to publish");
        }
        if self.rate == 0 || self.rate > 1_000_000 {
            bail!("--rate must be 1..=1000000");
        }
        if self.payload > 1 << 20 {
            bail!("--payload must be at most 1 MiB");
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    // 10k+ sockets need more than the default soft limit of open files.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (
        Scenario::Storm {
            common, publish, ..
        },
        Some(m),
    ) = (&mut cli.scenario, matches.subcommand_matches("storm"))
    {
        // The storm's own defaults, where the command line gave none.
        let default = |id: &str| m.value_source(id) != Some(ValueSource::CommandLine);
        if default("clients") {
            common.clients = 10_000;
        }
        if default("duration") {
            common.duration = 30;
        }
        if default("grace") {
            common.grace = 20;
        }
        if default("rate") {
            publish.rate = 2000;
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (common, run) = match cli.scenario {
            Scenario::Broadcast {
                common,
                publish,
                channel,
            } => {
                publish.check()?;
                let run = scenario::broadcast(common.clone(), publish, channel);
                (common, Box::pin(run) as scenario::Run)
            }
            Scenario::PerUser { common, publish } => {
                common.ws_only("per-user")?;
                publish.check()?;
                let run = scenario::per_user(common.clone(), publish);
                (common, Box::pin(run) as scenario::Run)
            }
            Scenario::JobProgress {
                common,
                publish,
                watchers,
                interval_ms,
            } => {
                common.ws_only("job-progress")?;
                publish.check()?;
                if watchers == 0 || watchers > common.clients {
                    bail!("--watchers must be 1..=--clients");
                }
                if !(10..=60_000).contains(&interval_ms) {
                    bail!("--interval-ms must be 10..=60000");
                }
                let run = scenario::job_progress(common.clone(), publish, watchers, interval_ms);
                (common, Box::pin(run) as scenario::Run)
            }
            Scenario::Churn {
                common,
                rate,
                channel,
            } => {
                common.ws_only("churn")?;
                if rate == 0 || rate > 100_000 {
                    bail!("--rate must be 1..=100000 cycles per second");
                }
                let run = scenario::churn(common.clone(), rate, channel);
                (common, Box::pin(run) as scenario::Run)
            }
            Scenario::Idle { common, channel } => {
                let run = scenario::idle(common.clone(), channel);
                (common, Box::pin(run) as scenario::Run)
            }
            Scenario::Storm {
                common,
                publish,
                storm,
            } => {
                common.ws_only("storm")?;
                publish.check()?;
                common.check()?;
                storm.check(&common)?;
                let run = storm::storm(common.clone(), publish, storm);
                (common, Box::pin(run) as scenario::Run)
            }
        };
        common.check()?;
        let limit = common.deadline();
        let report = match tokio::time::timeout(limit, run).await {
            Ok(report) => report?,
            Err(_) => bail!("the run passed its hard limit of {limit:?}"),
        };
        report.print();
        if let Some(path) = &common.json {
            std::fs::write(path, serde_json::to_string_pretty(report.json())?)?;
        }
        if let Some(path) = &common.plot {
            report.plot(path)?;
            eprintln!("plot written to {}", path.display());
        }
        Ok(())
    })
}
