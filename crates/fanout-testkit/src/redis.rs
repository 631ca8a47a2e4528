//! `redis-server` processes for tests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TestkitError {
    #[error("`{binary}` is not installed: run `apt-get update && apt-get install -y {package}` (scripts/test.sh installs it for you)")]
    Missing {
        binary: &'static str,
        package: &'static str,
    },
    #[error("{0} did not start: {1}")]
    Start(&'static str, String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis-cli {args:?} failed: {stderr}")]
    Cli { args: Vec<String>, stderr: String },
}

/// Finds an executable on `PATH`.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Turn on the append-only file, so that data survives `kill -9` + restart.
    pub appendonly: bool,
    /// Extra `--name value` arguments.
    pub args: Vec<String>,
}

/// A running `redis-server`, killed on drop.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    options: RedisOptions,
    child: Option<Child>,
    /// Holds the port while the server is killed, so that no other test's server can
    /// take it before [`restart`](RedisServer::restart) (clients of this one would then
    /// reach the wrong server).
    reserved: Option<tokio::net::TcpSocket>,
}

impl RedisServer {
    /// Starts a server without persistence.
    pub fn start() -> Result<RedisServer, TestkitError> {
        Self::start_with(RedisOptions::default())
    }

    pub fn start_with(options: RedisOptions) -> Result<RedisServer, TestkitError> {
        find_binary("redis-server").ok_or(TestkitError::Missing {
            binary: "redis-server",
            package: "redis-server",
        })?;
        let dir = tempfile::tempdir()?;
        let mut last_error = String::new();
        // A freed port can be taken by someone else before we bind it: try a few.
        for _ in 0..5 {
            let mut server = RedisServer {
                port: crate::free_port(),
                dir: tempfile::tempdir()?,
                options: options.clone(),
                child: None,
                reserved: None,
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last_error = e.to_string(),
            }
        }
        drop(dir);
        Err(TestkitError::Start("redis-server", last_error))
    }

    fn spawn(&mut self) -> Result<(), TestkitError> {
        self.reserved = None;
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--appendonly",
                if self.options.appendonly { "yes" } else { "no" },
            ])
            .args(["--appendfsync", "always", "--logfile", "redis.log"])
            .args(&self.options.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                let log =
                    std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
                return Err(TestkitError::Start(
                    "redis-server",
                    format!("exited with {status}: {log}"),
                ));
            }
            if ping(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TestkitError::Start(
                    "redis-server",
                    "no PONG within 10 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `kill -9` the server (its port stays reserved for [`restart`](Self::restart)).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            // Bound but not listening: connections are refused as from a dead server,
            // and no other server can bind the port.
            self.reserved = tokio::net::TcpSocket::new_v4().ok().filter(|socket| {
                socket
                    .bind(std::net::SocketAddr::from(([127, 0, 0, 1], self.port)))
                    .is_ok()
            });
        }
    }

    /// Freezes the server (`SIGSTOP`): connections stay open but nothing is answered,
    /// like a hung host. [`resume`](Self::resume) undoes it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a [`pause`](Self::pause)d server run again (`SIGCONT`).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .arg(signal)
                .arg(child.id().to_string())
                .status()
                .expect("kill(1) runs");
            assert!(status.success(), "kill {signal} failed");
        }
    }

    /// Starts the server again on the same port and directory (so an append-only file
    /// is replayed).
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Runs `redis-cli -p <port> ARGS…` and returns its trimmed output.
    pub fn cli(&self, args: &[&str]) -> Result<String, TestkitError> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => TestkitError::Missing {
                    binary: "redis-cli",
                    package: "redis-tools",
                },
                _ => TestkitError::Io(e),
            })?;
        if !out.status.success() {
            return Err(TestkitError::Cli {
                args: args.iter().map(|s| s.to_string()).collect(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `PUBSUB NUMSUB channel` → the number of subscribers Redis counts.
    pub fn numsub(&self, channel: &str) -> Result<u64, TestkitError> {
        let out = self.cli(&["PUBSUB", "NUMSUB", channel])?;
        Ok(out
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A paused server would ignore SIGKILL's cleanup until continued.
        self.resume();
        self.kill();
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_names_the_install_command() {
        assert!(find_binary("surely-no-such-binary-here").is_none());
        let e = TestkitError::Missing {
            binary: "redis-server",
            package: "redis-server",
        };
        assert!(
            e.to_string().contains("apt-get install -y redis-server"),
            "{e}"
        );
    }
}
