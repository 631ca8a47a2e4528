//! The node's upstream: its subscriptions at the broker, one per channel, however many
//! local sockets want it. One task owns the reference counts and talks to the broker,
//! so SUBSCRIBE and UNSUBSCRIBE for a channel can never cross: the first local
//! subscriber subscribes, the last one leaving unsubscribes, and after a broker
//! reconnect every channel still wanted is subscribed again. Commands that arrive
//! together go out as one batch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::broker::{Broker, BrokerError};
use crate::metrics as m;

/// Largest number of channels in one SUBSCRIBE / UNSUBSCRIBE.
const BATCH: usize = 512;

/// Backoff between retries of failed broker subscriptions.
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
pub struct Upstream {
    tx: mpsc::UnboundedSender<Command>,
}

impl Upstream {
    pub(crate) fn channel() -> (Upstream, mpsc::UnboundedReceiver<Command>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Upstream { tx }, rx)
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
            upstream: self,
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
    upstream: &'a Upstream,
    channel: Arc<str>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(Ok(())) = rx.try_recv() {
                self.upstream.release(self.channel.clone());
            }
        }
    }
}

/// The task: runs until `stop` is cancelled or every handle is dropped.
///
/// It owns the reference counts and decides ([`State`], which does no I/O); broker
/// calls run beside it (at most one per channel at a time, so a SUBSCRIBE and an
/// UNSUBSCRIBE of one channel never cross), and report back. So one slow or refused
/// call — a shard that does not answer, a batch retried channel by channel — delays
/// only the channels it carries, never the node's other subscribes.
pub(crate) async fn run(
    broker: Arc<dyn Broker>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    // Asks for a channel to be checked against its history (the repair worker's
    // request; a function, so that this module does not depend on the worker's).
    repair: impl Fn(&str) + Send + 'static,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut state = State::default();
    let mut calls: tokio::task::JoinSet<Done> = tokio::task::JoinSet::new();
    let max_calls = broker.subscribe_calls().max(1);
    let mut commands = Vec::with_capacity(BATCH);
    loop {
        let retry_at = state.retry.at();
        tokio::select! {
            _ = stop.cancelled() => return,
            n = rx.recv_many(&mut commands, BATCH) => {
                if n == 0 {
                    return;
                }
                for command in commands.drain(..) {
                    state.command(command);
                }
            }
            Some(done) = calls.join_next(), if !calls.is_empty() => match done {
                Ok(done) => state.done(done, broker.is_ready(), &repair),
                Err(error) => {
                    // A broker call panicked: a bug, contained to its channels, which
                    // stay in flight (never subscribed twice) until a reconnect.
                    metrics::counter!(m::INTERNAL_ERRORS_TOTAL, "place" => "upstream").increment(1);
                    tracing::error!(%error, "bug: a broker subscription call failed to complete");
                }
            },
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now).into()), if retry_at.is_some() => {
                state.retry_due();
            }
        }
        for call in state.calls(max_calls - calls.len().min(max_calls)) {
            match call {
                Call::Subscribe(generation, batch) => {
                    calls.spawn(subscribe(broker.clone(), generation, batch))
                }
                Call::Unsubscribe(batch) => calls.spawn(unsubscribe(broker.clone(), batch)),
            };
        }
        state.settle(Instant::now());
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

/// A broker call the task asks for.
#[derive(Debug, PartialEq, Eq)]
enum Call {
    /// SUBSCRIBE, in broker connection `generation`.
    Subscribe(u64, Vec<Arc<str>>),
    Unsubscribe(Vec<Arc<str>>),
}

/// The task's decisions, without I/O: reference counts, what the broker has, what is
/// under way, who waits, and what to retry when.
#[derive(Default)]
struct State {
    refs: HashMap<Arc<str>, usize>,
    subscribed: HashSet<Arc<str>>,
    /// Channels with a broker call under way or queued for one: nothing more is asked
    /// for them until it reports back.
    in_flight: HashSet<Arc<str>>,
    /// Acquirers waiting for their channel's subscription.
    waiters: HashMap<Arc<str>, Vec<Reply>>,
    /// Channels to check against history once subscribed again.
    repair_after: HashSet<Arc<str>>,
    /// Counts broker reconnects: a subscription made before the last one is void.
    generation: u64,
    /// Channels whose broker state may no longer match their counts: planned next.
    touched: Vec<Arc<str>>,
    /// Planned calls waiting for a free turn (their channels count as in flight):
    /// batched when they go.
    queued_subscribe: Vec<Arc<str>>,
    queued_unsubscribe: Vec<Arc<str>>,
    retry: Retry,
}

impl State {
    fn command(&mut self, command: Command) {
        match command {
            Command::Acquire(channel, reply) => {
                *self.refs.entry(channel.clone()).or_default() += 1;
                if self.subscribed.contains(&channel) && !self.in_flight.contains(&channel) {
                    if reply.send(Ok(())).is_err() {
                        // The acquirer stopped waiting already.
                        self.release(&channel);
                        self.touched.push(channel);
                    }
                } else {
                    self.waiters.entry(channel.clone()).or_default().push(reply);
                    self.touched.push(channel);
                }
            }
            Command::Release(channel) => {
                self.release(&channel);
                self.touched.push(channel);
            }
            Command::Resubscribe => {
                // After a reconnect the broker has none of our subscriptions; each one
                // made again is checked against history after.
                self.subscribed.clear();
                self.generation += 1;
                self.retry.clear();
                for c in self.refs.keys() {
                    self.repair_after.insert(c.clone());
                    self.touched.push(c.clone());
                }
            }
        }
    }

    /// A broker call reported back (`ready`: the broker is connected now).
    fn done(&mut self, done: Done, ready: bool, repair: &impl Fn(&str)) {
        match done {
            Done::Subscribed(generation, results) => {
                for (channel, result) in results {
                    self.in_flight.remove(&channel);
                    match result {
                        // Made before the broker reconnected: it is gone with that
                        // connection, and made again (if still wanted).
                        Ok(()) if generation != self.generation => {
                            self.unwanted_or_touched(channel, ready)
                        }
                        Ok(()) => {
                            self.retry.remove(&channel);
                            self.subscribed.insert(channel.clone());
                            // Subscribed again after a reconnect or a failure: what was
                            // published meanwhile is read from history.
                            if self.repair_after.remove(&channel) {
                                repair(&channel);
                            }
                            self.answer(&channel, Ok(()));
                            self.touched.push(channel);
                        }
                        Err(error) => {
                            self.answer(&channel, Err(error));
                            // Still held by other sockets: retried on the timer (with
                            // backoff), not at once. A new acquire touches it sooner.
                            if self.refs.contains_key(&channel) {
                                self.repair_after.insert(channel.clone());
                                self.retry.insert(channel);
                            } else {
                                // A SUBSCRIBE that timed out may still have been applied.
                                self.unwanted_or_touched(channel, ready);
                            }
                        }
                    }
                }
            }
            Done::Unsubscribed(channels) => {
                for channel in channels {
                    self.in_flight.remove(&channel);
                    self.subscribed.remove(&channel);
                    self.touched.push(channel);
                }
            }
        }
    }

    /// A subscription that may exist at the broker without being counted: nobody
    /// wants it, so make sure it is gone (while the broker is up); else plan it again.
    fn unwanted_or_touched(&mut self, channel: Arc<str>, ready: bool) {
        if !self.refs.contains_key(&channel) && ready {
            self.in_flight.insert(channel.clone());
            self.queued_unsubscribe.push(channel);
        } else {
            self.touched.push(channel);
        }
    }

    /// The retry timer fired: the channels waiting for it are planned again.
    fn retry_due(&mut self) {
        let due = self.retry.due();
        self.touched.extend(due);
    }

    /// Plans what the touched channels need, and returns the calls to make now: at
    /// most `free` of them (unsubscribes first), the rest waiting in the queues.
    fn calls(&mut self, free: usize) -> Vec<Call> {
        let touched = std::mem::take(&mut self.touched);
        let (to_subscribe, to_unsubscribe) = self.plan(touched);
        self.in_flight.extend(to_subscribe.iter().cloned());
        self.in_flight.extend(to_unsubscribe.iter().cloned());
        self.queued_subscribe.extend(to_subscribe);
        self.queued_unsubscribe.extend(to_unsubscribe);
        let mut calls = Vec::new();
        while calls.len() < free
            && !(self.queued_subscribe.is_empty() && self.queued_unsubscribe.is_empty())
        {
            if !self.queued_unsubscribe.is_empty() {
                let n = self.queued_unsubscribe.len().min(BATCH);
                calls.push(Call::Unsubscribe(
                    self.queued_unsubscribe.drain(..n).collect(),
                ));
            } else {
                let n = self.queued_subscribe.len().min(BATCH);
                let batch = self.queued_subscribe.drain(..n).collect();
                calls.push(Call::Subscribe(self.generation, batch));
            }
        }
        calls
    }

    /// After every step: retries only what is still wanted and not subscribed, and a
    /// burst's bookkeeping does not stay allocated.
    fn settle(&mut self, now: Instant) {
        if self.in_flight.is_empty() && self.in_flight.capacity() > BATCH {
            self.in_flight.shrink_to_fit();
            self.waiters.shrink_to_fit();
            self.queued_subscribe = Vec::new();
            self.queued_unsubscribe = Vec::new();
        }
        let (refs, subscribed) = (&self.refs, &self.subscribed);
        self.retry
            .settle(|c| refs.contains_key(c) && !subscribed.contains(c), now);
    }

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

/// Channels whose subscribe failed while sockets still want them: retried together
/// on one timer, with capped exponential backoff while they keep failing, so no
/// subscriber stays silently deaf and a broker that refuses is not hammered.
#[derive(Debug)]
struct Retry {
    channels: HashSet<Arc<str>>,
    backoff: Duration,
    at: Option<Instant>,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            channels: HashSet::new(),
            backoff: RETRY_MIN,
            at: None,
        }
    }
}

impl Retry {
    fn insert(&mut self, channel: Arc<str>) {
        self.channels.insert(channel);
    }

    fn remove(&mut self, channel: &Arc<str>) {
        self.channels.remove(channel);
    }

    /// A reconnect: everything is subscribed again anyway.
    fn clear(&mut self) {
        self.channels.clear();
    }

    /// When the timer fires next.
    fn at(&self) -> Option<Instant> {
        self.at
    }

    /// The timer fired: the channels to try again (kept until subscribed, so the
    /// backoff grows while they fail).
    fn due(&mut self) -> Vec<Arc<str>> {
        self.at = None;
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
        self.channels.iter().cloned().collect()
    }

    /// Keeps the channels `still` needs; arms the timer for them, or resets the
    /// backoff once none is left.
    fn settle(&mut self, still: impl Fn(&Arc<str>) -> bool, now: Instant) {
        self.channels.retain(|c| still(c));
        if self.channels.is_empty() {
            self.backoff = RETRY_MIN;
            self.at = None;
        } else if self.at.is_none() {
            self.at = Some(now + self.backoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An acquire dropped after its answer arrived but before it was read gives the
    /// reference back (else the channel stays subscribed with nobody on it).
    #[tokio::test]
    async fn an_acquire_dropped_after_its_answer_gives_the_reference_back() {
        let (upstream, mut rx) = Upstream::channel();
        let channel: Arc<str> = Arc::from("user:1");
        let mut acquire = Box::pin(upstream.acquire(channel.clone()));
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
        let mut acquire = Box::pin(upstream.acquire(channel.clone()));
        assert!(futures_util::poll!(acquire.as_mut()).is_pending());
        let Some(Command::Acquire(_, reply)) = rx.recv().await else {
            panic!("no acquire sent");
        };
        drop(acquire);
        assert!(reply.send(Ok(())).is_err());
        assert!(rx.try_recv().is_err());
    }

    fn c(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    fn acquire(state: &mut State, name: &str) -> oneshot::Receiver<Result<(), BrokerError>> {
        let (tx, rx) = oneshot::channel();
        state.command(Command::Acquire(c(name), tx));
        rx
    }

    fn no_repair(_: &str) {}

    #[test]
    fn the_first_acquire_subscribes_and_the_last_release_unsubscribes() {
        let mut s = State::default();
        let mut first = acquire(&mut s, "user:1");
        assert_eq!(s.calls(16), vec![Call::Subscribe(0, vec![c("user:1")])]);
        // A second acquire while the call is under way waits for it; no second call.
        let mut second = acquire(&mut s, "user:1");
        assert_eq!(s.calls(16), vec![]);
        s.done(
            Done::Subscribed(0, vec![(c("user:1"), Ok(()))]),
            true,
            &no_repair,
        );
        assert!(matches!(first.try_recv(), Ok(Ok(()))));
        assert!(matches!(second.try_recv(), Ok(Ok(()))));
        // Subscribed now: a third is answered at once.
        let mut third = acquire(&mut s, "user:1");
        assert!(matches!(third.try_recv(), Ok(Ok(()))));
        for _ in 0..2 {
            s.command(Command::Release(c("user:1")));
            assert_eq!(s.calls(16), vec![]);
        }
        s.command(Command::Release(c("user:1")));
        assert_eq!(s.calls(16), vec![Call::Unsubscribe(vec![c("user:1")])]);
        s.done(Done::Unsubscribed(vec![c("user:1")]), true, &no_repair);
        assert!(s.subscribed.is_empty() && s.refs.is_empty() && s.in_flight.is_empty());
    }

    #[test]
    fn a_release_during_the_subscribe_unsubscribes_once_it_reports() {
        let mut s = State::default();
        let _rx = acquire(&mut s, "user:1");
        assert_eq!(s.calls(16).len(), 1);
        // The acquirer stops waiting (its connection closed): its answer cannot be
        // delivered, so the task gives its reference back.
        drop(_rx);
        s.done(
            Done::Subscribed(0, vec![(c("user:1"), Ok(()))]),
            true,
            &no_repair,
        );
        assert_eq!(s.calls(16), vec![Call::Unsubscribe(vec![c("user:1")])]);
    }

    #[test]
    fn a_refused_subscribe_answers_its_waiters_and_gives_their_references_back() {
        let mut s = State::default();
        let mut rx = acquire(&mut s, "user:1");
        s.calls(16);
        let refused = BrokerError::Unavailable("down".into());
        s.done(
            Done::Subscribed(0, vec![(c("user:1"), Err(refused))]),
            false,
            &no_repair,
        );
        assert!(matches!(rx.try_recv(), Ok(Err(_))));
        assert!(s.refs.is_empty());
        s.settle(Instant::now());
        assert_eq!(s.retry.at(), None, "nobody holds it: nothing to retry");
    }

    #[test]
    fn a_channel_held_through_a_reconnect_is_retried_with_backoff_then_repaired() {
        let repaired = std::cell::RefCell::new(Vec::new());
        let repair = |ch: &str| repaired.borrow_mut().push(ch.to_string());
        let mut s = State::default();
        let t0 = Instant::now();
        let _rx = acquire(&mut s, "user:1");
        s.calls(16);
        s.done(
            Done::Subscribed(0, vec![(c("user:1"), Ok(()))]),
            true,
            &repair,
        );
        assert!(
            repaired.borrow().is_empty(),
            "a first subscribe needs no repair"
        );
        // The broker reconnects: subscribed again in the new connection.
        s.command(Command::Resubscribe);
        assert_eq!(s.calls(16), vec![Call::Subscribe(1, vec![c("user:1")])]);
        let down = || Err(BrokerError::Unavailable("down".into()));
        let mut waits = Vec::new();
        for _ in 0..7 {
            s.done(
                Done::Subscribed(1, vec![(c("user:1"), down())]),
                true,
                &repair,
            );
            s.settle(t0);
            let at = s.retry.at().expect("a retry is armed");
            waits.push(at - t0);
            s.retry_due();
            assert_eq!(s.calls(16), vec![Call::Subscribe(1, vec![c("user:1")])]);
        }
        let ms: Vec<u128> = waits.iter().map(|d| d.as_millis()).collect();
        assert_eq!(
            ms,
            vec![100, 200, 400, 800, 1600, 3200, 5000],
            "capped exponential backoff"
        );
        s.done(
            Done::Subscribed(1, vec![(c("user:1"), Ok(()))]),
            true,
            &repair,
        );
        s.settle(t0);
        assert_eq!(
            *repaired.borrow(),
            vec!["user:1".to_string()],
            "checked against history once back"
        );
        assert_eq!(s.retry.at(), None);
        // The backoff starts over for the next failure.
        s.command(Command::Resubscribe);
        s.calls(16);
        s.done(
            Done::Subscribed(2, vec![(c("user:1"), down())]),
            true,
            &repair,
        );
        s.settle(t0);
        assert_eq!(s.retry.at(), Some(t0 + RETRY_MIN));
    }

    #[test]
    fn a_subscribe_made_before_a_reconnect_is_made_again() {
        let mut s = State::default();
        let mut rx = acquire(&mut s, "user:1");
        assert_eq!(s.calls(16), vec![Call::Subscribe(0, vec![c("user:1")])]);
        s.command(Command::Resubscribe);
        // Still in flight: decided when it reports.
        assert_eq!(s.calls(16), vec![]);
        s.done(
            Done::Subscribed(0, vec![(c("user:1"), Ok(()))]),
            true,
            &no_repair,
        );
        assert!(
            rx.try_recv().is_err(),
            "not answered by a void subscription"
        );
        assert_eq!(s.calls(16), vec![Call::Subscribe(1, vec![c("user:1")])]);
        // Nobody wants a channel whose old subscribe reports after the reconnect: it
        // is unsubscribed in case it reached the new connection.
        let mut s = State::default();
        let rx = acquire(&mut s, "user:2");
        s.calls(16);
        drop(rx);
        s.command(Command::Release(c("user:2")));
        s.command(Command::Resubscribe);
        s.done(
            Done::Subscribed(0, vec![(c("user:2"), Ok(()))]),
            true,
            &no_repair,
        );
        assert_eq!(s.calls(16), vec![Call::Unsubscribe(vec![c("user:2")])]);
    }

    #[test]
    fn calls_wait_for_a_free_turn_and_go_batched_unsubscribes_first() {
        let mut s = State::default();
        let _a = acquire(&mut s, "user:1");
        let _b = acquire(&mut s, "user:2");
        assert_eq!(s.calls(0), vec![]);
        let _c = acquire(&mut s, "user:3");
        // All three queued, then one batch.
        assert_eq!(
            s.calls(1),
            vec![Call::Subscribe(
                0,
                vec![c("user:1"), c("user:2"), c("user:3")]
            )]
        );
        s.done(
            Done::Subscribed(
                0,
                ["user:1", "user:2", "user:3"]
                    .map(|n| (c(n), Ok(())))
                    .to_vec(),
            ),
            true,
            &no_repair,
        );
        s.command(Command::Release(c("user:1")));
        let _d = acquire(&mut s, "user:4");
        assert_eq!(s.calls(1), vec![Call::Unsubscribe(vec![c("user:1")])]);
        assert_eq!(s.calls(1), vec![Call::Subscribe(0, vec![c("user:4")])]);
    }
}
