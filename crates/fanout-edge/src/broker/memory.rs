//! The embedded in-memory broker: a single node with no Redis (`cargo run` on a fresh
//! machine). Each channel gets an epoch when its history starts; offsets count from 1;
//! the newest messages are kept per the namespace's history policy, and the whole
//! history (epoch included) is dropped once it outlives its TTL — as in Redis. Publishes
//! go through the same decode-once path as Redis messages.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use fanout_protocol::Envelope;
use fanout_publisher::{HistoryPolicy, PublishAck};
use serde_json::value::RawValue;

use super::{Broker, BrokerError, HistoryQuery, HistoryRead, SharedSink, MAX_HISTORY_READ};

pub struct MemoryBroker {
    sink: SharedSink,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    channels: HashMap<String, ChannelHistory>,
    subscribed: HashSet<Arc<str>>,
    reports: HashMap<String, (String, Instant)>,
    /// channel → client → (info, until)
    presence: HashMap<String, HashMap<String, (String, Instant)>>,
    /// (channel, idempotency key) → where its publish landed, for the dedup window.
    applied: HashMap<(String, String), PublishAck>,
    /// The same entries, oldest first, with when each is forgotten.
    applied_order: VecDeque<(Instant, String, String)>,
}

/// How long an idempotency key is remembered (as `publish.lua` does by default).
const DEDUP_WINDOW: std::time::Duration =
    std::time::Duration::from_secs(fanout_protocol::layout::DEDUP_WINDOW_SECS);
/// The most idempotency keys remembered, all channels together.
const DEDUP_MAX_KEYS: usize = 100_000;

struct ChannelHistory {
    epoch: String,
    offset: u64,
    kept: VecDeque<Arc<Envelope>>,
    expires: Instant,
}

impl ChannelHistory {
    /// A new epoch at offset 0, for `ttl` unless published to.
    fn start(ttl: std::time::Duration) -> ChannelHistory {
        ChannelHistory {
            epoch: crate::config::random_token(12),
            offset: 0,
            kept: VecDeque::new(),
            expires: Instant::now() + ttl,
        }
    }
}

impl State {
    /// The channel's history, unless it expired (then it is gone, as in Redis).
    fn live(&mut self, channel: &str) -> Option<&mut ChannelHistory> {
        if self
            .channels
            .get(channel)
            .is_some_and(|h| h.expires <= Instant::now())
        {
            self.channels.remove(channel);
        }
        self.channels.get_mut(channel)
    }
}

impl MemoryBroker {
    pub fn new(sink: SharedSink) -> MemoryBroker {
        MemoryBroker {
            sink,
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
        history: HistoryPolicy,
        idempotency_key: Option<&str>,
    ) -> Result<PublishAck, BrokerError> {
        // Refused as the Redis broker's publisher refuses them.
        fanout_protocol::Channel::parse(channel)
            .map_err(|e| BrokerError::Invalid(format!("invalid channel: {e}")))?;
        if let Some(key) = idempotency_key {
            if !fanout_publisher::valid_idempotency_key(key) {
                return Err(BrokerError::Invalid(format!(
                    "invalid idempotency key {key:?}"
                )));
            }
        }
        // The lock spans offset assignment and dispatch so that subscribers see offsets
        // in order; dispatch never waits.
        let mut state = self.state.lock().expect("memory broker lock");
        let now = Instant::now();
        while state
            .applied_order
            .front()
            .is_some_and(|(until, _, _)| *until <= now || state.applied.len() > DEDUP_MAX_KEYS)
        {
            let (_, c, k) = state.applied_order.pop_front().expect("checked");
            state.applied.remove(&(c, k));
        }
        // A caller's key that was applied within the window is not published again.
        if let Some(key) = idempotency_key {
            if let Some(ack) = state.applied.get(&(channel.to_string(), key.to_string())) {
                return Ok(PublishAck {
                    duplicate: true,
                    ..ack.clone()
                });
            }
        }
        if state.live(channel).is_none() {
            state
                .channels
                .insert(channel.to_string(), ChannelHistory::start(history.ttl));
        }
        let h = state.channels.get_mut(channel).expect("inserted above");
        h.offset += 1;
        let envelope = Envelope {
            data: data.to_owned(),
            event: event.map(str::to_string),
            offset: Some(h.offset),
            epoch: Some(h.epoch.clone()),
            ts: fanout_protocol::now_ms(),
            notice: None,
        };
        let ttl = match history.finished_ttl {
            Some(t) if channel.starts_with("job_progress:") && envelope.is_terminal() => t,
            _ => history.ttl,
        };
        h.expires = Instant::now() + ttl;
        let encoded = envelope.encode();
        if history.size > 0 {
            h.kept.push_back(Arc::new(envelope));
            while h.kept.len() > history.size as usize {
                h.kept.pop_front();
            }
        }
        let ack = PublishAck {
            offset: h.offset,
            epoch: h.epoch.clone(),
            duplicate: false,
        };
        if let Some(key) = idempotency_key {
            state
                .applied
                .insert((channel.to_string(), key.to_string()), ack.clone());
            state.applied_order.push_back((
                now + DEDUP_WINDOW,
                channel.to_string(),
                key.to_string(),
            ));
        }
        if state.subscribed.contains(channel) {
            self.sink.deliver(channel, encoded.as_bytes());
        }
        Ok(ack)
    }

    async fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
        start: Option<std::time::Duration>,
    ) -> Result<HistoryRead, BrokerError> {
        let mut state = self.state.lock().expect("memory broker lock");
        if state.live(channel).is_none() {
            let Some(ttl) = start else {
                return Ok(HistoryRead::default());
            };
            state
                .channels
                .insert(channel.to_string(), ChannelHistory::start(ttl));
        }
        let h = state.live(channel).expect("started above");
        let entries = match query {
            HistoryQuery::After(after) => h
                .kept
                .iter()
                .filter(|e| e.offset.is_some_and(|o| o > after))
                .take(MAX_HISTORY_READ as usize)
                .cloned()
                .collect(),
            HistoryQuery::Last(n) => {
                let n = n.min(MAX_HISTORY_READ) as usize;
                h.kept
                    .iter()
                    .skip(h.kept.len().saturating_sub(n))
                    .cloned()
                    .collect()
            }
        };
        Ok(HistoryRead {
            epoch: Some(h.epoch.clone()),
            top: h.offset,
            entries,
        })
    }

    async fn broadcast_control(&self, payload: &str) -> Result<usize, BrokerError> {
        // One node, this one, and only while it is subscribed (as with Redis).
        let state = self.state.lock().expect("memory broker lock");
        if !state.subscribed.contains(super::CONTROL_CHANNEL) {
            return Ok(0);
        }
        self.sink
            .deliver(super::CONTROL_CHANNEL, payload.as_bytes());
        Ok(1)
    }

    async fn report(
        &self,
        node: &str,
        report: &str,
        ttl: std::time::Duration,
    ) -> Result<(), BrokerError> {
        let mut state = self.state.lock().expect("memory broker lock");
        state
            .reports
            .insert(node.to_string(), (report.to_string(), Instant::now() + ttl));
        Ok(())
    }

    async fn reports(&self) -> Result<Vec<String>, BrokerError> {
        let mut state = self.state.lock().expect("memory broker lock");
        let now = Instant::now();
        state.reports.retain(|_, (_, until)| *until > now);
        Ok(state.reports.values().map(|(r, _)| r.clone()).collect())
    }

    async fn notify(&self, channel: &str, payload: &str) -> Result<(), BrokerError> {
        let state = self.state.lock().expect("memory broker lock");
        if state.subscribed.contains(channel) {
            self.sink.deliver(channel, payload.as_bytes());
        }
        Ok(())
    }

    async fn presence_refresh(
        &self,
        channel: &str,
        entries: &[(String, String)],
        ttl: std::time::Duration,
    ) -> Result<(), BrokerError> {
        let mut state = self.state.lock().expect("memory broker lock");
        let until = Instant::now() + ttl;
        let clients = state.presence.entry(channel.to_string()).or_default();
        for (client, info) in entries {
            clients.insert(client.clone(), (info.clone(), until));
        }
        Ok(())
    }

    async fn presence_remove(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        let mut state = self.state.lock().expect("memory broker lock");
        if let Some(clients) = state.presence.get_mut(channel) {
            clients.remove(client);
            if clients.is_empty() {
                state.presence.remove(channel);
            }
        }
        Ok(())
    }

    async fn presence_prune(
        &self,
        channel: &str,
        clients: &[String],
    ) -> Result<usize, BrokerError> {
        let mut state = self.state.lock().expect("memory broker lock");
        let now = Instant::now();
        let Some(entries) = state.presence.get_mut(channel) else {
            return Ok(0);
        };
        let mut pruned = 0;
        for client in clients {
            if entries.get(client).is_some_and(|(_, until)| *until <= now) {
                entries.remove(client);
                pruned += 1;
            }
        }
        if entries.is_empty() {
            state.presence.remove(channel);
        }
        Ok(pruned)
    }

    async fn presence(&self, channel: &str) -> Result<Vec<String>, BrokerError> {
        let mut state = self.state.lock().expect("memory broker lock");
        let now = Instant::now();
        let Some(clients) = state.presence.get_mut(channel) else {
            return Ok(Vec::new());
        };
        clients.retain(|_, (_, until)| *until > now);
        Ok(clients.values().map(|(info, _)| info.clone()).collect())
    }

    async fn shutdown(&self) {}
}
