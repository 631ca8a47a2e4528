//! The embedded in-memory broker: a single node with no Redis (`cargo run` on a fresh
//! machine). Offsets count per channel from 1 in an epoch chosen at start. Publishes go
//! through the same decode-once path as Redis messages.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fanout_protocol::Envelope;
use fanout_publisher::{HistoryPolicy, PublishAck};
use serde_json::value::RawValue;

use super::{Broker, BrokerError, BrokerSink};

pub struct MemoryBroker {
    sink: BrokerSink,
    epoch: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    offsets: HashMap<String, u64>,
    subscribed: HashSet<Arc<str>>,
}

impl MemoryBroker {
    pub fn new(sink: BrokerSink) -> MemoryBroker {
        MemoryBroker {
            sink,
            epoch: crate::config::random_token(12),
            state: Mutex::new(State::default()),
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn is_ready(&self) -> bool {
        true
    }

    async fn subscribe(&self, channels: &[Arc<str>]) -> Result<(), BrokerError> {
        let mut state = self.state.lock().expect("memory broker lock");
        state.subscribed.extend(channels.iter().cloned());
        Ok(())
    }

    async fn unsubscribe(&self, channels: &[Arc<str>]) -> Result<(), BrokerError> {
        let mut state = self.state.lock().expect("memory broker lock");
        for c in channels {
            state.subscribed.remove(c);
        }
        Ok(())
    }

    async fn publish(
        &self,
        channel: &str,
        event: Option<&str>,
        data: &RawValue,
        _history: HistoryPolicy,
    ) -> Result<PublishAck, BrokerError> {
        // The lock spans offset assignment and dispatch so that subscribers see offsets
        // in order; dispatch never waits.
        let mut state = self.state.lock().expect("memory broker lock");
        let offset = state.offsets.entry(channel.to_string()).or_insert(0);
        *offset += 1;
        let envelope = Envelope {
            data: data.to_owned(),
            event: event.map(str::to_string),
            offset: Some(*offset),
            epoch: Some(self.epoch.clone()),
            ts: fanout_protocol::now_ms(),
        };
        let ack = PublishAck {
            offset: *offset,
            epoch: self.epoch.clone(),
        };
        if state.subscribed.contains(channel) {
            self.sink.deliver(channel, envelope.encode().as_bytes());
        }
        Ok(ack)
    }

    async fn shutdown(&self) {}
}
