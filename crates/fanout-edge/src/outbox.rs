//! A connection's outbound queue: bounded in frames and in bytes. The hub pushes into
//! an [`Outbox`] without ever waiting; the transport's writer drains the matching
//! [`OutboxReader`]. A push that would pass either bound marks the connection a slow
//! consumer and closes it with 4009 — unless the message's channel conflates: then
//! only its newest message is kept, in a side slot per channel that the writer sends
//! once the queue has drained.
//!
//! Messages the node replays on its own initiative (a `since` recovery, a gap repair)
//! are not the client's fault: they go on top of the bound, within a separate replay
//! budget, and the bound applies again on top of them until the queue has drained.
//! Every queued byte is counted node-wide (`fanout_outbound_queue_bytes`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use fanout_protocol::CloseCode;
use futures_util::task::AtomicWaker;
use tokio::sync::mpsc;

use crate::control::Control;
use crate::metrics as m;

/// Bytes queued on every connection of this process.
static QUEUED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes waiting in every connection's outbound queue, node-wide.
pub fn queued_bytes() -> usize {
    QUEUED_BYTES.load(Ordering::Relaxed)
}

/// The bounds of one connection's queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Frames queued by live traffic before the connection is a slow consumer.
    pub messages: usize,
    /// Bytes likewise (a single larger frame is still accepted into an empty queue).
    pub bytes: usize,
    /// Frames and bytes the node may replay on top (recovery, gap repair).
    pub replay_messages: usize,
    pub replay_bytes: usize,
}

/// An encoded frame, shared by every connection it goes to: a thin pointer, so that a
/// queue slot is one word (see [`Item`]).
pub type Frame = Arc<Bytes>;

/// A queued frame and the budget it counts against, in one word: the frame's pointer,
/// its lowest bit set for a replayed frame. (An enum would take two words, and tokio's
/// queue allocates 32 slots per connection up front: this keeps 256 bytes off every
/// connection.)
struct Item(std::ptr::NonNull<Bytes>);

// The tag lives in the pointer's lowest bit: that bit of an `Arc<Bytes>` data pointer
// must be free, whatever the platform. Checked when compiling, not only in debug runs.
const _: () = assert!(std::mem::align_of::<Bytes>() > Item::REPLAY);

// SAFETY: an Item owns one strong count of an `Arc<Bytes>`, which is Send.
unsafe impl Send for Item {}

impl Item {
    const REPLAY: usize = 1;

    fn new(frame: Frame, replay: bool) -> Item {
        let ptr = Arc::into_raw(frame);
        // `Bytes` is word-aligned (asserted at compile time above), so the lowest bit
        // of its address is free.
        let tagged = ptr.map_addr(|a| a | if replay { Self::REPLAY } else { 0 });
        Item(std::ptr::NonNull::new(tagged.cast_mut()).expect("Arc pointers are not null"))
    }

    /// The frame, and whether it was replayed.
    fn into_parts(self) -> (Frame, bool) {
        let tagged = self.0.as_ptr().cast_const();
        std::mem::forget(self);
        let replay = tagged.addr() & Self::REPLAY != 0;
        // SAFETY: the untagged pointer is the one `Arc::into_raw` returned in `new`, and
        // `self` (forgotten above) owned its count, which passes to the new Arc.
        let frame = unsafe { Arc::from_raw(tagged.map_addr(|a| a & !Self::REPLAY)) };
        (frame, replay)
    }
}

impl Drop for Item {
    fn drop(&mut self) {
        let tagged = self.0.as_ptr().cast_const();
        // SAFETY: as in `into_parts`; this Item is not used again.
        drop(unsafe { Arc::from_raw(tagged.map_addr(|a| a & !Self::REPLAY)) });
    }
}

/// What the writer sends next.
pub struct Outgoing {
    pub frame: Frame,
    pub kind: Kind,
}

/// What kind of WebSocket frame an [`Outgoing`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A text or binary frame, by the connection's codec.
    Data,
    /// A pong answering the client's ping.
    Pong,
    /// The node's ping (the connection's reader asks for one every ping interval).
    Ping,
}

/// The frames of one conflating channel waiting beside the queue. Only a last frame
/// that is a message may be replaced by a newer message; notices (`subscribed`,
/// `unsubscribed`) are kept, in order.
struct Slot {
    channel: Arc<str>,
    frames: Vec<Frame>,
    last_replaceable: bool,
}

struct State {
    control: Arc<Control>,
    slow: AtomicBool,
    limits: QueueLimits,
    /// Live frames (and their bytes) in the queue.
    live_messages: AtomicUsize,
    live_bytes: AtomicUsize,
    /// Replayed frames (and their bytes) in the queue.
    replay_messages: AtomicUsize,
    replay_bytes: AtomicUsize,
    /// Frames (and their bytes) in the conflation slots and the slot being written.
    /// Bounded like the queue: only replacing a message is free.
    slot_messages: AtomicUsize,
    slot_bytes: AtomicUsize,
    /// Whether `pending` may hold something (checked without the lock).
    conflating: AtomicBool,
    /// Conflating channels' frames, in order of each channel's first overflow.
    pending: Mutex<Vec<Slot>>,
    /// The payload of the pong answering the client's latest ping, not sent yet. One
    /// slot, not a queue: a client that pings without reading holds one pong, never a
    /// growing queue (RFC 6455 §5.5.3 allows answering only the latest ping).
    pong: Mutex<Option<Bytes>>,
    pong_waiting: AtomicBool,
    /// A ping to send.
    ping_waiting: AtomicBool,
    /// The writer, waiting: woken for what does not go through the queue (a pong, a
    /// conflation slot).
    wake: AtomicWaker,
}

impl State {
    fn pending(&self) -> MutexGuard<'_, Vec<Slot>> {
        // A panic elsewhere must not wedge this connection's queue.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts `n` frames of `bytes` into (or, negative, out of) the conflation slots.
    fn slots_add(&self, n: isize, bytes: isize) {
        fn add(counter: &AtomicUsize, delta: isize) {
            if delta >= 0 {
                counter.fetch_add(delta as usize, Ordering::Relaxed);
            } else {
                counter.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
            }
        }
        add(&self.slot_messages, n);
        add(&self.slot_bytes, bytes);
        add(&QUEUED_BYTES, bytes);
    }

    /// Whether one more frame of `len` bytes fits the conflation slots: they are
    /// bounded by the queue's own limits (a frame larger than the byte bound still fits
    /// empty slots).
    fn slot_fits(&self, len: usize) -> Result<(), &'static str> {
        if self.slot_messages.load(Ordering::Relaxed) >= self.limits.messages {
            return Err("messages");
        }
        let bytes = self.slot_bytes.load(Ordering::Relaxed);
        if bytes > 0 && bytes + len > self.limits.bytes {
            return Err("bytes");
        }
        Ok(())
    }

    /// Condemns the connection as a slow consumer (4009), once. `limit`: which bound
    /// it passed (`messages`, `bytes`, `replay`, or `stall`: the socket took nothing
    /// for too long).
    fn slow(&self, limit: &'static str) {
        if !self.slow.swap(true, Ordering::Relaxed) {
            metrics::counter!(m::SLOW_CONSUMER_CLOSES_TOTAL, "limit" => limit).increment(1);
            let queued_bytes = self.live_bytes.load(Ordering::Relaxed)
                + self.replay_bytes.load(Ordering::Relaxed)
                + self.slot_bytes.load(Ordering::Relaxed);
            tracing::info!(limit, queued_bytes, "slow consumer, closing with 4009");
            self.control.close(CloseCode::SlowConsumer);
        }
    }
}

/// The pushing side (cloned into every channel the connection subscribes to).
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Item>,
    state: Arc<State>,
}

/// The writer's side.
pub struct OutboxReader {
    rx: mpsc::UnboundedReceiver<Item>,
    state: Arc<State>,
    /// Frames of a conflation slot being written.
    /// (Boxed: rare, and the writer's task, which every connection has, carries it;
    /// a box is one word where the deque is four.)
    #[allow(clippy::box_collection)]
    current: Option<Box<VecDeque<Frame>>>,
}

enum Refused {
    Full(&'static str, Frame),
    Closed,
}

impl Outbox {
    pub fn new(limits: QueueLimits, control: Arc<Control>) -> (Outbox, OutboxReader) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            control,
            slow: AtomicBool::new(false),
            limits,
            live_messages: AtomicUsize::new(0),
            live_bytes: AtomicUsize::new(0),
            replay_messages: AtomicUsize::new(0),
            replay_bytes: AtomicUsize::new(0),
            slot_messages: AtomicUsize::new(0),
            slot_bytes: AtomicUsize::new(0),
            conflating: AtomicBool::new(false),
            pending: Mutex::new(Vec::new()),
            pong: Mutex::new(None),
            pong_waiting: AtomicBool::new(false),
            ping_waiting: AtomicBool::new(false),
            wake: AtomicWaker::new(),
        });
        (
            Outbox {
                tx,
                state: state.clone(),
            },
            OutboxReader {
                rx,
                state,
                current: None,
            },
        )
    }

    fn enqueue(&self, frame: Frame, replay: bool) -> Result<(), Refused> {
        let s = &self.state;
        // Once the connection is condemned nothing more is queued: a client must never
        // see a later message after one it missed.
        if s.slow.load(Ordering::Relaxed) {
            return Err(Refused::Closed);
        }
        let len = frame.len();
        let (messages, bytes) = if replay {
            (&s.replay_messages, &s.replay_bytes)
        } else {
            (&s.live_messages, &s.live_bytes)
        };
        // Counted before it can be taken, so the counters never go below zero.
        messages.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(len, Ordering::Relaxed);
        QUEUED_BYTES.fetch_add(len, Ordering::Relaxed);
        if self.tx.send(Item::new(frame, replay)).is_err() {
            messages.fetch_sub(1, Ordering::Relaxed);
            bytes.fetch_sub(len, Ordering::Relaxed);
            QUEUED_BYTES.fetch_sub(len, Ordering::Relaxed);
            return Err(Refused::Closed);
        }
        Ok(())
    }

    fn try_push(&self, frame: Frame) -> Result<(), Refused> {
        let s = &self.state;
        if s.live_messages.load(Ordering::Relaxed) >= s.limits.messages {
            return Err(Refused::Full("messages", frame));
        }
        let bytes = s.live_bytes.load(Ordering::Relaxed);
        if bytes > 0 && bytes + frame.len() > s.limits.bytes {
            return Err(Refused::Full("bytes", frame));
        }
        self.enqueue(frame, false)
    }

    /// Queues a frame without waiting. A full queue marks the connection a slow
    /// consumer and closes it with 4009; returns whether the frame was queued.
    // hot path: no allocation per subscriber (a Frame is a reference count).
    pub fn push(&self, frame: impl Into<Frame>) -> bool {
        match self.try_push(frame.into()) {
            Ok(()) => true,
            Err(Refused::Full(limit, _)) => {
                self.slow(limit);
                false
            }
            Err(Refused::Closed) => false,
        }
    }

    /// Queues a frame of a conflating channel. Every frame of such a channel goes
    /// through here, so its frames never overtake each other: once the queue is full
    /// they wait in the channel's slot beside it, where a newer message replaces an
    /// older one (`replaceable`: the frame is a message, not a notice) instead of the
    /// connection being closed. `replay`: the node replays it (recovery, repair), so
    /// it goes within the replay budget while that has room.
    pub fn push_channel(
        &self,
        channel: &Arc<str>,
        frame: impl Into<Frame>,
        replaceable: bool,
        replay: bool,
    ) -> bool {
        let frame = frame.into();
        let s = &self.state;
        if s.slow.load(Ordering::Relaxed) {
            return false;
        }
        if s.conflating.load(Ordering::Acquire) {
            let mut pending = s.pending();
            // Re-checked under the lock: the reader's drop condemns the connection, then
            // empties the slots under it, and nothing may be added after.
            if s.slow.load(Ordering::Relaxed) {
                return false;
            }
            if let Some(slot) = pending.iter_mut().find(|s| &s.channel == channel) {
                let len = frame.len() as isize;
                match slot.frames.last_mut() {
                    // Replacing a message is always allowed: it is what conflation is for.
                    Some(last) if replaceable && slot.last_replaceable => {
                        s.slots_add(0, len - last.len() as isize);
                        *last = frame;
                        metrics::counter!(m::CONFLATED_MESSAGES_TOTAL).increment(1);
                    }
                    // A notice (join, leave, unsubscribed), or a message after one, adds
                    // a frame: within the bounds, like any queued frame.
                    _ => match s.slot_fits(frame.len()) {
                        Ok(()) => {
                            s.slots_add(1, len);
                            slot.frames.push(frame);
                        }
                        Err(limit) => {
                            drop(pending);
                            self.slow(limit);
                            return false;
                        }
                    },
                }
                slot.last_replaceable = replaceable;
                return true;
            }
        }
        let pushed = if replay && self.replay_fits(1, frame.len()) {
            self.enqueue(frame, true)
        } else {
            self.try_push(frame)
        };
        match pushed {
            Ok(()) => true,
            Err(Refused::Closed) => false,
            Err(Refused::Full(_, frame)) => {
                let mut pending = s.pending();
                if s.slow.load(Ordering::Relaxed) {
                    return false;
                }
                if let Err(limit) = s.slot_fits(frame.len()) {
                    drop(pending);
                    self.slow(limit);
                    return false;
                }
                s.slots_add(1, frame.len() as isize);
                pending.push(Slot {
                    channel: channel.clone(),
                    frames: vec![frame],
                    last_replaceable: replaceable,
                });
                s.conflating.store(true, Ordering::Release);
                drop(pending);
                s.wake.wake();
                true
            }
        }
    }

    /// Drops what waits in `channel`'s conflation slot (the client unsubscribed).
    pub fn forget(&self, channel: &str) {
        let s = &self.state;
        if s.conflating.load(Ordering::Acquire) {
            s.pending().retain(|slot| {
                if &*slot.channel != channel {
                    return true;
                }
                let bytes: usize = slot.frames.iter().map(|f| f.len()).sum();
                s.slots_add(-(slot.frames.len() as isize), -(bytes as isize));
                false
            });
        }
    }

    /// Asks for a pong with the client's ping payload (at most 125 bytes). It goes out
    /// before the next queued frame; a pong not sent yet is replaced by the newer one.
    pub fn push_pong(&self, payload: Bytes) {
        let s = &self.state;
        if !s.slow.load(Ordering::Relaxed) {
            *s.pong.lock().unwrap_or_else(PoisonError::into_inner) = Some(payload);
            s.pong_waiting.store(true, Ordering::Release);
            s.wake.wake();
        }
    }

    /// Asks for a ping: it goes out before the next queued frame, so a connection busy
    /// with messages still gets it (and its client's pong keeps it from being taken
    /// for silent). A ping not sent yet is not doubled.
    /// The connection has taken nothing for too long (seen from the session's side,
    /// for a transport whose writer cannot tell): a slow consumer.
    pub fn stalled(&self) {
        self.state.slow("stall");
    }

    pub fn push_ping(&self) {
        let s = &self.state;
        if !s.slow.load(Ordering::Relaxed) {
            s.ping_waiting.store(true, Ordering::Release);
            s.wake.wake();
        }
    }

    /// Queues a frame the node replays (recovery, gap repair): on top of the live
    /// bound, within the replay budget. Past the budget the connection is closed
    /// with 4009 (it recovers by reconnecting with `since`).
    pub fn push_replay(&self, frame: impl Into<Frame>) -> bool {
        let frame = frame.into();
        if !self.replay_fits(1, frame.len()) {
            self.slow("replay");
            return false;
        }
        self.enqueue(frame, true).is_ok()
    }

    /// Whether `messages` more replayed frames of `bytes` in all fit the budget now.
    pub fn replay_fits(&self, messages: usize, bytes: usize) -> bool {
        let s = &self.state;
        s.replay_messages.load(Ordering::Relaxed) + messages <= s.limits.replay_messages
            && s.replay_bytes.load(Ordering::Relaxed) + bytes <= s.limits.replay_bytes
    }

    fn slow(&self, limit: &'static str) {
        self.state.slow(limit);
    }

    #[cfg(test)]
    pub fn control(&self) -> &Arc<Control> {
        &self.state.control
    }

    /// Frames waiting (live, replayed, and in conflation slots).
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        let s = &self.state;
        s.live_messages.load(Ordering::Relaxed)
            + s.replay_messages.load(Ordering::Relaxed)
            + s.slot_messages.load(Ordering::Relaxed)
    }

    /// Bytes waiting (live, replayed, and in conflation slots).
    #[cfg(test)]
    pub fn queued_bytes(&self) -> usize {
        let s = &self.state;
        s.live_bytes.load(Ordering::Relaxed)
            + s.replay_bytes.load(Ordering::Relaxed)
            + s.slot_bytes.load(Ordering::Relaxed)
    }
}

impl OutboxReader {
    fn taken(&self, item: Item) -> Outgoing {
        let s = &self.state;
        let (frame, messages, bytes) = match item.into_parts() {
            (frame, true) => (frame, &s.replay_messages, &s.replay_bytes),
            (frame, false) => (frame, &s.live_messages, &s.live_bytes),
        };
        let len = frame.len();
        messages.fetch_sub(1, Ordering::Relaxed);
        bytes.fetch_sub(len, Ordering::Relaxed);
        QUEUED_BYTES.fetch_sub(len, Ordering::Relaxed);
        Outgoing {
            frame,
            kind: Kind::Data,
        }
    }

    /// The frames of the oldest conflation slot, once the queue has drained.
    fn take_pending(&mut self) -> Option<Frame> {
        if !self.state.conflating.load(Ordering::Acquire) {
            return None;
        }
        let mut pending = self.state.pending();
        if !pending.is_empty() {
            self.current
                .get_or_insert_with(Default::default)
                .extend(pending.remove(0).frames);
        }
        if pending.is_empty() {
            self.state.conflating.store(false, Ordering::Release);
        }
        drop(pending);
        self.pop_current()
    }

    /// The next frame of the conflation slot being written (counted out of the slots'
    /// accounting as it is taken).
    fn pop_current(&mut self) -> Option<Frame> {
        let current = self.current.as_mut()?;
        let frame = current.pop_front();
        if current.is_empty() {
            self.current = None;
        }
        if let Some(f) = &frame {
            self.state.slots_add(-1, -(f.len() as isize));
        }
        frame
    }

    /// The socket has taken nothing for too long: the client is a slow consumer.
    pub fn stalled(&self) {
        self.state.slow("stall");
    }

    /// The ping or pong asked for, if any.
    fn take_control(&mut self) -> Option<Outgoing> {
        let s = &self.state;
        if s.ping_waiting.load(Ordering::Relaxed) && s.ping_waiting.swap(false, Ordering::Acquire) {
            return Some(Outgoing {
                frame: Frame::default(),
                kind: Kind::Ping,
            });
        }
        // Loaded before swapped: the writer asks per frame, and a load is cheaper.
        if !(s.pong_waiting.load(Ordering::Relaxed)
            && s.pong_waiting.swap(false, Ordering::Acquire))
        {
            return None;
        }
        let frame = s
            .pong
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        Some(Outgoing {
            frame: Arc::new(frame),
            kind: Kind::Pong,
        })
    }

    /// The next frame without waiting: a ping or pong first, then a slot being
    /// written, then the queue, then the conflation slots.
    pub fn try_next(&mut self) -> Option<Outgoing> {
        let data = |frame| Outgoing {
            frame,
            kind: Kind::Data,
        };
        if let Some(control) = self.take_control() {
            return Some(control);
        }
        if let Some(frame) = self.pop_current() {
            return Some(data(frame));
        }
        match self.rx.try_recv() {
            Ok(item) => Some(self.taken(item)),
            Err(_) => self.take_pending().map(data),
        }
    }

    /// The next frame without waiting (its bytes).
    #[cfg(test)]
    pub fn try_recv(&mut self) -> Option<Bytes> {
        self.try_next().map(|o| Bytes::clone(&o.frame))
    }

    /// The next frame; `None` once every [`Outbox`] is gone. (Polled by hand: every
    /// connection's writer holds this future while it waits, so it is kept to a word.)
    pub async fn next(&mut self) -> Option<Outgoing> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Outgoing>> {
        if let Some(frame) = self.try_next() {
            return Poll::Ready(Some(frame));
        }
        self.state.wake.register(cx.waker());
        // A ping, pong or slot asked for before the registration is seen here.
        if let Some(frame) = self.try_next() {
            return Poll::Ready(Some(frame));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(self.taken(item))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for OutboxReader {
    fn drop(&mut self) {
        // Nothing can be queued any more; what was is released from the accounting.
        self.rx.close();
        while let Ok(item) = self.rx.try_recv() {
            self.taken(item);
        }
        // Slots too (an Outbox may outlive this, but nothing drains them now).
        self.state.slow.store(true, Ordering::Relaxed);
        let mut pending = self.state.pending();
        for slot in pending.drain(..) {
            for f in slot.frames {
                self.state.slots_add(-1, -(f.len() as isize));
            }
        }
        drop(pending);
        while self.pop_current().is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(messages: usize, bytes: usize) -> (Outbox, OutboxReader) {
        let limits = QueueLimits {
            messages,
            bytes,
            replay_messages: 100,
            replay_bytes: 1 << 20,
        };
        Outbox::new(limits, Arc::new(Control::new()))
    }

    #[test]
    fn a_queued_item_is_one_word_and_owns_its_frame() {
        assert_eq!(std::mem::size_of::<Item>(), std::mem::size_of::<usize>());
        let frame: Frame = Arc::new(Bytes::from_static(b"f"));
        for replay in [false, true] {
            let item = Item::new(frame.clone(), replay);
            assert_eq!(Arc::strong_count(&frame), 2);
            let (back, was_replay) = item.into_parts();
            assert_eq!(was_replay, replay);
            assert!(Arc::ptr_eq(&back, &frame));
            drop(back);
            assert_eq!(Arc::strong_count(&frame), 1);
        }
        // Dropped while queued: the count is given back.
        drop(Item::new(frame.clone(), true));
        assert_eq!(Arc::strong_count(&frame), 1);
        let (o, i) = outbox(10, 1 << 20);
        assert!(o.push(frame.clone()));
        assert!(o.push_replay(frame.clone()));
        assert_eq!(Arc::strong_count(&frame), 3);
        drop(i);
        drop(o);
        assert_eq!(Arc::strong_count(&frame), 1);
    }

    #[test]
    fn byte_bound_closes_with_4009() {
        let (o, mut i) = outbox(100, 10);
        // A frame larger than the bound fits an empty queue.
        assert!(o.push(Bytes::from_static(b"0123456789ABC")));
        assert_eq!(o.queued_bytes(), 13);
        assert!(!o.push(Bytes::from_static(b"x")));
        assert_eq!(o.control().code(), Some(CloseCode::SlowConsumer));
        assert_eq!(i.try_recv().unwrap(), Bytes::from_static(b"0123456789ABC"));
        assert_eq!(o.queued_bytes(), 0);
    }

    #[test]
    fn conflation_keeps_the_newest_per_channel_in_order() {
        let (o, mut i) = outbox(2, 1 << 20);
        let a: Arc<str> = Arc::from("job_progress:a");
        let b: Arc<str> = Arc::from("job_progress:b");
        for n in 0..10u8 {
            assert!(o.push_channel(&a, Bytes::from(vec![b'a', n]), true, false));
            assert!(o.push_channel(&b, Bytes::from(vec![b'b', n]), true, false));
        }
        assert_eq!(o.control().code(), None, "conflation never closes");
        let got: Vec<Bytes> = std::iter::from_fn(|| i.try_recv()).collect();
        // The two queued first, then the newest of each channel.
        assert_eq!(
            got,
            vec![
                Bytes::from(vec![b'a', 0]),
                Bytes::from(vec![b'b', 0]),
                Bytes::from(vec![b'a', 9]),
                Bytes::from(vec![b'b', 9]),
            ]
        );
        assert_eq!(o.queued_bytes(), 0);
    }

    #[test]
    fn replays_go_on_top_of_the_bound_within_their_budget() {
        let (o, mut i) = outbox(2, 1 << 20);
        for _ in 0..50 {
            assert!(o.push_replay(Bytes::from_static(b"r")));
        }
        // The live bound applies to live frames only.
        assert!(o.push(Bytes::from_static(b"1")));
        assert!(o.push(Bytes::from_static(b"2")));
        assert_eq!(o.control().code(), None);
        assert!(!o.replay_fits(51, 51));
        assert_eq!(std::iter::from_fn(|| i.try_recv()).count(), 52);
        // Written: the budget is whole again, and the bound is 2 again.
        assert!(o.replay_fits(100, 1000));
        assert!(o.push(Bytes::from_static(b"1")));
        assert!(o.push(Bytes::from_static(b"2")));
        assert!(!o.push(Bytes::from_static(b"3")));
        assert_eq!(o.control().code(), Some(CloseCode::SlowConsumer));
    }

    #[test]
    fn a_replay_past_its_budget_closes_with_4009() {
        let (o, _i) = outbox(2, 1 << 20);
        assert!(!o.replay_fits(101, 1));
        for _ in 0..100 {
            assert!(o.push_replay(Bytes::from_static(b"r")));
        }
        assert!(!o.push_replay(Bytes::from_static(b"r")));
        assert_eq!(o.control().code(), Some(CloseCode::SlowConsumer));
    }

    #[test]
    fn notices_of_a_conflating_channel_keep_their_place() {
        // A queue of 3 (and so room for 3 frames in the slots), holding 2.
        let (o, mut i) = outbox(3, 1 << 20);
        let a: Arc<str> = Arc::from("job_progress:a");
        assert!(o.push(Bytes::from_static(b"q1")));
        assert!(o.push(Bytes::from_static(b"q2")));
        assert!(o.push_channel(&a, Bytes::from_static(b"m1"), true, false));
        assert!(o.push_channel(&a, Bytes::from_static(b"m2"), true, false));
        assert!(o.push_channel(&a, Bytes::from_static(b"m3"), true, false));
        // A notice after the newest message is kept after it, and not replaced.
        assert!(o.push_channel(&a, Bytes::from_static(b"done"), false, false));
        assert!(o.push_channel(&a, Bytes::from_static(b"m4"), true, false));
        let got: Vec<Bytes> = std::iter::from_fn(|| i.try_recv()).collect();
        assert_eq!(
            got,
            ["q1", "q2", "m1", "m3", "done", "m4"].map(|s| Bytes::from_static(s.as_bytes()))
        );
        // `forget` drops a channel's waiting frames.
        for x in ["x1", "x2", "x3", "x4"] {
            assert!(o.push_channel(&a, Bytes::from_static(x.as_bytes()), true, false));
        }
        o.forget("job_progress:a");
        let got: Vec<Bytes> = std::iter::from_fn(|| i.try_recv()).collect();
        assert_eq!(
            got,
            ["x1", "x2", "x3"].map(|s| Bytes::from_static(s.as_bytes()))
        );
        assert_eq!(o.queued(), 0);
    }

    #[test]
    fn conflation_slots_are_accounted_and_bounded_like_the_queue() {
        let before = queued_bytes();
        let (o, mut i) = outbox(2, 1 << 20);
        let a: Arc<str> = Arc::from("chat:a");
        assert!(o.push_channel(&a, Bytes::from_static(b"q1"), true, false));
        assert!(o.push_channel(&a, Bytes::from_static(b"q2"), true, false));
        // Over the queue: the slot holds it, counted.
        assert!(o.push_channel(&a, Bytes::from_static(b"m1"), true, false));
        assert_eq!((o.queued(), o.queued_bytes()), (3, 6));
        // Replacing a message changes the bytes, not the count.
        assert!(o.push_channel(&a, Bytes::from_static(b"m2-longer"), true, false));
        assert_eq!((o.queued(), o.queued_bytes()), (3, 13));
        assert!(queued_bytes() >= before + 13);
        // A notice adds a frame: within the bound (2 frames in slots) …
        assert!(o.push_channel(&a, Bytes::from_static(b"join"), false, false));
        assert_eq!(o.queued(), 4);
        // … and past it the connection is a slow consumer, like for the queue.
        assert!(!o.push_channel(&a, Bytes::from_static(b"leave"), false, false));
        assert_eq!(o.control().code(), Some(CloseCode::SlowConsumer));
        let got: Vec<Bytes> = std::iter::from_fn(|| i.try_recv()).collect();
        assert_eq!(got.len(), 4);
        assert_eq!((o.queued(), o.queued_bytes()), (0, 0));
    }

    #[test]
    fn forgotten_and_dropped_slots_leave_the_accounting() {
        let (o, i) = outbox(2, 1 << 20);
        let a: Arc<str> = Arc::from("chat:a");
        let b: Arc<str> = Arc::from("chat:b");
        assert!(o.push_channel(&a, Bytes::from_static(b"q1"), true, false));
        assert!(o.push_channel(&a, Bytes::from_static(b"q2"), true, false));
        assert!(o.push_channel(&a, Bytes::from_static(b"aa"), true, false));
        assert!(o.push_channel(&b, Bytes::from_static(b"bbb"), true, false));
        assert_eq!((o.queued(), o.queued_bytes()), (4, 9));
        o.forget("chat:a");
        assert_eq!((o.queued(), o.queued_bytes()), (3, 7));
        drop(i);
        assert_eq!((o.queued(), o.queued_bytes()), (0, 0));
    }

    #[test]
    fn items_cross_threads_intact() {
        // Exercised under a memory checker in CI (scripts/test.sh): every frame is
        // taken once and freed once, tagged or not, across threads.
        let limits = QueueLimits {
            messages: 100_000,
            bytes: 1 << 30,
            replay_messages: 100_000,
            replay_bytes: 1 << 30,
        };
        let (o, mut i) = Outbox::new(limits, Arc::new(Control::new()));
        let frames: Vec<Frame> = (0..64u8)
            .map(|n| Arc::new(Bytes::from(vec![n; 33])))
            .collect();
        let pusher = {
            let frames = frames.clone();
            std::thread::spawn(move || {
                for round in 0..200 {
                    for f in &frames {
                        if round % 2 == 0 {
                            assert!(o.push(f.clone()));
                        } else {
                            assert!(o.push_replay(f.clone()));
                        }
                    }
                    if round % 50 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        };
        let mut taken = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while taken < 200 * 64 {
            assert!(
                std::time::Instant::now() < deadline,
                "only {taken} frames taken"
            );
            match i.try_next() {
                Some(out) => {
                    assert_eq!(out.frame[0] as usize, taken % 64);
                    taken += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        pusher.join().unwrap();
        for f in &frames {
            assert_eq!(Arc::strong_count(f), 1);
        }
    }

    #[test]
    fn nothing_is_queued_after_a_refusal() {
        let (o, mut i) = outbox(1, 1 << 20);
        assert!(o.push(Bytes::from_static(b"1")));
        assert!(!o.push(Bytes::from_static(b"2")));
        assert_eq!(i.try_recv().unwrap(), Bytes::from_static(b"1"));
        // There is room again, but the connection is condemned: no gap may be seen.
        assert!(!o.push(Bytes::from_static(b"3")));
        assert!(!o.push_replay(Bytes::from_static(b"4")));
        assert_eq!(i.try_recv(), None);
        assert_eq!(o.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn recv_wakes_for_a_conflated_message() {
        let (o, mut i) = outbox(1, 1 << 20);
        let a: Arc<str> = Arc::from("c:a");
        assert!(o.push_channel(&a, Bytes::from_static(b"1"), true, false));
        assert!(o.push_channel(&a, Bytes::from_static(b"2"), true, false));
        assert_eq!(*i.next().await.unwrap().frame, Bytes::from_static(b"1"));
        assert_eq!(*i.next().await.unwrap().frame, Bytes::from_static(b"2"));
        let writer = tokio::spawn(async move { i.next().await.map(|o| Bytes::clone(&o.frame)) });
        tokio::task::yield_now().await;
        assert!(o.push_channel(&a, Bytes::from_static(b"3"), true, false));
        assert_eq!(writer.await.unwrap().unwrap(), Bytes::from_static(b"3"));
    }

    #[test]
    fn only_the_latest_pong_waits_and_it_goes_first() {
        let (o, mut i) = outbox(1, 1 << 20);
        assert!(o.push(Bytes::from_static(b"m")));
        // A client pinging without reading: however many pings, one pong waits.
        for n in 0..10_000 {
            o.push_pong(Bytes::from(format!("ping-{n}")));
        }
        assert_eq!(o.queued(), 1, "pongs count against no budget");
        let p = i.try_next().unwrap();
        assert_eq!(p.kind, Kind::Pong);
        assert_eq!(*p.frame, Bytes::from_static(b"ping-9999"));
        let m = i.try_next().unwrap();
        assert_eq!(m.kind, Kind::Data);
        assert_eq!(*m.frame, Bytes::from_static(b"m"));
        assert!(i.try_next().is_none());
        assert_eq!(o.control().code(), None);
        assert_eq!(o.queued(), 0);
    }

    #[tokio::test]
    async fn next_wakes_for_a_pong() {
        let (o, mut i) = outbox(1, 1 << 20);
        let writer =
            tokio::spawn(async move { i.next().await.map(|o| (o.kind, Bytes::clone(&o.frame))) });
        tokio::task::yield_now().await;
        o.push_pong(Bytes::from_static(b"p"));
        assert_eq!(
            writer.await.unwrap().unwrap(),
            (Kind::Pong, Bytes::from_static(b"p"))
        );
    }
}
