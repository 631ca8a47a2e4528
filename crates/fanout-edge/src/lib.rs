//! # fanout-edge
//!
//! The edge node: terminates WebSockets (hyper 1 + fastwebsockets) and Server-Sent
//! Events, authenticates clients with JWT, subscribes to the broker (Redis via `fred`,
//! or the embedded in-memory broker) once per channel, and fans each message out to
//! local clients.
//!
//! The data path, top to bottom: broker message → the node's broker sink decodes it
//! once → the hub finds the local subscribers → the frame, encoded once per codec, goes
//! into each session's bounded outbox → the transport's writer batches it onto the
//! socket (or the event stream). `docs/architecture.md` draws it.
//!
//! The public surface is what an embedder needs: [`Node`] (start, addresses, drain,
//! shutdown), its [`Settings`] (built from [`Args`], the binary's flags and environment
//! variables), [`NodeError`], [`ConfigError`], and [`auth`] (to mint or check tokens the
//! way the node does).
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use clap::Parser;
//! use fanout_edge::{Args, Node, Settings};
//!
//! // The same flags and environment variables as the `fanout-edge` binary; no
//! // `--redis-url`: the embedded broker.
//! let args = Args::parse_from([
//!     "fanout-edge",
//!     "--listen", "127.0.0.1:0",
//!     "--jwt-secret", "a-secret-of-at-least-32-bytes-0123456789",
//! ]);
//! let node = Node::start(Settings::from_args(args)?).await?;
//! println!("clients connect to {} or {}/sse", node.ws_url(), node.http_url());
//! assert_eq!(node.connections(), 0);
//! // Closes every connection with 1001 over the window, then stops.
//! node.drain(std::time::Duration::ZERO).await;
//! # Ok::<(), anyhow::Error>(())
//! # }).unwrap();
//! ```

mod api;
pub mod auth;
mod broker;
mod client_api;
mod commands;
pub mod config;
mod control;
mod history;
mod http;
mod hub;
mod metrics;
mod node;
mod outbox;
mod positions;
mod presence;
mod ratelimit;
mod repair;
mod respond;
mod rules;
mod session;
mod shared;
mod sink;
mod transport;
mod upstream;
mod wire;

pub use config::{Args, ConfigError, Settings};
pub use node::{Node, NodeError};

/// The hot path's parts, for this crate's benchmarks and white-box tests only
/// (`--features internals`): no stability promise, not for embedders.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod internals {
    pub use crate::broker::{Broker, HistoryRead};
    pub use crate::control::Control;
    pub use crate::hub::{Attach, Attached, Hub, Subscriber};
    pub use crate::outbox::{Outbox, OutboxReader, QueueLimits};
    pub use crate::presence::Presence;
}
