//! A real `haproxy` in front of edges, for tests, run with the very configuration files
//! shipped in `deploy/haproxy/` (addresses come from the environment they read).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{find_binary, TestkitError};

/// A running haproxy, killed on drop.
pub struct Haproxy {
    addr: SocketAddr,
    child: Child,
}

impl Haproxy {
    /// Starts `haproxy -f config` with `FANOUT_LB_BIND` on a free port and
    /// `FANOUT_EDGE1..3` set to `edges` (up to three), health checks every 500 ms.
    pub fn start(config: &Path, edges: &[SocketAddr]) -> Result<Haproxy, TestkitError> {
        find_binary("haproxy").ok_or(TestkitError::Missing {
            binary: "haproxy",
            package: "haproxy",
        })?;
        let mut last = String::new();
        for _ in 0..5 {
            let addr: SocketAddr = ([127, 0, 0, 1], crate::free_port()).into();
            let mut cmd = Command::new("haproxy");
            cmd.arg("-db")
                .arg("-f")
                .arg(config)
                .env("FANOUT_LB_BIND", addr.to_string())
                .env("FANOUT_LB_CHECK_INTER", "500ms")
                .env("FANOUT_LB_CHECK_FALL", "1")
                .env("FANOUT_LB_CHECK_RISE", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            for (i, edge) in edges.iter().enumerate() {
                cmd.env(format!("FANOUT_EDGE{}", i + 1), edge.to_string());
            }
            let mut child = cmd.spawn()?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(status) = child.try_wait()? {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut err);
                    }
                    last = format!("exited with {status}: {err}");
                    break;
                }
                if std::net::TcpStream::connect(addr).is_ok() {
                    return Ok(Haproxy { addr, child });
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = "not listening within 10 s".into();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(TestkitError::Start("haproxy", last))
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://<addr>/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
