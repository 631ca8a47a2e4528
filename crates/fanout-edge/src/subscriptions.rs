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
    stop: tokio_util::sync::CancellationToken,
) {
    let mut refs: HashMap<Arc<str>, usize> = HashMap::new();
    let mut subscribed: HashSet<Arc<str>> = HashSet::new();
    let mut commands = Vec::with_capacity(BATCH);
    // Channels wanted but not subscribed because the broker refused or timed out: tried
    // again with capped exponential backoff, so no subscriber is left silently deaf.
    let mut retry: HashSet<Arc<str>> = HashSet::new();
    let mut backoff = RETRY_MIN;
    loop {
        let retry_due = !retry.is_empty();
        tokio::select! {
            _ = stop.cancelled() => return,
            n = rx.recv_many(&mut commands, BATCH) => {
                if n == 0 {
                    return;
                }
            }
            _ = tokio::time::sleep(backoff), if retry_due => {
                tracing::info!(channels = retry.len(), "retrying broker subscriptions");
            }
        }
        let mut waiting: Vec<(Arc<str>, Reply)> = Vec::new();
        let mut touched: Vec<Arc<str>> = Vec::new();
        let mut resubscribe = false;
        for command in commands.drain(..) {
            match command {
                Command::Acquire(channel, reply) => {
                    *refs.entry(channel.clone()).or_default() += 1;
                    touched.push(channel.clone());
                    waiting.push((channel, reply));
                }
                Command::Release(channel) => {
                    if let Some(n) = refs.get_mut(&channel) {
                        *n -= 1;
                        if *n == 0 {
                            refs.remove(&channel);
                        }
                    }
                    touched.push(channel);
                }
                Command::Resubscribe => resubscribe = true,
            }
        }
        if resubscribe {
            // After a reconnect the broker has none of our subscriptions.
            subscribed.clear();
            touched.extend(refs.keys().cloned());
        }
        touched.extend(retry.drain());
        let mut to_subscribe: Vec<Arc<str>> = Vec::new();
        let mut to_unsubscribe: Vec<Arc<str>> = Vec::new();
        let mut seen = HashSet::new();
        for channel in touched {
            if !seen.insert(channel.clone()) {
                continue;
            }
            let wanted = refs.contains_key(&channel);
            let have = subscribed.contains(&channel);
            if wanted && !have {
                to_subscribe.push(channel);
            } else if !wanted && have {
                to_unsubscribe.push(channel);
            }
        }
        let mut failed: HashMap<Arc<str>, BrokerError> = HashMap::new();
        for chunk in to_subscribe.chunks(BATCH) {
            let started = Instant::now();
            match broker.subscribe(chunk).await {
                Ok(()) => {
                    metrics::histogram!(m::BROKER_SUBSCRIBE_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    subscribed.extend(chunk.iter().cloned());
                }
                Err(error) => {
                    metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "subscribe").increment(1);
                    tracing::warn!(%error, channels = chunk.len(), "broker subscribe failed");
                    for c in chunk {
                        failed.insert(c.clone(), error.clone());
                    }
                    retry.extend(chunk.iter().cloned());
                }
            }
        }
        for chunk in to_unsubscribe.chunks(BATCH) {
            if let Err(error) = broker.unsubscribe(chunk).await {
                metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "unsubscribe").increment(1);
                tracing::warn!(%error, channels = chunk.len(), "broker unsubscribe failed");
            }
            // Either way we no longer want them; a reconnect subscribes only what is wanted.
            for c in chunk {
                subscribed.remove(c);
            }
        }
        for (channel, reply) in waiting {
            let result = match failed.get(&channel) {
                Some(error) => {
                    // The acquirer will not subscribe locally: give its reference back.
                    if let Some(n) = refs.get_mut(&channel) {
                        *n -= 1;
                        if *n == 0 {
                            refs.remove(&channel);
                        }
                    }
                    Err(error.clone())
                }
                None => Ok(()),
            };
            let _ = reply.send(result);
        }
        // Only channels somebody still wants are worth retrying.
        retry.retain(|c| refs.contains_key(c));
        backoff = if retry.is_empty() {
            RETRY_MIN
        } else {
            (backoff * 2).min(RETRY_MAX)
        };
        metrics::gauge!(m::CHANNELS).set(subscribed.len() as f64);
    }
}
