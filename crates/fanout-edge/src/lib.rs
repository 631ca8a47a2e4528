//! # fanout-edge
//!
//! The edge node: terminates WebSockets (hyper 1 + fastwebsockets), authenticates
//! clients with JWT, subscribes to the broker (Redis via `fred`, or the embedded
//! in-memory broker) once per channel, and fans each message out to local sockets.
//!
//! The data path, top to bottom: broker message → the node's broker sink decodes it once
//! → [`hub::Hub`] finds the local subscribers → the frame, encoded once per codec, goes
//! into each session's bounded [`hub::Outbox`] → the session's writer batches it onto
//! the socket.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use clap::Parser;
//! use fanout_edge::{Args, Node, Settings};
//!
//! let settings = Settings::from_args(Args::parse_from(["fanout-edge", "--listen", "127.0.0.1:0"]))?;
//! let node = Node::start(settings).await?;
//! println!("clients connect to {}", node.ws_url());
//! node.shutdown().await;
//! # Ok(()) }
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
