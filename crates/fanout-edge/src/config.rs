//! One configuration: command-line flags with environment variables
//! (docs/operations.md) plus an optional TOML file for limits and namespaces, validated
//! at start into [`Settings`]. Bad configuration is a [`ConfigError`] that names the
//! setting; nothing else in the crate reads the environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use thiserror::Error;

use crate::auth::{Auth, AuthConfigError};
use crate::rules::{Namespace, Namespaces, PublishRule, SubscribeRule};

/// Command line and environment (every flag has an environment variable).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fanout-edge",
    version,
    about = "fanout edge node: WebSocket pub/sub over Redis"
)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "FANOUT_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// redis://, rediss://, redis-cluster://h1:p1,h2:p2 (sharded pub/sub),
    /// redis-sentinel://s1:p1,s2:p2/SERVICE; unset = the
    /// embedded in-memory broker (single node).
    #[arg(long, env = "FANOUT_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Milliseconds between liveness probes (PING) of the idle Redis subscriber
    /// connection; a probe unanswered within the same time forces a reconnect.
    #[arg(long, env = "FANOUT_REDIS_PROBE_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub redis_probe_ms: u64,
    /// Seconds over which a draining node (SIGTERM) closes its connections with 1001,
    /// paced and jittered, so that they do not all reconnect elsewhere at once. Keep
    /// it under the orchestrator's grace period (Kubernetes: 30 s). 0 = all at once.
    #[arg(long, env = "FANOUT_DRAIN_SECS", default_value_t = 25, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub drain_secs: u64,
    /// Seconds a node's report stays in the cluster view of `/api/stats` without being
    /// refreshed (refreshed every third of it): a dead node disappears within it.
    #[arg(long, env = "FANOUT_NODE_REPORT_TTL_SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub node_report_ttl_secs: u64,
    /// Seconds a presence entry lives without being refreshed (refreshed every third of
    /// it): the clients of a node that died leave presence within it.
    #[arg(long, env = "FANOUT_PRESENCE_TTL_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub presence_ttl_secs: u64,
    /// HS256 secret.
    #[arg(long, env = "FANOUT_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Path to a PEM public key (RSA → RS256, EC → ES256, Ed25519 → EdDSA).
    #[arg(long, env = "FANOUT_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// Path to a JWKS file (keys chosen by `kid`).
    #[arg(long, env = "FANOUT_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,
    /// Required `aud`; unchecked when unset.
    #[arg(long, env = "FANOUT_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss`; unchecked when unset.
    #[arg(long, env = "FANOUT_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Bearer token of the server API (`/api/*`); unset = the API answers 403.
    #[arg(long, env = "FANOUT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// This node's id (in `connected` frames, logs and stats); default: the host name.
    #[arg(long, env = "FANOUT_NODE_ID")]
    pub node_id: Option<String>,
    /// Comma-separated Origin allowlist; unset = any Origin.
    #[arg(long, env = "FANOUT_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// TOML file with `[limits]` and `[namespaces.*]`.
    #[arg(long, env = "FANOUT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "FANOUT_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--listen / FANOUT_LISTEN: `{0}` is not an address like 0.0.0.0:8080")]
    Listen(String),
    #[error("--redis-url / FANOUT_REDIS_URL: {0}")]
    RedisUrl(String),
    #[error("{0}")]
    Auth(#[from] AuthConfigError),
    #[error("--admin-token / FANOUT_ADMIN_TOKEN: must be at least 16 characters")]
    AdminToken,
    #[error("--allowed-origins / FANOUT_ALLOWED_ORIGINS: `{0}` is not an origin like https://app.example.com")]
    Origin(String),
    #[error("--config / FANOUT_CONFIG: cannot read {path}: {error}")]
    ReadFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("--config / FANOUT_CONFIG: {path}: {error}")]
    ParseFile { path: PathBuf, error: String },
    #[error("config {setting}: {message}")]
    Invalid { setting: String, message: String },
    #[error("--log-format / FANOUT_LOG_FORMAT: `{0}` is neither `text` nor `json`")]
    LogFormat(String),
}

fn invalid(setting: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting: setting.into(),
        message: message.into(),
    }
}

/// Limits on what clients may do (`[limits]` in the config file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest client message (assembled from fragments), bytes; larger → close 1009.
    pub max_message_size: usize,
    /// Authenticated connections this node holds; more → close 1013.
    pub max_connections: usize,
    /// Upgraded sockets that have not authenticated yet (they do not count against
    /// `max_connections`, so unauthenticated sockets cannot lock real clients out);
    /// more → close 1013.
    pub max_pending_auth: usize,
    /// Sockets from one IP address, authenticated or not; 0 = no limit. More → close
    /// 4008. (Behind a load balancer the peer is the balancer: leave it at 0 there.)
    pub max_connections_per_ip: usize,
    /// Connections of one user (token `sub`) on this node; 0 = no limit. More → close
    /// 4008.
    pub max_connections_per_user: usize,
    /// Channels one connection may subscribe to; more → `limit_exceeded`.
    pub max_subscriptions: usize,
    /// Outbound messages queued per connection before it counts as a slow consumer
    /// (close 4009).
    pub queue_messages: usize,
    /// Outbound bytes queued per connection before it counts as a slow consumer
    /// (close 4009). With `max_connections` this bounds the node's queue memory.
    pub queue_bytes: usize,
    /// Frames and bytes the node may queue on top of those bounds when it replays
    /// messages itself (a `since` recovery, a gap repair). A `since` that does not fit
    /// answers `recovered:false`; a repair that does not fit closes 4009.
    pub replay_messages: usize,
    pub replay_bytes: usize,
    /// Client frames per second (token bucket refill) and burst.
    pub messages_per_second: u32,
    pub message_burst: u32,
    /// Frames rejected with `rate_limited` before the connection is closed with 4008.
    pub rate_limit_strikes: u32,
    /// Seconds a connection without a token has to send `auth`.
    pub auth_timeout_secs: u64,
    /// Seconds a gap repair may keep failing to read history before it gives up: the
    /// channel's subscribers are told `recovered:false` instead of the channel being
    /// held for ever.
    pub repair_timeout_secs: u64,
    /// Bytes the repair holds of all channels may take on this node; past it each
    /// hold drops its oldest messages (they are in history, which the repair reads).
    pub repair_hold_bytes: usize,
    /// Seconds a `subscribe` may wait on the broker (subscription, history read);
    /// later → `unavailable`, with nothing left behind.
    pub subscribe_timeout_secs: u64,
    /// Seconds between server pings; a client silent for two intervals is dropped.
    pub ping_interval_secs: u64,
    /// Largest body of a server API request, bytes.
    pub max_api_body: usize,
    /// Seconds a server API request has to send its whole body (like the 10 s a
    /// request has for its headers); later → 408 and the connection is closed.
    pub api_body_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 64 * 1024,
            max_connections: 20_000,
            max_pending_auth: 1024,
            max_connections_per_ip: 0,
            max_connections_per_user: 0,
            max_subscriptions: 256,
            queue_messages: 1024,
            queue_bytes: 1024 * 1024,
            replay_messages: 10_000,
            replay_bytes: 16 * 1024 * 1024,
            messages_per_second: 50,
            message_burst: 100,
            rate_limit_strikes: 20,
            auth_timeout_secs: 10,
            subscribe_timeout_secs: 10,
            repair_timeout_secs: 30,
            repair_hold_bytes: 64 << 20,
            ping_interval_secs: 25,
            max_api_body: 1024 * 1024,
            api_body_timeout_secs: 10,
        }
    }
}

impl Limits {
    /// The bounds of each connection's outbound queue.
    pub fn queue(&self) -> crate::outbox::QueueLimits {
        crate::outbox::QueueLimits {
            messages: self.queue_messages,
            bytes: self.queue_bytes,
            replay_messages: self.replay_messages,
            replay_bytes: self.replay_bytes,
        }
    }

    pub fn auth_timeout(&self) -> Duration {
        Duration::from_secs(self.auth_timeout_secs)
    }
    pub fn repair_timeout(&self) -> Duration {
        Duration::from_secs(self.repair_timeout_secs)
    }
    pub fn subscribe_timeout(&self) -> Duration {
        Duration::from_secs(self.subscribe_timeout_secs)
    }
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs)
    }
    /// How long a client may go without sending anything (it answers our pings), or
    /// without reading what we write, before it is taken for gone: two ping intervals
    /// and five seconds.
    pub fn silence_timeout(&self) -> Duration {
        self.ping_interval() * 2 + Duration::from_secs(5)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    namespaces: BTreeMap<String, NamespaceFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceFile {
    subscribe: Option<SubscribeRule>,
    publish: Option<PublishRule>,
    history_size: Option<u32>,
    history_ttl_secs: Option<u64>,
    /// How long a finished job's history lives after its terminal message.
    finished_ttl_secs: Option<u64>,
    presence: Option<bool>,
    join_leave: Option<bool>,
    /// Keep only the newest message per channel for a slow consumer instead of 4009.
    conflate: Option<bool>,
}

/// Which broker carries messages between nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerSettings {
    /// The embedded in-memory broker: one node, no Redis.
    Memory,
    Redis {
        url: String,
        /// Interval and timeout of the subscriber connection's liveness probe.
        probe: Duration,
    },
}

/// Validated configuration, shared as `Arc<Settings>`.
pub struct Settings {
    pub listen: SocketAddr,
    pub broker: BrokerSettings,
    pub auth: Auth,
    pub admin_token: Option<String>,
    pub node_id: String,
    pub allowed_origins: Option<Vec<String>>,
    pub limits: Limits,
    pub namespaces: Namespaces,
    pub log_json: bool,
    /// How long a drain takes to close every connection.
    pub drain: Duration,
    /// How long a node's report lives in the cluster view.
    pub node_report_ttl: Duration,
    pub presence_ttl: Duration,
    /// Set in dev mode: a ready-to-use token for user `demo`, printed at start.
    pub dev_token: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets are never printed.
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("broker", &self.broker)
            .field("node_id", &self.node_id)
            .field("allowed_origins", &self.allowed_origins)
            .field("limits", &self.limits)
            .field("dev_mode", &self.dev_token.is_some())
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Validates `args` (and the file it names).
    pub fn from_args(args: Args) -> Result<Settings, ConfigError> {
        let listen: SocketAddr = args
            .listen
            .parse()
            .map_err(|_| ConfigError::Listen(args.listen.clone()))?;
        let broker = match args.redis_url.as_deref().map(str::trim) {
            None | Some("") => BrokerSettings::Memory,
            Some(url) => {
                fanout_publisher::redis_config(url)
                    .map_err(|e| ConfigError::RedisUrl(e.to_string()))?;
                BrokerSettings::Redis {
                    url: url.to_string(),
                    probe: Duration::from_millis(args.redis_probe_ms),
                }
            }
        };
        let file = match &args.config {
            None => FileConfig::default(),
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|error| ConfigError::ReadFile {
                        path: path.clone(),
                        error,
                    })?;
                toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
                    path: path.clone(),
                    error: e.to_string(),
                })?
            }
        };
        validate_limits(&file.limits)?;
        let namespaces = build_namespaces(file.namespaces)?;

        let keys_configured =
            args.jwt_secret.is_some() || args.jwt_public_key.is_some() || args.jwt_jwks.is_some();
        let (auth, admin_token, dev_token) = if keys_configured {
            let auth = Auth::from_config(
                args.jwt_secret.as_deref(),
                args.jwt_public_key.as_deref(),
                args.jwt_jwks.as_deref(),
                args.jwt_audience.clone(),
                args.jwt_issuer.clone(),
            )?;
            (auth, args.admin_token.clone(), None)
        } else {
            let secret = random_token(48);
            let auth = Auth::from_config(
                Some(&secret),
                None,
                None,
                args.jwt_audience.clone(),
                args.jwt_issuer.clone(),
            )?;
            let admin = args.admin_token.clone().unwrap_or_else(|| random_token(32));
            let token = auth.dev_token("demo", &secret, &["job_progress:*"]);
            (auth, Some(admin), Some(token))
        };
        if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(ConfigError::AdminToken);
        }
        let allowed_origins = match args.allowed_origins {
            None => None,
            Some(list) => {
                let list: Vec<String> = list
                    .into_iter()
                    .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                    .filter(|o| !o.is_empty())
                    .collect();
                if let Some(bad) = list
                    .iter()
                    .find(|o| !(o.starts_with("http://") || o.starts_with("https://")) && *o != "*")
                {
                    return Err(ConfigError::Origin(bad.clone()));
                }
                if list.iter().any(|o| o == "*") {
                    None
                } else {
                    Some(list)
                }
            }
        };
        let log_json = match args.log_format.as_str() {
            "text" => false,
            "json" => true,
            other => return Err(ConfigError::LogFormat(other.to_string())),
        };
        let node_id = args
            .node_id
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(host_name);
        Ok(Settings {
            listen,
            broker,
            auth,
            admin_token,
            node_id,
            allowed_origins,
            limits: file.limits,
            namespaces,
            log_json,
            drain: Duration::from_secs(args.drain_secs),
            node_report_ttl: Duration::from_secs(args.node_report_ttl_secs),
            presence_ttl: Duration::from_secs(args.presence_ttl_secs),
            dev_token,
        })
    }

    pub fn dev_mode(&self) -> bool {
        self.dev_token.is_some()
    }
}

fn validate_limits(l: &Limits) -> Result<(), ConfigError> {
    let checks: [(&str, bool, &str); 16] = [
        (
            "limits.max_message_size",
            l.max_message_size >= 256,
            "must be at least 256",
        ),
        (
            "limits.max_connections",
            l.max_connections >= 1,
            "must be at least 1",
        ),
        (
            "limits.max_pending_auth",
            l.max_pending_auth >= 1,
            "must be at least 1",
        ),
        (
            "limits.max_subscriptions",
            l.max_subscriptions >= 1,
            "must be at least 1",
        ),
        (
            "limits.queue_messages",
            l.queue_messages >= 1,
            "must be at least 1",
        ),
        (
            "limits.queue_bytes",
            l.queue_bytes >= 1024,
            "must be at least 1024",
        ),
        (
            "limits.replay_messages",
            l.replay_messages >= 1,
            "must be at least 1",
        ),
        (
            "limits.replay_bytes",
            l.replay_bytes >= 1024,
            "must be at least 1024",
        ),
        (
            "limits.messages_per_second",
            l.messages_per_second >= 1,
            "must be at least 1",
        ),
        (
            "limits.message_burst",
            l.message_burst >= 1,
            "must be at least 1",
        ),
        (
            "limits.auth_timeout_secs",
            l.auth_timeout_secs >= 1,
            "must be at least 1",
        ),
        (
            "limits.ping_interval_secs",
            l.ping_interval_secs >= 1,
            "must be at least 1",
        ),
        (
            "limits.repair_timeout_secs",
            l.repair_timeout_secs >= 1,
            "must be at least 1",
        ),
        (
            "limits.repair_hold_bytes",
            l.repair_hold_bytes >= 1024,
            "must be at least 1024",
        ),
        (
            "limits.subscribe_timeout_secs",
            l.subscribe_timeout_secs >= 1,
            "must be at least 1",
        ),
        (
            "limits.api_body_timeout_secs",
            l.api_body_timeout_secs >= 1,
            "must be at least 1",
        ),
    ];
    for (setting, ok, message) in checks {
        if !ok {
            return Err(invalid(setting, message));
        }
    }
    Ok(())
}

fn build_namespaces(file: BTreeMap<String, NamespaceFile>) -> Result<Namespaces, ConfigError> {
    let mut namespaces = Namespaces::builtin();
    for (name, ns) in file {
        let setting = format!("namespaces.{name}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(setting, "a namespace name is [A-Za-z0-9_-]+"));
        }
        let builtin = namespaces.get(&name).cloned();
        if builtin.is_some() && (ns.subscribe.is_some() || ns.publish.is_some()) {
            return Err(invalid(
                format!("{setting}.subscribe"),
                "the rules of built-in namespaces (user, job_progress) are fixed; only history, finished_ttl_secs, conflate, presence and join_leave can be set",
            ));
        }
        if ns.join_leave == Some(true) && ns.presence == Some(false) {
            return Err(invalid(
                format!("{setting}.join_leave"),
                "needs presence (join/leave events announce presence changes); drop `presence = false`",
            ));
        }
        let base = builtin.unwrap_or_else(|| Namespace::configured(&name));
        let history_ttl = ns
            .history_ttl_secs
            .map(Duration::from_secs)
            .unwrap_or(base.history.ttl);
        if history_ttl.is_zero() {
            return Err(invalid(
                format!("{setting}.history_ttl_secs"),
                "must be at least 1",
            ));
        }
        namespaces.insert(Namespace {
            name: name.clone(),
            subscribe: ns.subscribe.unwrap_or(base.subscribe),
            publish: ns.publish.unwrap_or(base.publish),
            history: fanout_publisher::HistoryPolicy {
                size: ns.history_size.unwrap_or(base.history.size),
                ttl: history_ttl,
                finished_ttl: match ns.finished_ttl_secs {
                    Some(0) => {
                        return Err(invalid(
                            format!("{setting}.finished_ttl_secs"),
                            "must be at least 1",
                        ))
                    }
                    Some(s) => Some(Duration::from_secs(s)),
                    None => base.history.finished_ttl,
                },
            },
            presence: ns.presence.unwrap_or(base.presence) || ns.join_leave == Some(true),
            join_leave: ns.join_leave.unwrap_or(base.join_leave),
            conflate: ns.conflate.unwrap_or(base.conflate),
        });
    }
    Ok(namespaces)
}

/// A random alphanumeric string.
pub(crate) fn random_token(len: usize) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("node-{}", random_token(6)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, ConfigError> {
        let mut full = vec!["fanout-edge"];
        full.extend_from_slice(args);
        Settings::from_args(Args::try_parse_from(full).unwrap())
    }

    #[test]
    fn no_key_is_dev_mode_with_admin_token() {
        let s = parse(&[]).unwrap();
        assert!(s.dev_mode());
        assert!(s.admin_token.as_ref().unwrap().len() >= 16);
        assert_eq!(s.broker, BrokerSettings::Memory);
        let p = s
            .auth
            .verify_connection(s.dev_token.as_ref().unwrap())
            .unwrap();
        assert_eq!(&*p.user, "demo");
    }

    #[test]
    fn bad_settings_are_named() {
        let e = parse(&["--listen", "nope"]).unwrap_err().to_string();
        assert!(e.contains("--listen"), "{e}");
        let e = parse(&["--redis-url", "http://x"]).unwrap_err().to_string();
        assert!(e.contains("FANOUT_REDIS_URL"), "{e}");
        let e = parse(&[
            "--jwt-secret",
            "s3cret-s3cret-s3cret-s3cret",
            "--admin-token",
            "short",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("FANOUT_ADMIN_TOKEN"), "{e}");
        parse(&[
            "--redis-url",
            "redis-cluster://127.0.0.1:7000,127.0.0.1:7001",
        ])
        .expect("a cluster URL is accepted");
        let e = parse(&["--redis-url", "redis-sentinel://127.0.0.1:26379"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("FANOUT_REDIS_URL") && e.contains("service name"),
            "{e}"
        );
        let e = parse(&["--allowed-origins", "app.example.com"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("FANOUT_ALLOWED_ORIGINS"), "{e}");
        let e = parse(&["--jwt-public-key", "/nonexistent.pem"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("FANOUT_JWT_PUBLIC_KEY"), "{e}");
    }

    #[test]
    fn config_file_is_validated() {
        let dir = std::env::temp_dir().join(format!("fanout-cfg-{}", random_token(8)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[limits]\nmax_subscriptions = 0\n").unwrap();
        let e = parse(&["--config", path.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.max_subscriptions"), "{e}");
        std::fs::write(&path, "[namespaces.user]\nsubscribe = \"authenticated\"\n").unwrap();
        let e = parse(&["--config", path.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("namespaces.user"), "{e}");
        std::fs::write(
            &path,
            "[namespaces.chat]\npresence = false\njoin_leave = true\n",
        )
        .unwrap();
        let e = parse(&["--config", path.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("namespaces.chat.join_leave"), "{e}");
        std::fs::write(&path, "[limits]\nbogus = 1\n").unwrap();
        let e = parse(&["--config", path.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        std::fs::write(
            &path,
            "[namespaces.chat]\nsubscribe = \"authenticated\"\npublish = \"subscribers\"\nhistory_size = 10\n",
        )
        .unwrap();
        let s = parse(&["--config", path.to_str().unwrap()]).unwrap();
        let chat = s.namespaces.get("chat").unwrap();
        assert_eq!(chat.subscribe, SubscribeRule::Authenticated);
        assert_eq!(chat.history.size, 10);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
