//! # fanout-testkit
//!
//! Real parts for tests: [`RedisServer`] starts a `redis-server` process on a free
//! loopback port in its own temporary directory and kills it on drop (never port 6379);
//! [`WsClient`] is a WebSocket client (tokio-tungstenite, independent of the server's
//! fastwebsockets) and [`SseClient`] an event-stream client, with assertions that name
//! what they expected.
//!
//! ```
//! let redis = fanout_testkit::RedisServer::start().expect("redis-server");
//! assert_ne!(redis.port(), 6379);
//! assert_eq!(redis.cli(&["PING"]).unwrap(), "PONG");
//! // Killed, and its directory removed, when dropped.
//! ```

mod cluster;
mod haproxy;
mod http;
mod raw;
mod redis;
mod sentinel;
mod sse;
mod ws;

pub use cluster::{ClusterNode, RedisCluster};
pub use haproxy::Haproxy;
pub use http::http;
pub use raw::{RawFrame, RawWs};
pub use redis::{find_binary, RedisOptions, RedisServer, TestkitError};
pub use sentinel::{RedisSentinel, SENTINEL_SERVICE};
pub use sse::{SseClient, SseEvent};
pub use ws::{Incoming, WsClient};

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}
