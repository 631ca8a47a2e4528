//! Redis Sentinel for tests: a primary, a replica and one `redis-server --sentinel`
//! watching them (quorum 1), all on free loopback ports.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{RedisOptions, RedisServer, TestkitError};

/// The service name the sentinel monitors.
pub const SENTINEL_SERVICE: &str = "fanout";

/// A primary + replica under one sentinel; everything is killed on drop.
pub struct RedisSentinel {
    nodes: Vec<RedisServer>,
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl RedisSentinel {
    pub fn start() -> Result<RedisSentinel, TestkitError> {
        let primary = RedisServer::start()?;
        let replica = RedisServer::start_with(RedisOptions {
            appendonly: false,
            args: vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                primary.port().to_string(),
            ],
        })?;
        let dir = tempfile::tempdir()?;
        let port = crate::free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n\
                 sentinel failover-timeout {SENTINEL_SERVICE} 5000\n",
                dir.path().display(),
                primary.port()
            ),
        )?;
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let sentinel = RedisSentinel {
            nodes: vec![primary, replica],
            port,
            child,
            _dir: dir,
        };
        // Ready when the sentinel knows the replica and the replica is in sync.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let replicas = sentinel
                .cli(&["SENTINEL", "REPLICAS", SENTINEL_SERVICE])
                .unwrap_or_default();
            let synced = sentinel.nodes[1]
                .cli(&["INFO", "replication"])
                .unwrap_or_default()
                .contains("master_link_status:up");
            if synced && replicas.contains(&sentinel.nodes[1].port().to_string()) {
                return Ok(sentinel);
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Start(
                    "redis sentinel",
                    "replica not known to the sentinel within 20 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis-sentinel://127.0.0.1:<sentinel port>/<service>`
    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}/{SENTINEL_SERVICE}",
            self.port
        )
    }

    /// `redis-cli -p <sentinel port> ARGS…`
    pub fn cli(&self, args: &[&str]) -> Result<String, TestkitError> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The port of the current primary, as the sentinel names it.
    pub fn primary_port(&self) -> Option<u16> {
        let out = self
            .cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE])
            .ok()?;
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// `SENTINEL FAILOVER`: the replica is promoted (after catching up); returns its port
    /// once the sentinel names it and it answers as a primary.
    pub fn failover(&self) -> Result<u16, TestkitError> {
        let old = self.primary_port();
        self.cli(&["SENTINEL", "FAILOVER", SENTINEL_SERVICE])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(new) = self.primary_port().filter(|p| Some(*p) != old) {
                let node = self.nodes.iter().find(|n| n.port() == new);
                if node.is_some_and(|n| n.cli(&["ROLE"]).unwrap_or_default().starts_with("master"))
                {
                    return Ok(new);
                }
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Start(
                    "redis sentinel",
                    "failover did not finish within 30 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
