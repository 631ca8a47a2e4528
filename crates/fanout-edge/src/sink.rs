//! The node's side of the broker: [`BrokerSink`] receives what the broker delivers,
//! decodes each payload once and hands it to the hub, and turns broker reconnects and
//! lags into resubscriptions and repairs. The broker sees it only as a [`Sink`].

use std::sync::Arc;

use fanout_protocol::Envelope;

use crate::broker::{Sink, CONTROL_CHANNEL};
use crate::hub::Hub;
use crate::metrics as m;
use crate::upstream::Upstream;

/// The node's [`Sink`]: decodes each broker payload once and hands it to the hub;
/// asks for resubscriptions and repairs when the broker reconnects or lags.
#[derive(Clone)]
pub struct BrokerSink {
    hub: Arc<Hub>,
    upstream: Upstream,
    repairs: crate::repair::Repairs,
    control: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
}

impl BrokerSink {
    pub(crate) fn new(
        hub: Arc<Hub>,
        upstream: Upstream,
        repairs: crate::repair::Repairs,
        control: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    ) -> BrokerSink {
        BrokerSink {
            hub,
            upstream,
            repairs,
            control,
        }
    }
}

impl Sink for BrokerSink {
    /// One message from the broker: decoded once, dispatched to local subscribers. A
    /// bug on this path is contained to this one message (logged and counted), so it
    /// can never stop delivery for the whole node.
    fn deliver(&self, channel: &str, payload: &[u8]) {
        if channel == CONTROL_CHANNEL {
            let _ = self.control.send(payload.to_vec());
            return;
        }
        let delivered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.deliver_inner(channel, payload)
        }));
        if delivered.is_err() {
            metrics::counter!(m::INTERNAL_ERRORS_TOTAL, "place" => "deliver").increment(1);
            tracing::error!(%channel, bytes = payload.len(), "bug: delivering a message panicked; this message was not delivered by this node");
        }
    }

    /// The broker connection came back: every channel must be subscribed again.
    fn reconnected(&self) {
        self.upstream.resubscribe();
    }

    /// Messages were skipped between the broker connection and this node: every
    /// channel with a position is checked against its history.
    fn lagged(&self) {
        for channel in self.hub.positioned_channels() {
            self.repairs.request(&channel);
        }
    }
}

impl BrokerSink {
    fn deliver_inner(&self, channel: &str, payload: &[u8]) {
        let now = fanout_protocol::now_ms();
        let envelope = Envelope::decode(payload, now);
        metrics::counter!(m::BROKER_MESSAGES_TOTAL).increment(1);
        metrics::histogram!(m::PUBSUB_LAG_SECONDS)
            .record(now.saturating_sub(envelope.ts) as f64 / 1000.0);
        let d = self.hub.deliver(channel, Arc::new(envelope));
        crate::repair::account(&self.upstream, channel, &d);
        if d.repair {
            self.repairs.request(channel);
        }
    }
}
