//! The broker contract: one set of behaviours every [`Broker`] must show, run against
//! the memory broker, a single real Redis and a real Redis Cluster (`redis-server`
//! processes from `fanout-testkit`, no mocks). Each behaviour is an `async fn` taking
//! the broker and the [`Recorder`] sink it delivers to; each broker kind gets one test
//! that runs every behaviour on a fresh broker (servers are shared within the test,
//! channels are not) and names the behaviours that failed. Reconnecting is tested on
//! its own, against a single Redis that is killed and restarted.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fanout_protocol::Envelope;
use fanout_publisher::{HistoryPolicy, PublishAck};
use fanout_testkit::{RedisCluster, RedisServer};
use futures_util::FutureExt;
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio::time::Instant;

use super::memory::MemoryBroker;
use super::redis::RedisBroker;
use super::{Broker, BrokerError, HistoryQuery, SharedSink, Sink, CONTROL_CHANNEL};

/// The longest any awaited event may take: far beyond what a working broker needs on a
/// loaded machine, so reaching it means the event is not coming.
const WAIT: Duration = Duration::from_secs(10);
/// The longest one behaviour may take, all its waits included.
const BEHAVIOUR_LIMIT: Duration = Duration::from_secs(30);
/// How often a condition on the broker's stored state is polled.
const POLL: Duration = Duration::from_millis(20);
/// The Redis subscriber's liveness probe interval (the node's default is 5 s; shorter
/// here only so that nothing in a test waits on it).
const PROBE: Duration = Duration::from_secs(1);
/// A TTL short enough to watch expire.
const SHORT_TTL: Duration = Duration::from_millis(300);
const LONG_TTL: Duration = Duration::from_secs(60);

/// A [`Sink`] that records everything the broker hands it, and wakes waiters.
struct Recorder {
    deliveries: Mutex<Vec<(String, Vec<u8>)>>,
    reconnects: AtomicUsize,
    lags: AtomicUsize,
    /// Bumped after every event, so that waiters check their condition again.
    events: watch::Sender<u64>,
}

impl Sink for Recorder {
    fn deliver(&self, channel: &str, payload: &[u8]) {
        // The lock is released before waking waiters: they take it to check.
        self.deliveries
            .lock()
            .expect("recorder lock")
            .push((channel.to_string(), payload.to_vec()));
        self.events.send_modify(|n| *n += 1);
    }

    fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::SeqCst);
        self.events.send_modify(|n| *n += 1);
    }

    fn lagged(&self) {
        self.lags.fetch_add(1, Ordering::SeqCst);
        self.events.send_modify(|n| *n += 1);
    }
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            deliveries: Mutex::new(Vec::new()),
            reconnects: AtomicUsize::new(0),
            lags: AtomicUsize::new(0),
            events: watch::channel(0).0,
        }
    }

    fn reconnects(&self) -> usize {
        self.reconnects.load(Ordering::SeqCst)
    }

    fn lags(&self) -> usize {
        self.lags.load(Ordering::SeqCst)
    }

    /// The payloads delivered on `channel`, in arrival order.
    fn payloads(&self, channel: &str) -> Vec<Vec<u8>> {
        self.deliveries
            .lock()
            .expect("recorder lock")
            .iter()
            .filter(|(c, _)| c == channel)
            .map(|(_, p)| p.clone())
            .collect()
    }

    fn envelopes(&self, channel: &str) -> Vec<Envelope> {
        self.payloads(channel)
            .iter()
            .map(|p| Envelope::decode(p, 0))
            .collect()
    }

    /// The `step` of every message delivered on `channel`, in arrival order.
    fn steps(&self, channel: &str) -> Vec<String> {
        self.envelopes(channel).iter().map(step).collect()
    }

    /// Everything received, readable, for failure messages.
    fn summary(&self) -> Vec<(String, String)> {
        self.deliveries
            .lock()
            .expect("recorder lock")
            .iter()
            .map(|(c, p)| (c.clone(), String::from_utf8_lossy(p).into_owned()))
            .collect()
    }

    /// Waits until `done` holds, checking again after every event.
    async fn wait_until(&self, what: &str, mut done: impl FnMut(&Recorder) -> bool) {
        let mut events = self.events.subscribe();
        let waited = tokio::time::timeout(WAIT, async {
            events.wait_for(|_| done(self)).await.map(|_| ())
        })
        .await;
        assert!(
            matches!(waited, Ok(Ok(()))),
            "timed out after {WAIT:?} waiting for {what}; received: {:?}, reconnects: {}, lags: {}",
            self.summary(),
            self.reconnects(),
            self.lags()
        );
    }

    /// Waits for the message with `step` on `channel`; returns the steps delivered
    /// there so far (so that callers can check nothing came twice or out of turn).
    async fn wait_for_step(&self, channel: &str, step: &str) -> Vec<String> {
        self.wait_until(&format!("step {step:?} on {channel}"), |r| {
            r.steps(channel).iter().any(|s| s == step)
        })
        .await;
        self.steps(channel)
    }
}

/// Polls `check` until it holds (for state stored in the broker, which sends no event).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

fn ch(name: &str) -> Arc<str> {
    Arc::from(name)
}

/// A message body naming the test step that sent it.
fn body(step: &str) -> Box<RawValue> {
    RawValue::from_string(format!(r#"{{"step":"{step}"}}"#)).expect("valid JSON")
}

fn step(envelope: &Envelope) -> String {
    serde_json::from_str::<serde_json::Value>(envelope.data.get())
        .ok()
        .and_then(|v| v["step"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("<not a step: {}>", envelope.data.get()))
}

fn offsets(entries: &[Arc<Envelope>]) -> Vec<u64> {
    entries.iter().map(|e| e.offset.unwrap_or(0)).collect()
}

async fn publish_with(
    broker: &dyn Broker,
    channel: &str,
    step: &str,
    history: HistoryPolicy,
) -> PublishAck {
    broker
        .publish(channel, None, &body(step), history, None)
        .await
        .unwrap_or_else(|e| panic!("publish {step:?} on {channel}: {e}"))
}

async fn publish(broker: &dyn Broker, channel: &str, step: &str) -> PublishAck {
    publish_with(broker, channel, step, HistoryPolicy::default()).await
}

async fn subscribe(broker: &dyn Broker, channels: &[&str]) {
    let channels: Vec<Arc<str>> = channels.iter().map(|c| ch(c)).collect();
    broker
        .subscribe(&channels)
        .await
        .unwrap_or_else(|e| panic!("subscribe {channels:?}: {e}"));
}

async fn unsubscribe(broker: &dyn Broker, channels: &[&str]) {
    let channels: Vec<Arc<str>> = channels.iter().map(|c| ch(c)).collect();
    broker
        .unsubscribe(&channels)
        .await
        .unwrap_or_else(|e| panic!("unsubscribe {channels:?}: {e}"));
}

/// Asserts that `channel` (expected unsubscribed) delivers nothing: a probe is published,
/// then the channel is subscribed and a marker published. Probe and marker go to the
/// same subscriber connection in that order (same channel, so same shard), so once the
/// marker is in, a delivered probe would be in too. Leaves the channel unsubscribed.
///
/// The Redis brokers' UNSUBSCRIBE is not confirmed (fred answers it as it is written),
/// so "after unsubscribe" here means once the command is on the wire before the probe's
/// publish: true on the tests' single-threaded runtime.
async fn assert_silent(broker: &dyn Broker, sink: &Recorder, channel: &str) {
    let before = sink.steps(channel).len();
    publish(broker, channel, "probe").await;
    subscribe(broker, &[channel]).await;
    publish(broker, channel, "marker").await;
    let steps = sink.wait_for_step(channel, "marker").await;
    assert_eq!(
        steps[before..],
        ["marker"],
        "{channel} delivered while it was not subscribed"
    );
    unsubscribe(broker, &[channel]).await;
}

// ---------------------------------------------------------------------------------
// The behaviours.

/// A publish reaches a subscriber once, as an envelope carrying the data, event, offset
/// and epoch the publish was acknowledged with; after unsubscribe nothing arrives.
async fn delivers_each_publish_once_until_unsubscribed(broker: &dyn Broker, sink: &Recorder) {
    let c = "deliver:a";
    subscribe(broker, &[c]).await;
    let ack = broker
        .publish(
            c,
            Some("greeting"),
            &body("one"),
            HistoryPolicy::default(),
            None,
        )
        .await
        .expect("publish");
    publish(broker, c, "two").await;
    assert_eq!(sink.wait_for_step(c, "two").await, ["one", "two"]);
    let first = &sink.envelopes(c)[0];
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(first.data.get()).expect("data is JSON"),
        serde_json::json!({"step": "one"})
    );
    assert_eq!(first.event.as_deref(), Some("greeting"));
    assert_eq!(first.offset, Some(ack.offset));
    assert_eq!(first.epoch.as_deref(), Some(ack.epoch.as_str()));
    assert!(first.notice.is_none());

    unsubscribe(broker, &[c]).await;
    assert_silent(broker, sink, c).await;
}

/// One subscribe call takes a batch of channels; unsubscribing one of them leaves the
/// others delivering.
async fn subscribes_a_batch_and_unsubscribes_one_of_it(broker: &dyn Broker, sink: &Recorder) {
    let (a, b, c) = ("batch:a", "batch:b", "batch:c");
    subscribe(broker, &[a, b, c]).await;
    for channel in [a, b, c] {
        publish(broker, channel, "all").await;
    }
    for channel in [a, b, c] {
        assert_eq!(sink.wait_for_step(channel, "all").await, ["all"]);
    }
    unsubscribe(broker, &[b]).await;
    for channel in [a, c] {
        publish(broker, channel, "after").await;
        assert_eq!(sink.wait_for_step(channel, "after").await, ["all", "after"]);
    }
    assert_silent(broker, sink, b).await;
}

/// The broker does not count references (the node's `Upstream` task does): a
/// channel subscribed several times, in separate calls or twice in one, delivers each
/// message once, and one unsubscribe ends it.
async fn subscribing_twice_delivers_once_and_one_unsubscribe_ends_it(
    broker: &dyn Broker,
    sink: &Recorder,
) {
    let c = "twice:a";
    subscribe(broker, &[c]).await;
    subscribe(broker, &[c]).await;
    subscribe(broker, &[c, c]).await;
    publish(broker, c, "one").await;
    publish(broker, c, "two").await;
    assert_eq!(sink.wait_for_step(c, "two").await, ["one", "two"]);
    unsubscribe(broker, &[c]).await;
    assert_silent(broker, sink, c).await;
}

/// Unsubscribing a channel that is not subscribed (never, or no longer) is no error
/// and touches no other channel.
async fn unsubscribing_what_is_not_subscribed_is_harmless(broker: &dyn Broker, sink: &Recorder) {
    let (kept, gone) = ("unsub:kept", "unsub:gone");
    subscribe(broker, &[kept, gone]).await;
    unsubscribe(broker, &["unsub:never"]).await;
    unsubscribe(broker, &[gone]).await;
    unsubscribe(broker, &[gone]).await;
    unsubscribe(broker, &[gone, "unsub:never"]).await;
    publish(broker, kept, "still").await;
    assert_eq!(sink.wait_for_step(kept, "still").await, ["still"]);
    assert_silent(broker, sink, gone).await;
}

/// Empty subscribe and unsubscribe batches change nothing (in Redis a bare UNSUBSCRIBE
/// would drop every channel of the connection, and a bare SUBSCRIBE is refused).
async fn empty_batches_change_nothing(broker: &dyn Broker, sink: &Recorder) {
    let c = "empty:a";
    subscribe(broker, &[c]).await;
    broker.subscribe(&[]).await.expect("empty subscribe");
    broker.unsubscribe(&[]).await.expect("empty unsubscribe");
    publish(broker, c, "still").await;
    assert_eq!(sink.wait_for_step(c, "still").await, ["still"]);
    // The connection is still in step for the next (un)subscribe.
    subscribe(broker, &["empty:b"]).await;
    publish(broker, "empty:b", "b").await;
    assert_eq!(sink.wait_for_step("empty:b", "b").await, ["b"]);
}

/// Consecutive publishes on a channel get offsets 1, 2, 3 in one epoch, delivered in
/// that order; another channel counts on its own.
async fn publishes_count_offsets_in_one_epoch(broker: &dyn Broker, sink: &Recorder) {
    let (c, other) = ("offsets:a", "offsets:b");
    subscribe(broker, &[c]).await;
    let mut acks = Vec::new();
    for s in ["1", "2", "3"] {
        acks.push(publish(broker, c, s).await);
    }
    assert_eq!(acks.iter().map(|a| a.offset).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(acks
        .iter()
        .all(|a| a.epoch == acks[0].epoch && !a.duplicate));
    assert!(!acks[0].epoch.is_empty());
    assert_eq!(sink.wait_for_step(c, "3").await, ["1", "2", "3"]);
    for (envelope, ack) in sink.envelopes(c).iter().zip(&acks) {
        assert_eq!(envelope.offset, Some(ack.offset));
        assert_eq!(envelope.epoch.as_deref(), Some(ack.epoch.as_str()));
    }
    let elsewhere = publish(broker, other, "x").await;
    assert_eq!(elsewhere.offset, 1);
    assert_ne!(elsewhere.epoch, acks[0].epoch);
}

/// An idempotency key applied on a channel is not published again: the second ack has
/// `duplicate` set and the first's offset and epoch. Keys are per channel.
async fn an_idempotency_key_publishes_once(broker: &dyn Broker, sink: &Recorder) {
    let c = "dedup:a";
    let policy = HistoryPolicy::default();
    subscribe(broker, &[c]).await;
    let first = broker
        .publish(c, None, &body("first"), policy, Some("key-1"))
        .await
        .expect("publish");
    let again = broker
        .publish(c, None, &body("again"), policy, Some("key-1"))
        .await
        .expect("publish");
    let other = broker
        .publish(c, None, &body("other"), policy, Some("key-2"))
        .await
        .expect("publish");
    assert!(!first.duplicate);
    assert_eq!(
        again,
        PublishAck {
            duplicate: true,
            ..first.clone()
        }
    );
    assert_eq!((other.offset, other.duplicate), (first.offset + 1, false));
    assert_eq!(sink.wait_for_step(c, "other").await, ["first", "other"]);
    let read = broker
        .history(c, HistoryQuery::After(0), None)
        .await
        .expect("history");
    assert_eq!(read.top, 2);
    assert_eq!(
        read.entries.iter().map(|e| step(e)).collect::<Vec<_>>(),
        ["first", "other"]
    );
    // The same key on another channel is a new publish.
    let elsewhere = broker
        .publish("dedup:b", None, &body("b"), policy, Some("key-1"))
        .await
        .expect("publish");
    assert_eq!((elsewhere.offset, elsewhere.duplicate), (1, false));
}

/// With history disabled (size 0) publishes are still delivered and still get offsets
/// and an epoch; nothing is kept.
async fn history_disabled_still_delivers(broker: &dyn Broker, sink: &Recorder) {
    let c = "nohistory:a";
    let policy = HistoryPolicy {
        size: 0,
        ..HistoryPolicy::default()
    };
    subscribe(broker, &[c]).await;
    let one = publish_with(broker, c, "one", policy).await;
    let two = publish_with(broker, c, "two", policy).await;
    assert_eq!((one.offset, two.offset), (1, 2));
    assert_eq!(one.epoch, two.epoch);
    assert_eq!(sink.wait_for_step(c, "two").await, ["one", "two"]);
    assert_eq!(
        sink.envelopes(c)
            .iter()
            .map(|e| e.offset)
            .collect::<Vec<_>>(),
        [Some(1), Some(2)]
    );
    let read = broker
        .history(c, HistoryQuery::Last(10), None)
        .await
        .expect("history");
    assert_eq!(read.epoch.as_deref(), Some(one.epoch.as_str()));
    assert_eq!(read.top, 2);
    assert!(read.entries.is_empty(), "{:?}", read.entries);
}

/// `After(n)` reads the kept messages past `n`, `Last(n)` the newest `n`, both oldest
/// first; `Last(0)` reads only the position.
async fn history_reads_after_and_last(broker: &dyn Broker, _sink: &Recorder) {
    let c = "history:a";
    let mut epoch = String::new();
    for s in ["1", "2", "3", "4", "5"] {
        let ack = broker
            .publish(c, Some("e"), &body(s), HistoryPolicy::default(), None)
            .await
            .expect("publish");
        epoch = ack.epoch;
    }
    let read = |query| async move { broker.history(c, query, None).await.expect("history") };

    let after = read(HistoryQuery::After(2)).await;
    assert_eq!(
        (after.epoch.as_deref(), after.top),
        (Some(epoch.as_str()), 5)
    );
    assert_eq!(offsets(&after.entries), [3, 4, 5]);
    let e = &after.entries[0];
    assert_eq!((step(e).as_str(), e.event.as_deref()), ("3", Some("e")));
    assert_eq!(e.epoch.as_deref(), Some(epoch.as_str()));
    assert_eq!(
        offsets(&read(HistoryQuery::After(0)).await.entries),
        [1, 2, 3, 4, 5]
    );
    let at_top = read(HistoryQuery::After(5)).await;
    assert_eq!(at_top.top, 5);
    assert!(at_top.entries.is_empty());
    assert!(read(HistoryQuery::After(9)).await.entries.is_empty());

    assert_eq!(offsets(&read(HistoryQuery::Last(2)).await.entries), [4, 5]);
    assert_eq!(
        offsets(&read(HistoryQuery::Last(100)).await.entries),
        [1, 2, 3, 4, 5]
    );
    let position = read(HistoryQuery::Last(0)).await;
    assert_eq!(
        (position.epoch.as_deref(), position.top),
        (Some(epoch.as_str()), 5)
    );
    assert!(position.entries.is_empty());
}

/// A channel never published to has no position; read with `start` it gets an epoch at
/// offset 0, which later reads see and the first publish continues (offset 1).
async fn history_of_an_unpublished_channel(broker: &dyn Broker, _sink: &Recorder) {
    let c = "fresh:a";
    for query in [HistoryQuery::Last(10), HistoryQuery::After(0)] {
        let read = broker.history(c, query, None).await.expect("history");
        assert_eq!((read.epoch, read.top), (None, 0));
        assert!(read.entries.is_empty());
    }
    let started = broker
        .history(c, HistoryQuery::Last(10), Some(LONG_TTL))
        .await
        .expect("history");
    let epoch = started.epoch.clone().expect("start gives an epoch");
    assert_eq!(started.top, 0);
    assert!(started.entries.is_empty());
    let seen = broker
        .history(c, HistoryQuery::After(0), None)
        .await
        .expect("history");
    assert_eq!((seen.epoch.as_deref(), seen.top), (Some(epoch.as_str()), 0));
    // Starting again keeps the epoch.
    let again = broker
        .history(c, HistoryQuery::Last(0), Some(LONG_TTL))
        .await
        .expect("history");
    assert_eq!(again.epoch.as_deref(), Some(epoch.as_str()));
    let ack = publish(broker, c, "first").await;
    assert_eq!((ack.offset, ack.epoch.as_str()), (1, epoch.as_str()));
}

/// At most `size` messages are kept. A read from an offset older than the oldest kept
/// gets what is kept: the first entry's offset beyond `after + 1` shows the gap, and
/// `top` still counts every publish.
async fn history_keeps_at_most_size_messages(broker: &dyn Broker, _sink: &Recorder) {
    let c = "capped:a";
    let policy = HistoryPolicy {
        size: 3,
        ..HistoryPolicy::default()
    };
    for s in ["1", "2", "3", "4", "5"] {
        publish_with(broker, c, s, policy).await;
    }
    let last = broker
        .history(c, HistoryQuery::Last(10), None)
        .await
        .expect("history");
    assert_eq!((last.top, offsets(&last.entries)), (5, vec![3, 4, 5]));
    for after in [0, 1] {
        let read = broker
            .history(c, HistoryQuery::After(after), None)
            .await
            .expect("history");
        assert_eq!((read.top, offsets(&read.entries)), (5, vec![3, 4, 5]));
    }
}

/// Control broadcasts reach the sink on [`CONTROL_CHANNEL`], as sent, and count the
/// nodes subscribed to it; a node not subscribed gets nothing.
async fn broadcast_control_reaches_subscribed_nodes(broker: &dyn Broker, sink: &Recorder) {
    let payload = r#"{"op":"contract","n":1}"#;
    subscribe(broker, &[CONTROL_CHANNEL]).await;
    assert_eq!(
        broker.broadcast_control(payload).await.expect("broadcast"),
        1
    );
    sink.wait_until("the control message", |r| {
        !r.payloads(CONTROL_CHANNEL).is_empty()
    })
    .await;
    assert_eq!(sink.payloads(CONTROL_CHANNEL), [payload.as_bytes()]);

    unsubscribe(broker, &[CONTROL_CHANNEL]).await;
    assert_eq!(
        broker.broadcast_control("probe").await.expect("broadcast"),
        0
    );
    subscribe(broker, &[CONTROL_CHANNEL]).await;
    assert_eq!(
        broker.broadcast_control("marker").await.expect("broadcast"),
        1
    );
    sink.wait_until("the control marker", |r| {
        r.payloads(CONTROL_CHANNEL).iter().any(|p| p == b"marker")
    })
    .await;
    assert_eq!(
        sink.payloads(CONTROL_CHANNEL),
        [payload.as_bytes(), b"marker"],
        "a control message reached a node not subscribed to the control channel"
    );
}

/// `notify` delivers its payload as it is, to subscribers only, and leaves no history.
async fn notify_delivers_the_payload_as_is(broker: &dyn Broker, sink: &Recorder) {
    let (c, unsubscribed) = ("notify:a", "notify:b");
    let join = r#"{"fanout":1,"notice":"join","data":{"id":"1"}}"#;
    subscribe(broker, &[c]).await;
    broker.notify(c, join).await.expect("notify");
    broker.notify(c, "plain text").await.expect("notify");
    sink.wait_until("two notices", |r| r.payloads(c).len() >= 2)
        .await;
    assert_eq!(sink.payloads(c), [join.as_bytes(), b"plain text"]);
    let read = broker
        .history(c, HistoryQuery::Last(10), None)
        .await
        .expect("history");
    assert_eq!((read.epoch, read.top, read.entries.len()), (None, 0, 0));

    broker.notify(unsubscribed, "probe").await.expect("notify");
    subscribe(broker, &[unsubscribed]).await;
    broker.notify(unsubscribed, "marker").await.expect("notify");
    sink.wait_until("the notice marker", |r| {
        r.payloads(unsubscribed).iter().any(|p| p == b"marker")
    })
    .await;
    assert_eq!(sink.payloads(unsubscribed), [b"marker"]);
}

/// Node reports are listed until their TTL passes; a node's new report replaces its old.
async fn reports_round_trip_and_expire(broker: &dyn Broker, _sink: &Recorder) {
    let sorted = || async {
        let mut reports = broker.reports().await.expect("reports");
        reports.sort();
        reports
    };
    let (a1, a2, b) = (
        r#"{"node":"a","n":1}"#,
        r#"{"node":"a","n":2}"#,
        r#"{"node":"b"}"#,
    );
    broker
        .report("contract-a", a1, LONG_TTL)
        .await
        .expect("report");
    broker
        .report("contract-b", b, SHORT_TTL)
        .await
        .expect("report");
    assert_eq!(sorted().await, [a1, b]);
    broker
        .report("contract-a", a2, LONG_TTL)
        .await
        .expect("report");
    assert_eq!(sorted().await, [a2, b]);
    eventually("node b's report to expire", || async {
        sorted().await == [a2]
    })
    .await;
}

/// Presence: set, refresh (several at once), replace, remove, expire and prune behave
/// alike; expired entries are left out and pruned, live ones never.
async fn presence_set_remove_expire_and_prune(broker: &dyn Broker, _sink: &Recorder) {
    let c = "presence:a";
    let present = || async {
        let mut infos = broker.presence(c).await.expect("presence");
        infos.sort();
        infos
    };
    let (one, one_b, two, three) = (
        r#"{"id":"1"}"#,
        r#"{"id":"1b"}"#,
        r#"{"id":"2"}"#,
        r#"{"id":"3"}"#,
    );
    broker
        .presence_set(c, "c1", one, LONG_TTL)
        .await
        .expect("set");
    broker
        .presence_set(c, "c2", two, LONG_TTL)
        .await
        .expect("set");
    assert_eq!(present().await, [one, two]);
    broker
        .presence_set(c, "c1", one_b, LONG_TTL)
        .await
        .expect("set");
    assert_eq!(present().await, [one_b, two]);
    broker.presence_remove(c, "c2").await.expect("remove");
    broker.presence_remove(c, "nobody").await.expect("remove");
    broker
        .presence_remove("presence:empty", "nobody")
        .await
        .expect("remove");
    assert_eq!(present().await, [one_b]);
    assert!(broker
        .presence("presence:empty")
        .await
        .expect("presence")
        .is_empty());
    broker
        .presence_refresh(
            c,
            &[
                ("c2".to_string(), two.to_string()),
                ("c3".to_string(), three.to_string()),
            ],
            LONG_TTL,
        )
        .await
        .expect("refresh");
    assert_eq!(present().await, [one_b, two, three]);

    // A short TTL: present now, gone once it passed.
    broker
        .presence_set(c, "short", r#"{"id":"short"}"#, SHORT_TTL)
        .await
        .expect("set");
    assert!(present().await.contains(&r#"{"id":"short"}"#.to_string()));
    eventually("the short presence to expire", || async {
        present().await == [one_b, two, three]
    })
    .await;

    // Prune deletes only what has expired by then.
    broker
        .presence_set(c, "prunable", r#"{"id":"p"}"#, SHORT_TTL)
        .await
        .expect("set");
    let candidates = [
        "prunable".to_string(),
        "c1".to_string(),
        "nobody".to_string(),
    ];
    assert_eq!(
        broker.presence_prune(c, &candidates).await.expect("prune"),
        0
    );
    let deadline = Instant::now() + WAIT;
    let pruned = loop {
        let n = broker.presence_prune(c, &candidates).await.expect("prune");
        if n > 0 || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(pruned, 1, "exactly the expired entry is pruned");
    assert_eq!(present().await, [one_b, two, three]);
}

/// What Redis refuses the memory broker refuses too: a malformed channel (the control
/// channel included) or idempotency key is `Invalid`, and nothing is published.
async fn publish_refuses_bad_channels_and_keys(broker: &dyn Broker, _sink: &Recorder) {
    let policy = HistoryPolicy::default();
    for bad in ["", "no-namespace", "space:a b", CONTROL_CHANNEL] {
        let refused = broker.publish(bad, None, &body("x"), policy, None).await;
        assert!(
            matches!(refused, Err(BrokerError::Invalid(_))),
            "channel {bad:?}: {refused:?}"
        );
    }
    let c = "refuse:a";
    for bad in ["", "has space"] {
        let refused = broker.publish(c, None, &body("x"), policy, Some(bad)).await;
        assert!(
            matches!(refused, Err(BrokerError::Invalid(_))),
            "key {bad:?}: {refused:?}"
        );
    }
    let read = broker
        .history(c, HistoryQuery::Last(10), None)
        .await
        .expect("history");
    assert_eq!((read.epoch, read.top), (None, 0));
}

type Run<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;
type Behaviour = for<'a> fn(&'a dyn Broker, &'a Recorder) -> Run<'a>;

macro_rules! contract {
    ($($behaviour:ident),* $(,)?) => {
        /// Every behaviour, with its name.
        const CONTRACT: &[(&str, Behaviour)] =
            &[$((stringify!($behaviour), |broker, sink| Box::pin($behaviour(broker, sink)))),*];
    };
}

contract![
    delivers_each_publish_once_until_unsubscribed,
    subscribes_a_batch_and_unsubscribes_one_of_it,
    subscribing_twice_delivers_once_and_one_unsubscribe_ends_it,
    unsubscribing_what_is_not_subscribed_is_harmless,
    empty_batches_change_nothing,
    publishes_count_offsets_in_one_epoch,
    an_idempotency_key_publishes_once,
    history_disabled_still_delivers,
    history_reads_after_and_last,
    history_of_an_unpublished_channel,
    history_keeps_at_most_size_messages,
    broadcast_control_reaches_subscribed_nodes,
    notify_delivers_the_payload_as_is,
    reports_round_trip_and_expire,
    presence_set_remove_expire_and_prune,
    publish_refuses_bad_channels_and_keys,
];

/// Runs every behaviour on a fresh broker from `connect` (and a fresh recorder), all of
/// them even after a failure, then fails naming those that failed. No behaviour may
/// make the broker report lag.
async fn run_contract<F, Fut>(kind: &str, connect: F) -> Vec<Arc<Recorder>>
where
    F: Fn(SharedSink) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let mut failed = Vec::new();
    let mut sinks = Vec::new();
    for (name, behaviour) in CONTRACT {
        let sink = Arc::new(Recorder::new());
        let broker = connect(sink.clone()).await;
        assert!(broker.is_ready(), "{kind}: not ready once connected");
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            BEHAVIOUR_LIMIT,
            AssertUnwindSafe(behaviour(&*broker, &sink)).catch_unwind(),
        )
        .await;
        broker.shutdown().await;
        let verdict = match outcome {
            Err(_) => format!("FAILED: still running after {BEHAVIOUR_LIMIT:?}"),
            // The panic message is already printed by the panic hook.
            Ok(Err(_)) => "FAILED (panic above)".to_string(),
            Ok(Ok(())) if sink.lags() > 0 => format!("FAILED: {} lag(s) reported", sink.lags()),
            Ok(Ok(())) => String::new(),
        };
        if verdict.is_empty() {
            eprintln!("{kind}: {name}: ok in {:?}", started.elapsed());
        } else {
            eprintln!("{kind}: {name}: {verdict}");
            failed.push(*name);
        }
        sinks.push(sink);
    }
    assert!(
        failed.is_empty(),
        "the {kind} broker breaks the contract: {failed:?}"
    );
    sinks
}

/// Reconnecting is skipped for this broker: it has no connection to lose (Redis is
/// covered by `redis_broker_resubscribes_after_a_restart`), so it must never ask for
/// resubscription either.
#[tokio::test]
async fn memory_broker_keeps_the_contract() {
    let sinks = run_contract("memory", |sink| async move {
        Arc::new(MemoryBroker::new(sink)) as Arc<dyn Broker>
    })
    .await;
    assert!(sinks.iter().all(|s| s.reconnects() == 0));
}

fn redis_connector(
    url: String,
) -> impl Fn(SharedSink) -> Pin<Box<dyn Future<Output = Arc<dyn Broker>>>> {
    move |sink| {
        let url = url.clone();
        Box::pin(async move {
            let broker = RedisBroker::connect(&url, PROBE, sink)
                .await
                .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
            assert_eq!(broker.kind(), "redis");
            Arc::new(broker) as Arc<dyn Broker>
        })
    }
}

#[tokio::test]
async fn redis_broker_keeps_the_contract() {
    let redis = RedisServer::start().expect("redis-server");
    run_contract("redis", redis_connector(redis.url())).await;
}

#[tokio::test]
async fn redis_cluster_broker_keeps_the_contract() {
    // Three primaries, the fewest Redis accepts; no replicas, nothing fails over here.
    let cluster = RedisCluster::start(3, 0).expect("redis cluster");
    run_contract("redis cluster", redis_connector(cluster.url())).await;
}

/// A restarted Redis (no persistence: it forgets subscriptions and history) makes the
/// broker not ready, then ready again with `reconnected()` on the sink; subscribed
/// again, as the node's upstream task does then, channels deliver again.
#[tokio::test]
async fn redis_broker_resubscribes_after_a_restart() {
    let mut redis = RedisServer::start().expect("redis-server");
    let sink = Arc::new(Recorder::new());
    let broker = redis_connector(redis.url())(sink.clone()).await;
    let broker = &*broker;
    let c = "restart:a";
    subscribe(broker, &[c]).await;
    let before = publish(broker, c, "before").await;
    sink.wait_for_step(c, "before").await;

    redis.kill();
    eventually("the broker to notice Redis is gone", || async {
        !broker.is_ready()
    })
    .await;
    // Counted from here: the initial connection may have been reported as one.
    let reconnects = sink.reconnects();
    redis.restart().expect("restart redis-server");
    sink.wait_until("reconnected()", |r| r.reconnects() > reconnects)
        .await;
    eventually("the broker to be ready again", || async {
        broker.is_ready()
    })
    .await;

    subscribe(broker, &[c]).await;
    let after = publish(broker, c, "after").await;
    assert_eq!(sink.wait_for_step(c, "after").await, ["before", "after"]);
    // The new server starts the channel over, in a new epoch: how subscribers notice
    // that what they missed is gone.
    assert_eq!(after.offset, 1);
    assert_ne!(after.epoch, before.epoch);
    assert_eq!(sink.lags(), 0);
    broker.shutdown().await;
}
