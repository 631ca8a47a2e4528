//! The node's broker subscriptions: one per channel, however many local sockets want
//! it. One task owns the reference counts and talks to the broker, so SUBSCRIBE and
//! UNSUBSCRIBE for a channel can never cross: the first local subscriber subscribes, the
//! last one leaving unsubscribes, and after a broker reconnect every channel still
//! wanted is subscribed again. Commands that arrive together go out as one batch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::broker::{Broker, BrokerError};
use crate::metrics as m;
use crate::recovery::Repairs;

/// Largest number of channels in one SUBSCRIBE / UNSUBSCRIBE.
const BATCH: usize = 512;

/// Backoff between retries of failed subscriptions.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

type Reply = oneshot::Sender<Result<(), BrokerError>>;

pub(crate) enum Command {
    Acquire(Arc<str>, Reply),
    Release(Arc<str>),
    /// The broker reconnected: subscribe everything again.
    Resubscribe,
}

/// A handle to the subscription task.
#[derive(Clone)]
pub struct Subscriptions {
    tx: mpsc::UnboundedSender<Command>,
}

impl Subscriptions {
    pub(crate) fn channel() -> (Subscriptions, mpsc::UnboundedReceiver<Command>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Subscriptions { tx }, rx)
    }

    /// Takes a reference on `channel`, subscribing at the broker if it is the first;
    /// resolves once the broker subscription is in place.
    pub async fn acquire(&self, channel: Arc<str>) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Acquire(channel, tx))
            .map_err(|_| BrokerError::Unavailable("node is shutting down".into()))?;
        rx.await
            .map_err(|_| BrokerError::Unavailable("node is shutting down".into()))?
    }

    /// Drops a reference on `channel`; the last one unsubscribes at the broker.
    pub fn release(&self, channel: Arc<str>) {
        let _ = self.tx.send(Command::Release(channel));
    }

    /// Asks for every wanted channel to be subscribed again (after a reconnect).
    pub fn resubscribe(&self) {
        let _ = self.tx.send(Command::Resubscribe);
    }
}

/// The task: runs until `stop` is cancelled or every handle is dropped.
pub(crate) async fn run(
    broker: Arc<dyn Broker>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    repairs: Repairs,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut state = State {
        broker,
        refs: HashMap::new(),
        subscribed: HashSet::new(),
    };
    let mut commands = Vec::with_capacity(BATCH);
    // Channels still wanted by sockets that hold them, but not subscribed because the
    // broker refused or timed out (typically right after a reconnect): retried on their
    // own timer with capped exponential backoff, so no subscriber stays silently deaf.
    let mut retry: HashSet<Arc<str>> = HashSet::new();
    let mut backoff = RETRY_MIN;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let mut retry_now = false;
        tokio::select! {
            _ = stop.cancelled() => return,
            n = rx.recv_many(&mut commands, BATCH) => {
                if n == 0 {
                    return;
                }
            }
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                retry_now = true;
            }
        }
        let mut waiting: Vec<(Arc<str>, Reply)> = Vec::new();
        let mut touched: Vec<Arc<str>> = Vec::new();
        let mut resubscribe = false;
        for command in commands.drain(..) {
            match command {
                Command::Acquire(channel, reply) => {
                    *state.refs.entry(channel.clone()).or_default() += 1;
                    touched.push(channel.clone());
                    waiting.push((channel, reply));
                }
                Command::Release(channel) => {
                    state.release(&channel);
                    touched.push(channel);
                }
                Command::Resubscribe => resubscribe = true,
            }
        }
        if resubscribe {
            // After a reconnect the broker has none of our subscriptions.
            state.subscribed.clear();
            touched.extend(state.refs.keys().cloned());
            retry.clear();
        }
        // New work first, in its own batches; retries separately, so that one channel
        // the broker keeps refusing cannot fail unrelated subscribes.
        let (to_subscribe, to_unsubscribe) = state.plan(touched);
        let failed = state.subscribe(&to_subscribe).await;
        state.unsubscribe(&to_unsubscribe).await;
        let mut retry_failed = HashSet::new();
        let mut retried = Vec::new();
        if retry_now {
            let (again, _) = state.plan(retry.drain().collect());
            retry_failed = state.subscribe(&again).await.into_keys().collect();
            retried = again;
        }
        // A channel subscribed again after a reconnect (or a failed attempt) may have
        // missed messages meanwhile: its history is checked against what was dispatched.
        // (A first subscribe needs no repair: the hub has no position for it yet.)
        if resubscribe || !retried.is_empty() {
            for c in to_subscribe.iter().chain(retried.iter()) {
                if state.subscribed.contains(c) {
                    repairs.request(c);
                }
            }
        }
        let mut acquired = Vec::new();
        let mut abandoned = Vec::new();
        for (channel, reply) in waiting {
            let result = match failed.get(&channel) {
                Some(error) => {
                    // The acquirer will not subscribe locally: give its reference back.
                    state.release(&channel);
                    Err(error.clone())
                }
                None => Ok(()),
            };
            let ok = result.is_ok();
            if reply.send(result).is_err() && ok {
                // The acquirer gave up waiting (its subscribe passed its deadline, or
                // its connection closed): nobody will release this reference.
                state.release(&channel);
                abandoned.push(channel.clone());
            }
            acquired.push(channel);
        }
        if !abandoned.is_empty() {
            let (_, unsubscribe) = state.plan(abandoned);
            state.unsubscribe(&unsubscribe).await;
        }
        // Channels that failed but are still held by other sockets are retried.
        retry.extend(failed.into_keys().chain(retry_failed.iter().cloned()));
        retry.retain(|c| state.refs.contains_key(c));
        // A SUBSCRIBE that timed out may still have been applied: make sure channels
        // nobody wants are not left subscribed.
        let stale: Vec<Arc<str>> = acquired
            .into_iter()
            .filter(|c| !state.refs.contains_key(c) && !state.subscribed.contains(c))
            .collect();
        if !stale.is_empty() && state.broker.is_ready() {
            let _ = state.broker.unsubscribe(&stale).await;
        }
        if retry.is_empty() {
            backoff = RETRY_MIN;
            retry_at = None;
        } else if retry_now || retry_at.is_none() {
            if retry_now && !retry_failed.is_empty() {
                backoff = (backoff * 2).min(RETRY_MAX);
            }
            retry_at = Some(tokio::time::Instant::now() + backoff);
        }
        metrics::gauge!(m::CHANNELS).set(state.subscribed.len() as f64);
    }
}

struct State {
    broker: Arc<dyn Broker>,
    refs: HashMap<Arc<str>, usize>,
    subscribed: HashSet<Arc<str>>,
}

impl State {
    fn release(&mut self, channel: &Arc<str>) {
        if let Some(n) = self.refs.get_mut(channel) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(channel);
            }
        }
    }

    /// What to subscribe and unsubscribe so that the broker matches the reference
    /// counts for `channels`.
    fn plan(&self, channels: Vec<Arc<str>>) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        let mut seen = HashSet::new();
        for channel in channels {
            if !seen.insert(channel.clone()) {
                continue;
            }
            match (
                self.refs.contains_key(&channel),
                self.subscribed.contains(&channel),
            ) {
                (true, false) => subscribe.push(channel),
                (false, true) => unsubscribe.push(channel),
                _ => {}
            }
        }
        (subscribe, unsubscribe)
    }

    /// Subscribes in batches; a refused batch is retried channel by channel (while the
    /// broker is up) so that one bad channel fails alone. Returns what failed.
    async fn subscribe(&mut self, channels: &[Arc<str>]) -> HashMap<Arc<str>, BrokerError> {
        let mut failed = HashMap::new();
        for chunk in channels.chunks(BATCH) {
            let started = Instant::now();
            match self.broker.subscribe(chunk).await {
                Ok(()) => {
                    metrics::histogram!(m::BROKER_SUBSCRIBE_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    self.subscribed.extend(chunk.iter().cloned());
                }
                Err(error) => {
                    metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "subscribe").increment(1);
                    tracing::warn!(%error, channels = chunk.len(), "broker subscribe failed");
                    if chunk.len() > 1 && self.broker.is_ready() {
                        for c in chunk {
                            match self.broker.subscribe(std::slice::from_ref(c)).await {
                                Ok(()) => {
                                    self.subscribed.insert(c.clone());
                                }
                                Err(e) => {
                                    failed.insert(c.clone(), e);
                                }
                            }
                        }
                    } else {
                        failed.extend(chunk.iter().map(|c| (c.clone(), error.clone())));
                    }
                }
            }
        }
        failed
    }

    async fn unsubscribe(&mut self, channels: &[Arc<str>]) {
        for chunk in channels.chunks(BATCH) {
            if let Err(error) = self.broker.unsubscribe(chunk).await {
                metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "unsubscribe").increment(1);
                tracing::warn!(%error, channels = chunk.len(), "broker unsubscribe failed");
            }
            // Either way we no longer want them; a reconnect subscribes only what is wanted.
            for c in chunk {
                self.subscribed.remove(c);
            }
        }
    }
}
