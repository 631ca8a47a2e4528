//! A connection's outbound queue: bounded in frames and in bytes. The hub pushes into
//! an [`Outbox`] without ever waiting; the session's writer drains the matching
//! [`Inbox`]. A push that would pass either bound marks the connection a slow consumer
//! and closes it with 4009 — unless the message's channel conflates: then only its
//! newest message is kept, in a side slot per channel that the writer sends once the
//! queue has drained.
//!
//! Messages the node replays on its own initiative (a `since` recovery, a gap repair)
//! are not the client's fault: they go on top of the bound, within a separate replay
//! budget, and the bound applies again on top of them until the queue has drained.
//! Every queued byte is counted node-wide (`fanout_outbound_queue_bytes`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fanout_protocol::CloseCode;
use tokio::sync::{mpsc, Notify};

use crate::hub::Control;
use crate::metrics as m;

/// Bytes queued on every connection of this process.
static QUEUED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes waiting in every connection's outbound queue, node-wide.
pub fn queued_bytes() -> usize {
    QUEUED_BYTES.load(Ordering::Relaxed)
}

struct State {
    control: Arc<Control>,
    slow: AtomicBool,
    messages: AtomicUsize,
    bytes: AtomicUsize,
    limits: QueueLimits,
    /// Replayed frames still counted against the replay budget (reset when the queue
    /// drains).
    replay_messages: AtomicUsize,
    replay_bytes: AtomicUsize,
    /// Whether `pending` may hold something (checked without the lock).
    conflating: AtomicBool,
    /// The newest message per conflated channel, in order of first arrival.
    pending: Mutex<Vec<(Arc<str>, Bytes)>>,
    wake: Notify,
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

/// The pushing side (cloned into every channel the connection subscribes to).
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Bytes>,
    state: Arc<State>,
}

/// The writer's side.
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Bytes>,
    state: Arc<State>,
}

enum Refused {
    Full(&'static str, Bytes),
    Closed,
}

impl Outbox {
    pub fn new(limits: QueueLimits, control: Arc<Control>) -> (Outbox, Inbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            control,
            slow: AtomicBool::new(false),
            messages: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            limits,
            replay_messages: AtomicUsize::new(0),
            replay_bytes: AtomicUsize::new(0),
            conflating: AtomicBool::new(false),
            pending: Mutex::new(Vec::new()),
            wake: Notify::new(),
        });
        (
            Outbox {
                tx,
                state: state.clone(),
            },
            Inbox { rx, state },
        )
    }

    fn enqueue(&self, frame: Bytes) -> Result<(), Refused> {
        let len = frame.len();
        self.state.messages.fetch_add(1, Ordering::Relaxed);
        self.state.bytes.fetch_add(len, Ordering::Relaxed);
        match self.tx.send(frame) {
            Ok(()) => {
                QUEUED_BYTES.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            Err(_) => {
                self.state.messages.fetch_sub(1, Ordering::Relaxed);
                self.state.bytes.fetch_sub(len, Ordering::Relaxed);
                Err(Refused::Closed)
            }
        }
    }

    fn try_push(&self, frame: Bytes) -> Result<(), Refused> {
        let s = &self.state;
        let extra_messages = s.replay_messages.load(Ordering::Relaxed);
        let extra_bytes = s.replay_bytes.load(Ordering::Relaxed);
        if s.messages.load(Ordering::Relaxed) >= s.limits.messages + extra_messages {
            return Err(Refused::Full("messages", frame));
        }
        let bytes = s.bytes.load(Ordering::Relaxed);
        if bytes > extra_bytes && bytes + frame.len() > s.limits.bytes + extra_bytes {
            return Err(Refused::Full("bytes", frame));
        }
        self.enqueue(frame)
    }

    /// Queues a frame without waiting. A full queue marks the connection a slow
    /// consumer and closes it with 4009; returns whether the frame was queued.
    // hot path: no allocation per subscriber (Bytes is a reference count).
    pub fn push(&self, frame: Bytes) -> bool {
        match self.try_push(frame) {
            Ok(()) => true,
            Err(Refused::Full(limit, _)) => {
                self.slow(limit);
                false
            }
            Err(Refused::Closed) => false,
        }
    }

    /// Queues a message of a conflating channel: when the queue is full, the message
    /// replaces any older one of `channel` still waiting instead of closing the
    /// connection. Once a channel has a waiting message, its newer ones replace it
    /// until the writer takes it, so a channel's messages never overtake each other.
    pub fn push_conflated(&self, channel: &Arc<str>, frame: Bytes) -> bool {
        if self.state.conflating.load(Ordering::Acquire) {
            let mut pending = self.state.pending.lock().expect("outbox lock");
            if let Some(slot) = pending.iter_mut().find(|(c, _)| c == channel) {
                slot.1 = frame;
                metrics::counter!(m::CONFLATED_MESSAGES_TOTAL).increment(1);
                return true;
            }
        }
        match self.try_push(frame) {
            Ok(()) => true,
            Err(Refused::Closed) => false,
            Err(Refused::Full(_, frame)) => {
                let mut pending = self.state.pending.lock().expect("outbox lock");
                pending.push((channel.clone(), frame));
                self.state.conflating.store(true, Ordering::Release);
                drop(pending);
                self.state.wake.notify_one();
                true
            }
        }
    }

    /// Queues a frame the node replays (recovery, gap repair): on top of the live
    /// bound, within the replay budget. Past the budget the connection is closed
    /// with 4009 (it recovers by reconnecting with `since`).
    pub fn push_replay(&self, frame: Bytes) -> bool {
        let s = &self.state;
        let messages = s.replay_messages.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes = s.replay_bytes.fetch_add(frame.len(), Ordering::Relaxed) + frame.len();
        if messages > s.limits.replay_messages || bytes > s.limits.replay_bytes {
            self.slow("replay");
            return false;
        }
        self.enqueue(frame).is_ok()
    }

    /// Whether `messages` frames of `bytes` in all fit the replay budget now.
    pub fn replay_fits(&self, messages: usize, bytes: usize) -> bool {
        let s = &self.state;
        s.replay_messages.load(Ordering::Relaxed) + messages <= s.limits.replay_messages
            && s.replay_bytes.load(Ordering::Relaxed) + bytes <= s.limits.replay_bytes
    }

    fn slow(&self, limit: &'static str) {
        if !self.state.slow.swap(true, Ordering::Relaxed) {
            metrics::counter!(m::SLOW_CONSUMER_CLOSES_TOTAL, "limit" => limit).increment(1);
            tracing::info!(
                limit,
                queued_bytes = self.state.bytes.load(Ordering::Relaxed),
                "slow consumer: outbound queue full, closing with 4009"
            );
            self.state.control.close(CloseCode::SlowConsumer);
        }
    }

    pub fn control(&self) -> &Arc<Control> {
        &self.state.control
    }

    /// Frames waiting in the queue.
    pub fn queued(&self) -> usize {
        self.state.messages.load(Ordering::Relaxed)
    }

    /// Bytes waiting in the queue.
    pub fn queued_bytes(&self) -> usize {
        self.state.bytes.load(Ordering::Relaxed)
    }
}

impl Inbox {
    fn taken(&self, frame: &Bytes) {
        let s = &self.state;
        s.bytes.fetch_sub(frame.len(), Ordering::Relaxed);
        QUEUED_BYTES.fetch_sub(frame.len(), Ordering::Relaxed);
        if s.messages.fetch_sub(1, Ordering::Relaxed) == 1 {
            // Drained: whatever was replayed has been written; the live bound applies
            // from scratch.
            s.replay_messages.store(0, Ordering::Relaxed);
            s.replay_bytes.store(0, Ordering::Relaxed);
        }
    }

    /// The oldest conflated message, once the queue has drained.
    fn take_pending(&self) -> Option<Bytes> {
        if !self.state.conflating.load(Ordering::Acquire) {
            return None;
        }
        let mut pending = self.state.pending.lock().expect("outbox lock");
        let frame = (!pending.is_empty()).then(|| pending.remove(0).1);
        if pending.is_empty() {
            self.state.conflating.store(false, Ordering::Release);
        }
        frame
    }

    /// The next frame without waiting: queued ones first, then conflated ones.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        match self.rx.try_recv() {
            Ok(frame) => {
                self.taken(&frame);
                Some(frame)
            }
            Err(_) => self.take_pending(),
        }
    }

    /// The next frame; `None` once every [`Outbox`] is gone.
    pub async fn recv(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.try_recv() {
                return Some(frame);
            }
            tokio::select! {
                frame = self.rx.recv() => {
                    let frame = frame?;
                    self.taken(&frame);
                    return Some(frame);
                }
                _ = self.state.wake.notified() => {}
            }
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // Nothing can be queued any more; what was is released from the accounting.
        self.rx.close();
        while let Ok(frame) = self.rx.try_recv() {
            self.taken(&frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    fn outbox(messages: usize, bytes: usize) -> (Outbox, Inbox) {
        let limits = QueueLimits {
            messages,
            bytes,
            replay_messages: 100,
            replay_bytes: 1 << 20,
        };
        Outbox::new(limits, Arc::new(Control::new(CancellationToken::new())))
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
            assert!(o.push_conflated(&a, Bytes::from(vec![b'a', n])));
            assert!(o.push_conflated(&b, Bytes::from(vec![b'b', n])));
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
        // The live bound applies on top of the replay.
        assert!(o.push(Bytes::from_static(b"1")));
        assert!(o.push(Bytes::from_static(b"2")));
        assert_eq!(o.control().code(), None);
        assert_eq!(std::iter::from_fn(|| i.try_recv()).count(), 52);
        // Drained: the budget is whole again, and the bound is 2 again.
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

    #[tokio::test]
    async fn recv_wakes_for_a_conflated_message() {
        let (o, mut i) = outbox(1, 1 << 20);
        let a: Arc<str> = Arc::from("c:a");
        assert!(o.push_conflated(&a, Bytes::from_static(b"1")));
        assert!(o.push_conflated(&a, Bytes::from_static(b"2")));
        assert_eq!(i.recv().await.unwrap(), Bytes::from_static(b"1"));
        assert_eq!(i.recv().await.unwrap(), Bytes::from_static(b"2"));
        let writer = tokio::spawn(async move { i.recv().await });
        tokio::task::yield_now().await;
        assert!(o.push_conflated(&a, Bytes::from_static(b"3")));
        assert_eq!(writer.await.unwrap().unwrap(), Bytes::from_static(b"3"));
    }
}
