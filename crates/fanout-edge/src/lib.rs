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
pub mod broker;
pub mod config;
pub mod control;
pub mod history;
mod http;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod presence;
pub mod recovery;
pub mod rules;
mod session;
mod sink;
pub mod subscriptions;
mod wire;

pub use config::{Args, ConfigError, Settings};
pub use node::{Node, NodeError};
