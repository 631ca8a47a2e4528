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
    ///
    /// Cancel-safe: dropped while it waits, the reference is given back whether or not
    /// the answer had already arrived.
    pub async fn acquire(&self, channel: Arc<str>) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Acquire(channel.clone(), tx))
            .map_err(|_| BrokerError::Unavailable("node is shutting down".into()))?;
        let mut waiting = Waiting {
            rx: Some(rx),
            subscriptions: self,
            channel,
        };
        let answer = waiting.rx.as_mut().expect("set above").await;
        waiting.rx = None;
        answer.map_err(|_| BrokerError::Unavailable("node is shutting down".into()))?
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

/// What a broker call, run beside the task, reports back.
enum Done {
    /// Each channel of a SUBSCRIBE made in broker connection `generation`, with its
    /// outcome (a refused batch is retried channel by channel inside the call, so that
    /// one bad channel fails alone).
    Subscribed(u64, Vec<(Arc<str>, Result<(), BrokerError>)>),
    Unsubscribed(Vec<Arc<str>>),
}

/// An acquire waiting for its answer. Dropped before it was read: the task either has
/// not answered yet (then its answer fails to arrive, and it gives the reference back
/// itself) or has answered (then the reference is given back here).
struct Waiting<'a> {
    rx: Option<oneshot::Receiver<Result<(), BrokerError>>>,
    subscriptions: &'a Subscriptions,
    channel: Arc<str>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(Ok(())) = rx.try_recv() {
                self.subscriptions.release(self.channel.clone());
            }
        }
    }
}

/// The task: runs until `stop` is cancelled or every handle is dropped.
///
/// It owns the reference counts and decides; broker calls run beside it (at most one
/// per channel at a time, so a SUBSCRIBE and an UNSUBSCRIBE of one channel never
/// cross), and report back. So one slow or refused call — a shard that does not
/// answer, a batch retried channel by channel — delays only the channels it carries,
/// never the node's other subscribes.
pub(crate) async fn run(
    broker: Arc<dyn Broker>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    // Asks for a channel to be checked against its history (the repair worker's
    // request; a function, so that this module does not depend on the worker's).
    repair: impl Fn(&str) + Send + 'static,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut state = State {
        broker,
        refs: HashMap::new(),
        subscribed: HashSet::new(),
        in_flight: HashSet::new(),
        waiters: HashMap::new(),
        repair_after: HashSet::new(),
        generation: 0,
    };
    let mut calls: tokio::task::JoinSet<Done> = tokio::task::JoinSet::new();
    // Planned calls waiting for a free turn (their channels count as in flight):
    // batched when they go.
    let mut queued_subscribe: Vec<Arc<str>> = Vec::new();
    let mut queued_unsubscribe: Vec<Arc<str>> = Vec::new();
    let max_calls = state.broker.subscribe_calls().max(1);
    let mut commands = Vec::with_capacity(BATCH);
    // Channels still wanted by sockets that hold them, but not subscribed because the
    // broker refused or timed out (typically right after a reconnect): retried on their
    // own timer with capped exponential backoff, so no subscriber stays silently deaf.
    let mut retry: HashSet<Arc<str>> = HashSet::new();
    let mut backoff = RETRY_MIN;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let mut touched: Vec<Arc<str>> = Vec::new();
        tokio::select! {
            _ = stop.cancelled() => return,
            n = rx.recv_many(&mut commands, BATCH) => {
                if n == 0 {
                    return;
                }
                for command in commands.drain(..) {
                    match command {
                        Command::Acquire(channel, reply) => {
                            *state.refs.entry(channel.clone()).or_default() += 1;
                            if state.subscribed.contains(&channel) && !state.in_flight.contains(&channel) {
                                if reply.send(Ok(())).is_err() {
                                    // The acquirer stopped waiting already.
                                    state.release(&channel);
                                    touched.push(channel);
                                }
                            } else {
                                state.waiters.entry(channel.clone()).or_default().push(reply);
                                touched.push(channel);
                            }
                        }
                        Command::Release(channel) => {
                            state.release(&channel);
                            touched.push(channel);
                        }
                        Command::Resubscribe => {
                            // After a reconnect the broker has none of our subscriptions;
                            // each one made again is checked against history after.
                            state.subscribed.clear();
                            state.generation += 1;
                            retry.clear();
                            for c in state.refs.keys() {
                                state.repair_after.insert(c.clone());
                                touched.push(c.clone());
                            }
                        }
                    }
                }
            }
            Some(done) = calls.join_next(), if !calls.is_empty() => {
                match done {
                    Ok(Done::Subscribed(generation, results)) => {
                        for (channel, result) in results {
                            state.in_flight.remove(&channel);
                            // Made before the broker reconnected: it is gone with that
                            // connection, and made again below.
                            let result = match result {
                                Ok(()) if generation != state.generation => {
                                    if !state.refs.contains_key(&channel) && state.broker.is_ready() {
                                        // It may have reached the new connection after all:
                                        // nobody wants it, so make sure.
                                        state.in_flight.insert(channel.clone());
                                        queued_unsubscribe.push(channel.clone());
                                    } else {
                                        touched.push(channel);
                                    }
                                    continue;
                                }
                                other => other,
                            };
                            match result {
                                Ok(()) => {
                                    retry.remove(&channel);
                                    state.subscribed.insert(channel.clone());
                                    // Subscribed again after a reconnect or a failure: what
                                    // was published meanwhile is read from history.
                                    if state.repair_after.remove(&channel) {
                                        repair(&channel);
                                    }
                                    state.answer(&channel, Ok(()));
                                }
                                Err(error) => {
                                    state.answer(&channel, Err(error));
                                    // Still held by other sockets: retried on the timer
                                    // (with backoff), not at once. A new acquire touches
                                    // it sooner.
                                    if state.refs.contains_key(&channel) {
                                        state.repair_after.insert(channel.clone());
                                        retry.insert(channel.clone());
                                    } else if state.broker.is_ready() {
                                        // A SUBSCRIBE that timed out may still have been
                                        // applied: nobody wants it, so make sure.
                                        state.in_flight.insert(channel.clone());
                                        queued_unsubscribe.push(channel.clone());
                                    }
                                    continue;
                                }
                            }
                            touched.push(channel);
                        }
                    }
                    Ok(Done::Unsubscribed(channels)) => {
                        for channel in channels {
                            state.in_flight.remove(&channel);
                            state.subscribed.remove(&channel);
                            touched.push(channel);
                        }
                    }
                    Err(error) => {
                        // A broker call panicked: a bug, contained to its channels, which
                        // stay in flight (never subscribed twice) until a reconnect.
                        metrics::counter!(m::INTERNAL_ERRORS_TOTAL, "place" => "subscriptions").increment(1);
                        tracing::error!(%error, "bug: a broker subscription call failed to complete");
                    }
                }
            }
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                retry_at = None;
                backoff = (backoff * 2).min(RETRY_MAX);
                // Kept in `retry` until subscribed: the backoff grows while they fail.
                touched.extend(retry.iter().cloned());
            }
        }
        let (to_subscribe, to_unsubscribe) = state.plan(touched);
        state.in_flight.extend(to_subscribe.iter().cloned());
        state.in_flight.extend(to_unsubscribe.iter().cloned());
        queued_subscribe.extend(to_subscribe);
        queued_unsubscribe.extend(to_unsubscribe);
        while calls.len() < max_calls
            && !(queued_subscribe.is_empty() && queued_unsubscribe.is_empty())
        {
            if !queued_unsubscribe.is_empty() {
                let n = queued_unsubscribe.len().min(BATCH);
                let batch: Vec<Arc<str>> = queued_unsubscribe.drain(..n).collect();
                calls.spawn(unsubscribe(state.broker.clone(), batch));
            } else {
                let n = queued_subscribe.len().min(BATCH);
                let batch: Vec<Arc<str>> = queued_subscribe.drain(..n).collect();
                calls.spawn(subscribe(state.broker.clone(), state.generation, batch));
            }
        }
        if state.in_flight.is_empty() && state.in_flight.capacity() > BATCH {
            // A burst is over: its bookkeeping need not stay allocated.
            state.in_flight.shrink_to_fit();
            state.waiters.shrink_to_fit();
            queued_subscribe = Vec::new();
            queued_unsubscribe = Vec::new();
        }
        retry.retain(|c| state.refs.contains_key(c) && !state.subscribed.contains(c));
        if retry.is_empty() {
            backoff = RETRY_MIN;
            retry_at = None;
        } else if retry_at.is_none() {
            retry_at = Some(tokio::time::Instant::now() + backoff);
        }
        metrics::gauge!(m::CHANNELS).set(state.subscribed.len() as f64);
    }
}

/// SUBSCRIBE `channels` in one call; a refused batch is retried channel by channel,
/// concurrently (while the broker is up), so that one bad channel fails alone.
async fn subscribe(broker: Arc<dyn Broker>, generation: u64, channels: Vec<Arc<str>>) -> Done {
    let started = Instant::now();
    match broker.subscribe(&channels).await {
        Ok(()) => {
            metrics::histogram!(m::BROKER_SUBSCRIBE_SECONDS)
                .record(started.elapsed().as_secs_f64());
            Done::Subscribed(
                generation,
                channels.into_iter().map(|c| (c, Ok(()))).collect(),
            )
        }
        Err(error) => {
            metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "subscribe").increment(1);
            tracing::warn!(%error, channels = channels.len(), "broker subscribe failed");
            if channels.len() > 1 && broker.is_ready() {
                let one_by_one = channels.iter().map(|c| {
                    let broker = broker.clone();
                    async move { broker.subscribe(std::slice::from_ref(c)).await }
                });
                let results = futures_util::future::join_all(one_by_one).await;
                Done::Subscribed(generation, channels.into_iter().zip(results).collect())
            } else {
                Done::Subscribed(
                    generation,
                    channels
                        .into_iter()
                        .map(|c| (c, Err(error.clone())))
                        .collect(),
                )
            }
        }
    }
}

/// UNSUBSCRIBE `channels`; either way they are no longer wanted (a reconnect
/// subscribes only what is wanted).
async fn unsubscribe(broker: Arc<dyn Broker>, channels: Vec<Arc<str>>) -> Done {
    for chunk in channels.chunks(BATCH) {
        if let Err(error) = broker.unsubscribe(chunk).await {
            metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "unsubscribe").increment(1);
            tracing::warn!(%error, channels = chunk.len(), "broker unsubscribe failed");
        }
    }
    Done::Unsubscribed(channels)
}

struct State {
    broker: Arc<dyn Broker>,
    refs: HashMap<Arc<str>, usize>,
    subscribed: HashSet<Arc<str>>,
    /// Channels with a broker call under way: nothing more is asked for them until it
    /// reports back.
    in_flight: HashSet<Arc<str>>,
    /// Acquirers waiting for their channel's subscription.
    waiters: HashMap<Arc<str>, Vec<Reply>>,
    /// Channels to check against history once subscribed again.
    repair_after: HashSet<Arc<str>>,
    /// Counts broker reconnects: a subscription made before the last one is void.
    generation: u64,
}

impl State {
    fn release(&mut self, channel: &Arc<str>) {
        if let Some(n) = self.refs.get_mut(channel) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(channel);
                self.repair_after.remove(channel);
            }
        }
    }

    /// Answers the acquirers waiting for `channel`. A refused one gives its reference
    /// back (it will not subscribe locally); so does one that stopped waiting (its
    /// subscribe passed its deadline, or its connection closed).
    fn answer(&mut self, channel: &Arc<str>, result: Result<(), BrokerError>) {
        for reply in self.waiters.remove(channel).unwrap_or_default() {
            let ok = result.is_ok();
            if reply.send(result.clone()).is_err() || !ok {
                self.release(channel);
            }
        }
    }

    /// What to subscribe and unsubscribe so that the broker matches the reference
    /// counts for `channels` (those with a call under way are decided when it reports).
    fn plan(&self, channels: Vec<Arc<str>>) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        let mut seen = HashSet::new();
        for channel in channels {
            if !seen.insert(channel.clone()) || self.in_flight.contains(&channel) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An acquire dropped after its answer arrived but before it was read gives the
    /// reference back (else the channel stays subscribed with nobody on it).
    #[tokio::test]
    async fn an_acquire_dropped_after_its_answer_gives_the_reference_back() {
        let (subscriptions, mut rx) = Subscriptions::channel();
        let channel: Arc<str> = Arc::from("user:1");
        let mut acquire = Box::pin(subscriptions.acquire(channel.clone()));
        // Sent, not answered yet.
        assert!(futures_util::poll!(acquire.as_mut()).is_pending());
        let Some(Command::Acquire(c, reply)) = rx.recv().await else {
            panic!("no acquire sent");
        };
        assert_eq!(c, channel);
        reply.send(Ok(())).unwrap();
        // The connection closes before the answer is read.
        drop(acquire);
        match rx.try_recv() {
            Ok(Command::Release(c)) => assert_eq!(c, channel),
            _ => panic!("the reference was not given back"),
        }
        // Dropped before any answer: the answer cannot be sent (the task then gives
        // the reference back itself), and nothing is released here.
        let mut acquire = Box::pin(subscriptions.acquire(channel.clone()));
        assert!(futures_util::poll!(acquire.as_mut()).is_pending());
        let Some(Command::Acquire(_, reply)) = rx.recv().await else {
            panic!("no acquire sent");
        };
        drop(acquire);
        assert!(reply.send(Ok(())).is_err());
        assert!(rx.try_recv().is_err());
    }
}
