//! The broker carries messages between nodes. [`Broker`] is the interface the node
//! uses; [`memory::MemoryBroker`] serves a single node with no Redis, and
//! [`redis::RedisBroker`] is the real thing. Incoming messages go to a [`BrokerSink`],
//! which decodes each payload once and hands it to the hub.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use fanout_protocol::Envelope;
use fanout_publisher::{HistoryPolicy, PublishAck};
use serde_json::value::RawValue;
use thiserror::Error;

use crate::hub::Hub;
use crate::metrics as m;
use crate::subscriptions::Subscriptions;

#[derive(Debug, Clone, Error)]
pub enum BrokerError {
    /// The broker cannot be reached; clients get `unavailable`.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The request itself is wrong (bad channel …).
    #[error("{0}")]
    Invalid(String),
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// `memory` or `redis`.
    fn kind(&self) -> &'static str;
    /// Whether the broker is connected and can subscribe and publish.
    fn is_ready(&self) -> bool;
    async fn subscribe(&self, channels: &[Arc<str>]) -> Result<(), BrokerError>;
    async fn unsubscribe(&self, channels: &[Arc<str>]) -> Result<(), BrokerError>;
    /// Publishes with history: the message gets the channel's next offset.
    async fn publish(
        &self,
        channel: &str,
        event: Option<&str>,
        data: &RawValue,
        history: HistoryPolicy,
    ) -> Result<PublishAck, BrokerError>;
    /// Closes connections.
    async fn shutdown(&self);
}

/// Where a broker puts what arrives.
#[derive(Clone)]
pub struct BrokerSink {
    hub: Arc<Hub>,
    subscriptions: Subscriptions,
}

impl BrokerSink {
    pub(crate) fn new(hub: Arc<Hub>, subscriptions: Subscriptions) -> BrokerSink {
        BrokerSink { hub, subscriptions }
    }

    /// One message from the broker: decoded once, dispatched to local subscribers. A
    /// bug on this path is contained to this one message (logged and counted), so it
    /// can never stop delivery for the whole node.
    pub fn deliver(&self, channel: &str, payload: &[u8]) {
        let delivered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.deliver_inner(channel, payload)
        }));
        if delivered.is_err() {
            metrics::counter!(m::INTERNAL_ERRORS_TOTAL, "place" => "deliver").increment(1);
            tracing::error!(%channel, bytes = payload.len(), "bug: delivering a message panicked; this message was not delivered by this node");
        }
    }

    fn deliver_inner(&self, channel: &str, payload: &[u8]) {
        let now = fanout_protocol::now_ms();
        let envelope = Envelope::decode(payload, now);
        metrics::counter!(m::BROKER_MESSAGES_TOTAL).increment(1);
        metrics::histogram!(m::PUBSUB_LAG_SECONDS)
            .record(now.saturating_sub(envelope.ts) as f64 / 1000.0);
        let n = self.hub.dispatch(channel, &envelope);
        metrics::counter!(m::DELIVERIES_TOTAL).increment(n as u64);
    }

    /// The broker connection came back: every channel must be subscribed again.
    pub fn reconnected(&self) {
        self.subscriptions.resubscribe();
    }
}
