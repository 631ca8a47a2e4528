//! The broker carries messages between nodes. [`Broker`] is the interface the node
//! uses; [`memory::MemoryBroker`] serves a single node with no Redis, and
//! [`redis::RedisBroker`] is the real thing. Incoming messages go to a [`Sink`] (the
//! node's, which decodes each payload once and hands it to the hub); the broker knows
//! nothing of what is behind it.

pub mod memory;
pub mod redis;

#[cfg(test)]
mod contract;

use std::sync::Arc;

use async_trait::async_trait;
use fanout_publisher::{HistoryPolicy, PublishAck};
use serde_json::value::RawValue;
use thiserror::Error;

pub use crate::history::{HistoryQuery, HistoryRead, MAX_HISTORY_READ};

#[derive(Debug, Clone, Error)]
pub enum BrokerError {
    /// The broker cannot be reached; clients get `unavailable`.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The request itself is wrong (bad channel …).
    #[error("{0}")]
    Invalid(String),
}

/// The channel every node subscribes to for cluster-wide operations. `#` cannot occur
/// in a client channel name, so no client can subscribe or publish to it.
pub const CONTROL_CHANNEL: &str = "fanout#control";

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// `memory` or `redis`.
    fn kind(&self) -> &'static str;
    /// Whether the broker is connected and can subscribe and publish.
    fn is_ready(&self) -> bool;
    /// How many subscribe/unsubscribe calls may run at once. Calls that wait for a
    /// free turn are batched, so a burst of subscribes goes out in few commands.
    fn subscribe_calls(&self) -> usize {
        16
    }
    async fn subscribe(&self, channels: &[Arc<str>]) -> Result<(), BrokerError>;
    async fn unsubscribe(&self, channels: &[Arc<str>]) -> Result<(), BrokerError>;
    /// Publishes with history: the message gets the channel's next offset. Resent
    /// through transient broker failures under one idempotency key — the caller's, or a
    /// fresh one — so it is applied at most once. A key already applied on `channel`
    /// within the dedup window is not published again: the answer is the first
    /// publish's offset and epoch, with `duplicate` set.
    async fn publish(
        &self,
        channel: &str,
        event: Option<&str>,
        data: &RawValue,
        history: HistoryPolicy,
        idempotency_key: Option<&str>,
    ) -> Result<PublishAck, BrokerError>;
    /// Reads the channel's epoch, last offset and kept messages, atomically. With
    /// `start`, a channel that has no epoch yet gets one (at offset 0) that lives that
    /// long unless published to: a subscriber always gets a position it can recover from.
    async fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
        start: Option<std::time::Duration>,
    ) -> Result<HistoryRead, BrokerError>;
    /// Publishes `payload` on [`CONTROL_CHANNEL`] to every node (this one included);
    /// returns how many nodes received it.
    async fn broadcast_control(&self, payload: &str) -> Result<usize, BrokerError>;
    /// Stores this node's report (JSON) for `ttl`: a node that stops reporting drops
    /// out of the cluster view.
    async fn report(
        &self,
        node: &str,
        report: &str,
        ttl: std::time::Duration,
    ) -> Result<(), BrokerError>;
    /// The reports of every live node.
    async fn reports(&self) -> Result<Vec<String>, BrokerError>;
    /// Publishes `payload` on `channel` as it is: no offset, no history (presence
    /// notices).
    async fn notify(&self, channel: &str, payload: &str) -> Result<(), BrokerError>;
    /// Records (or refreshes) `client` as present on `channel` with `info` (JSON) until
    /// `ttl` from now, unless refreshed again.
    async fn presence_set(
        &self,
        channel: &str,
        client: &str,
        info: &str,
        ttl: std::time::Duration,
    ) -> Result<(), BrokerError> {
        self.presence_refresh(channel, &[(client.to_string(), info.to_string())], ttl)
            .await
    }
    /// Records (or refreshes) every `(client, info)` of `entries` as present on
    /// `channel` until `ttl` from now, in one step: Redis gets one script call that
    /// writes the entries and keeps the key's expiry beyond theirs, atomically.
    async fn presence_refresh(
        &self,
        channel: &str,
        entries: &[(String, String)],
        ttl: std::time::Duration,
    ) -> Result<(), BrokerError>;
    /// Forgets `client` on `channel`.
    async fn presence_remove(&self, channel: &str, client: &str) -> Result<(), BrokerError>;
    /// Deletes the entries of `clients` on `channel` that have expired, checking each
    /// one's stored expiry at deletion time (atomically, in Redis a script): an entry
    /// refreshed since the caller saw it expired stays. Returns how many were deleted.
    async fn presence_prune(&self, channel: &str, clients: &[String])
        -> Result<usize, BrokerError>;
    /// The info of every client present on `channel` (expired entries left out, and
    /// pruned with [`presence_prune`](Self::presence_prune)).
    async fn presence(&self, channel: &str) -> Result<Vec<String>, BrokerError>;
    /// Closes connections.
    async fn shutdown(&self);
}

/// Where a broker puts what arrives.
pub trait Sink: Send + Sync + 'static {
    /// One message from the broker, as it came.
    // hot path: one call per broker message.
    fn deliver(&self, channel: &str, payload: &[u8]);
    /// The broker connection came back: every channel must be subscribed again.
    fn reconnected(&self);
    /// Messages were skipped between the broker connection and this node.
    fn lagged(&self);
}

/// A shared [`Sink`], as brokers hold it.
pub type SharedSink = Arc<dyn Sink>;
