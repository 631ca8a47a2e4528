//! The hub: channel → local subscribers, sharded so that publishing on one channel and
//! subscribing to another rarely share a lock. It never awaits: dispatch pushes shared
//! bytes into each subscriber's bounded [`Outbox`] and moves on; a full outbox closes
//! that connection (4009) and never delays the others.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use bytes::Bytes;
use fanout_protocol::{CloseCode, Codec, Envelope};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

pub type SessionId = u64;

/// How a connection is told to close, from anywhere (hub, admin API, drain, its own
/// reader). The first close asked for wins.
pub struct Control {
    close: OnceLock<(u16, String)>,
    cancel: CancellationToken,
}

impl Control {
    pub fn new(cancel: CancellationToken) -> Control {
        Control {
            close: OnceLock::new(),
            cancel,
        }
    }

    /// Closes the connection with a close frame carrying `code`.
    pub fn close(&self, code: CloseCode) {
        self.close_raw(code.code(), code.reason().to_string());
    }

    /// Closes with any code and reason (used to echo a client's close frame).
    pub fn close_raw(&self, code: u16, reason: String) {
        if self.close.set((code, reason)).is_ok() {
            self.cancel.cancel();
        }
    }

    /// Ends the connection without a close frame (the peer is gone).
    pub fn abort(&self) {
        self.cancel.cancel();
    }

    /// The close code asked for, if any.
    pub fn code(&self) -> Option<CloseCode> {
        self.close.get().and_then(|(c, _)| CloseCode::from_u16(*c))
    }

    /// The close frame to send, if any.
    pub fn close_frame(&self) -> Option<&(u16, String)> {
        self.close.get()
    }

    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// A connection's bounded outbound queue of encoded frames.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Bytes>,
    control: Arc<Control>,
    slow: Arc<AtomicBool>,
}

impl Outbox {
    pub fn new(capacity: usize, control: Arc<Control>) -> (Outbox, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Outbox {
                tx,
                control,
                slow: Arc::new(AtomicBool::new(false)),
            },
            rx,
        )
    }

    /// Queues a frame without waiting. A full queue marks the connection a slow
    /// consumer and closes it with 4009; returns whether the frame was queued.
    // hot path: no allocation per subscriber (Bytes is a reference count).
    pub fn push(&self, frame: Bytes) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.slow.swap(true, Ordering::Relaxed) {
                    metrics::counter!(m::SLOW_CONSUMER_CLOSES_TOTAL).increment(1);
                    tracing::info!("slow consumer: outbound queue full, closing with 4009");
                    self.control.close(CloseCode::SlowConsumer);
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Frames waiting in the queue.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// A local subscriber of a channel.
#[derive(Clone)]
pub struct Subscriber {
    pub id: SessionId,
    pub codec: Codec,
    pub outbox: Outbox,
}

type Shard = RwLock<HashMap<Arc<str>, Vec<Subscriber>>>;

pub struct Hub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    subscriptions: AtomicUsize,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new(64)
    }
}

impl Hub {
    pub fn new(shards: usize) -> Hub {
        Hub {
            shards: (0..shards.max(1)).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            subscriptions: AtomicUsize::new(0),
        }
    }

    fn shard(&self, channel: &str) -> &Shard {
        let i = self.hasher.hash_one(channel) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Adds `sub` to `channel`. A session adds itself once per channel.
    pub fn add(&self, channel: Arc<str>, sub: Subscriber) {
        let mut shard = self.shard(&channel).write().expect("hub lock");
        shard.entry(channel).or_default().push(sub);
        let n = self.subscriptions.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(m::SUBSCRIPTIONS).set(n as f64);
    }

    /// Removes session `id` from `channel`; returns whether it was there.
    pub fn remove(&self, channel: &str, id: SessionId) -> bool {
        let mut shard = self.shard(channel).write().expect("hub lock");
        let Some(subs) = shard.get_mut(channel) else {
            return false;
        };
        let Some(pos) = subs.iter().position(|s| s.id == id) else {
            return false;
        };
        subs.swap_remove(pos);
        if subs.is_empty() {
            shard.remove(channel);
        }
        let n = self.subscriptions.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!(m::SUBSCRIPTIONS).set(n as f64);
        true
    }

    /// Delivers one message to every local subscriber of `channel`: encodes the frame
    /// once per codec in use and queues the same bytes everywhere. Returns the number of
    /// subscribers it was queued to.
    pub fn dispatch(&self, channel: &str, envelope: &Envelope) -> usize {
        let shard = self.shard(channel).read().expect("hub lock");
        let Some(subs) = shard.get(channel) else {
            return 0;
        };
        let mut json: Option<Bytes> = None;
        let mut msgpack: Option<Bytes> = None;
        let mut queued = 0;
        // hot path: no allocation or lock per subscriber.
        for sub in subs {
            let frame = match sub.codec {
                Codec::Json => {
                    json.get_or_insert_with(|| envelope.encode_message(channel, Codec::Json))
                }
                Codec::MsgPack => {
                    msgpack.get_or_insert_with(|| envelope.encode_message(channel, Codec::MsgPack))
                }
            };
            if sub.outbox.push(frame.clone()) {
                queued += 1;
            }
        }
        queued
    }

    /// Subscriptions across all channels.
    pub fn subscriptions(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// Channels with at least one local subscriber.
    pub fn channels(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().expect("hub lock").len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscriber(id: SessionId, codec: Codec, cap: usize) -> (Subscriber, mpsc::Receiver<Bytes>) {
        let control = Arc::new(Control::new(CancellationToken::new()));
        let (outbox, rx) = Outbox::new(cap, control);
        (Subscriber { id, codec, outbox }, rx)
    }

    #[test]
    fn dispatch_shares_one_encoding_per_codec() {
        let hub = Hub::new(4);
        let ch: Arc<str> = Arc::from("user:1");
        let (a, mut ra) = subscriber(1, Codec::Json, 8);
        let (b, mut rb) = subscriber(2, Codec::Json, 8);
        let (c, mut rc) = subscriber(3, Codec::MsgPack, 8);
        hub.add(ch.clone(), a);
        hub.add(ch.clone(), b);
        hub.add(ch.clone(), c);
        let env = Envelope::decode(br#"{"x":1}"#, 5);
        assert_eq!(hub.dispatch("user:1", &env), 3);
        let fa = ra.try_recv().unwrap();
        let fb = rb.try_recv().unwrap();
        // Same allocation: the bytes were encoded once and shared.
        assert_eq!(fa.as_ptr(), fb.as_ptr());
        let fc = rc.try_recv().unwrap();
        assert_ne!(fa, fc);
        assert_eq!(hub.dispatch("user:2", &env), 0);
    }

    #[test]
    fn full_outbox_closes_only_that_subscriber() {
        let hub = Hub::new(4);
        let ch: Arc<str> = Arc::from("user:1");
        let (slow, _rs) = subscriber(1, Codec::Json, 2);
        let (fast, mut rf) = subscriber(2, Codec::Json, 100);
        let slow_control = slow.outbox.control().clone();
        let fast_control = fast.outbox.control().clone();
        hub.add(ch.clone(), slow);
        hub.add(ch.clone(), fast);
        let env = Envelope::decode(b"1", 0);
        for _ in 0..10 {
            hub.dispatch("user:1", &env);
        }
        assert_eq!(slow_control.code(), Some(CloseCode::SlowConsumer));
        assert_eq!(fast_control.code(), None);
        let mut got = 0;
        while rf.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, 10);
    }

    #[test]
    fn remove_cleans_up() {
        let hub = Hub::new(2);
        let (a, _ra) = subscriber(1, Codec::Json, 1);
        hub.add(Arc::from("user:1"), a);
        assert_eq!((hub.channels(), hub.subscriptions()), (1, 1));
        assert!(hub.remove("user:1", 1));
        assert!(!hub.remove("user:1", 1));
        assert_eq!((hub.channels(), hub.subscriptions()), (0, 0));
    }
}
