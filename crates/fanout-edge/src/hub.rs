//! The hub: channel → local subscribers, sharded so that publishing on one channel and
//! subscribing to another rarely share a lock. It never awaits: dispatch pushes shared
//! bytes into each subscriber's bounded [`Outbox`] and moves on; a full outbox closes
//! that connection (4009) and never delays the others.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use fanout_protocol::{Codec, Envelope, FrameId, ServerFrame, Since, SubscribedInfo};

use crate::history::HistoryRead;
use crate::metrics as m;
use crate::outbox::Frame;
pub use crate::outbox::Outbox;
use crate::positions::{
    check, continues, covered_or_foreign, reaches, recovers, Check, Position, Span,
};

pub type SessionId = u64;

/// A local subscriber of a channel.
#[derive(Clone)]
pub struct Subscriber {
    pub id: SessionId,
    pub codec: Codec,
    pub outbox: Outbox,
    /// Keep only the newest message when its queue is full, instead of closing 4009.
    pub conflate: bool,
    /// Messages up to this offset reached it from history when it attached: not sent
    /// again when the node's stream catches up.
    skip_to: u64,
}

impl Subscriber {
    /// Queues a message frame of `channel`.
    // hot path: no allocation, no lock (unless the connection conflates and overflowed).
    fn message(&self, channel: &Arc<str>, frame: impl Into<Frame>, replay: bool) -> bool {
        if self.conflate {
            self.outbox.push_channel(channel, frame, true, replay)
        } else if replay {
            self.outbox.push_replay(frame)
        } else {
            self.outbox.push(frame)
        }
    }

    /// Queues a frame about `channel` that is not a message (`subscribed`,
    /// `unsubscribed`, a presence `join`/`leave`): after the channel's messages, never
    /// replacing them nor replaced.
    fn announce(&self, channel: &Arc<str>, frame: impl Into<Frame>) -> bool {
        if self.conflate {
            self.outbox.push_channel(channel, frame, false, false)
        } else {
            self.outbox.push(frame)
        }
    }

    pub fn new(id: SessionId, codec: Codec, outbox: Outbox, conflate: bool) -> Subscriber {
        Subscriber {
            id,
            codec,
            outbox,
            conflate,
            skip_to: 0,
        }
    }
}

/// A subscriber whose `subscribed` is not sent yet: it is reading history, and live
/// messages for it wait here until it has what it recovered.
struct Attaching {
    sub: Subscriber,
    waiting: Vec<Arc<Envelope>>,
    /// The channel's position when it attached, or when the position last moved other
    /// than by accepting a message (another attacher's read, a reset): every message
    /// accepted since is in `waiting`.
    base: Option<Position>,
}

struct ChannelState {
    name: Arc<str>,
    live: Vec<Subscriber>,
    attaching: Vec<Attaching>,
    position: Option<Position>,
    /// Messages held, in arrival order, while the node repairs a gap from history
    /// (boxed: rare, and every channel carries the field).
    held: Option<Box<Held>>,
    /// How many were held when the running repair's read began.
    held_at_read: usize,
    repairing: bool,
}

impl ChannelState {
    fn new(name: Arc<str>) -> ChannelState {
        ChannelState {
            name,
            live: Vec::new(),
            attaching: Vec::new(),
            position: None,
            held: None,
            held_at_read: 0,
            repairing: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.live.is_empty() && self.attaching.is_empty()
    }

    /// Adds a live subscriber. The first gets room for one, not four: most channels
    /// (`user:<id>`, a job's few watchers) have one or few on a node.
    fn make_live(&mut self, sub: Subscriber) {
        if self.live.capacity() == 0 {
            self.live.reserve_exact(1);
        }
        self.live.push(sub);
    }
}

/// The most messages held for one channel during a repair; past it (or past the
/// node's byte bound for all holds) the oldest are dropped from the hold: they are in
/// history, which the repair reads.
const MAX_HELD: usize = 65_536;

/// A channel's held messages: a queue (dropping the oldest is O(1)) whose bytes count
/// in the node-wide total of all holds, given back when it goes.
struct Held {
    queue: std::collections::VecDeque<Arc<Envelope>>,
    bytes: usize,
    total: Arc<AtomicUsize>,
    /// Messages were dropped from it: logged once per episode, not per message.
    overflowed: bool,
}

/// What a held message counts for (its data and a frame's fixed fields, closely
/// enough).
fn held_size(e: &Envelope) -> usize {
    e.data.get().len() + e.event.as_ref().map_or(0, String::len) + 128
}

impl Held {
    fn new(total: &Arc<AtomicUsize>) -> Held {
        Held {
            queue: std::collections::VecDeque::new(),
            bytes: 0,
            total: total.clone(),
            overflowed: false,
        }
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    fn pop_front(&mut self) -> Option<Arc<Envelope>> {
        let e = self.queue.pop_front()?;
        let size = held_size(&e);
        self.bytes -= size;
        self.total.fetch_sub(size, Ordering::Relaxed);
        Some(e)
    }

    /// Holds `env` behind the others; while this hold has more than [`MAX_HELD`]
    /// messages, or all holds more than `limit` bytes, its oldest are dropped. Returns
    /// how many were dropped.
    fn push(&mut self, env: Arc<Envelope>, limit: usize) -> usize {
        let size = held_size(&env);
        let mut dropped = 0;
        while !self.queue.is_empty()
            && (self.queue.len() >= MAX_HELD || self.total.load(Ordering::Relaxed) + size > limit)
        {
            self.pop_front();
            dropped += 1;
        }
        self.bytes += size;
        self.total.fetch_add(size, Ordering::Relaxed);
        self.queue.push_back(env);
        dropped
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl IntoIterator for Held {
    type Item = Arc<Envelope>;
    type IntoIter = std::vec::IntoIter<Arc<Envelope>>;

    fn into_iter(mut self) -> Self::IntoIter {
        let queue: Vec<Arc<Envelope>> = std::mem::take(&mut self.queue).into();
        // Handed over: no longer held.
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
        queue.into_iter()
    }
}

/// What a delivery or a repair did.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Frames queued to subscribers.
    pub queued: usize,
    /// A gap was found: the channel is held until a repair reads history.
    pub repair: bool,
    /// Subscribers whose subscription ended (a finished job); each holds a broker
    /// reference to release.
    pub ended: usize,
    /// Messages delivered from history by a repair.
    pub repaired: usize,
    /// The gap could not be filled: subscribers were told `recovered:false`.
    pub reset: bool,
    /// Duplicates dropped.
    pub duplicates: usize,
}

/// A attach's history read, with what the client asked for.
pub struct Attach<'a> {
    pub id: Option<&'a FrameId>,
    pub since: Option<&'a Since>,
    /// Send the entries read (`last: N`, or a job's latest state).
    pub send_entries: bool,
    pub history: HistoryRead,
    /// How many reads were answered [`Attached::Stale`] before this one.
    pub attempt: u32,
}

/// Reads a attach may make before it completes with what it has.
pub const MAX_ATTACH_READS: u32 = 3;

/// How a attach ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Attached {
    /// Subscribed; `recovered` answers a `since`.
    Live { recovered: Option<bool> },
    /// The job had already finished: the client got its last state and `unsubscribed`.
    Ended,
    /// The session is no longer attaching (it left meanwhile).
    Gone,
    /// The read is older than what the node already dispatched on the channel: read
    /// history again and complete with the fresher read (still attaching meanwhile).
    Stale,
}

/// Frames of one message, encoded at most once per codec.
struct Encoded<'a> {
    channel: &'a str,
    envelope: &'a Envelope,
    json: Option<Frame>,
    msgpack: Option<Frame>,
}

impl<'a> Encoded<'a> {
    fn new(channel: &'a str, envelope: &'a Envelope) -> Self {
        Encoded {
            channel,
            envelope,
            json: None,
            msgpack: None,
        }
    }

    fn frame(&mut self, codec: Codec) -> Frame {
        let (slot, codec) = match codec {
            Codec::Json => (&mut self.json, Codec::Json),
            Codec::MsgPack => (&mut self.msgpack, Codec::MsgPack),
        };
        slot.get_or_insert_with(|| Arc::new(self.envelope.encode_message(self.channel, codec)))
            .clone()
    }
}

/// A frame other than a message, for many subscribers, encoded at most once per
/// codec.
struct Announcement<'a> {
    frame: ServerFrame<'a>,
    json: Option<Frame>,
    msgpack: Option<Frame>,
}

impl<'a> Announcement<'a> {
    fn new(frame: ServerFrame<'a>) -> Self {
        Announcement {
            frame,
            json: None,
            msgpack: None,
        }
    }

    fn frame(&mut self, codec: Codec) -> Frame {
        let slot = match codec {
            Codec::Json => &mut self.json,
            Codec::MsgPack => &mut self.msgpack,
        };
        slot.get_or_insert_with(|| Arc::new(codec.encode(&self.frame)))
            .clone()
    }
}

type Shard = RwLock<HashMap<Arc<str>, Arc<Mutex<ChannelState>>>>;

pub struct Hub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    subscriptions: AtomicUsize,
    /// Bytes held by every channel's repair hold, and their bound.
    held_bytes: Arc<AtomicUsize>,
    hold_limit: usize,
}

/// Bytes all repair holds of a node may take by default.
pub const HOLD_LIMIT: usize = 64 << 20;

impl Default for Hub {
    fn default() -> Self {
        Hub::new(64)
    }
}

/// A channel's lock. A panic while it was held (contained and counted by the caller)
/// must not make the channel unusable for everyone after.
fn lock(state: &Mutex<ChannelState>) -> MutexGuard<'_, ChannelState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether messages on `channel` can end its subscriptions (`job_progress`).
fn is_job(channel: &str) -> bool {
    channel.starts_with("job_progress:")
}

impl Hub {
    pub fn new(shards: usize) -> Hub {
        Hub::with_hold_limit(shards, HOLD_LIMIT)
    }

    /// A hub whose repair holds take at most `hold_limit` bytes in all.
    pub fn with_hold_limit(shards: usize, hold_limit: usize) -> Hub {
        Hub {
            shards: (0..shards.max(1)).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            subscriptions: AtomicUsize::new(0),
            held_bytes: Arc::default(),
            hold_limit,
        }
    }

    /// Bytes held by repair holds now.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes.load(Ordering::Relaxed)
    }

    /// Holds `env` on a channel under repair: bounded, and logged once per episode when
    /// the bound drops messages.
    fn hold(&self, name: &str, held: &mut Held, env: Arc<Envelope>) {
        let dropped = held.push(env, self.hold_limit);
        if dropped > 0 {
            // Dropped from the hold only: an offset-carrying message is in history,
            // which the repair reads. Counted, because a raw message cannot be read back.
            metrics::counter!(m::HELD_OVERFLOW_TOTAL).increment(dropped as u64);
            if !held.overflowed {
                held.overflowed = true;
                tracing::warn!(
                    channel = name,
                    held = held.len(),
                    node_held_bytes = self.held_bytes(),
                    "repair hold full; dropping its oldest messages until the repair ends"
                );
            }
        }
    }

    fn new_hold(&self) -> Box<Held> {
        Box::new(Held::new(&self.held_bytes))
    }

    fn shard(&self, channel: &str) -> &Shard {
        let i = self.hasher.hash_one(channel) as usize % self.shards.len();
        &self.shards[i]
    }

    fn state(&self, channel: &str) -> Option<Arc<Mutex<ChannelState>>> {
        self.shard(channel)
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(channel)
            .cloned()
    }

    fn count(&self, delta: isize) {
        let n = if delta >= 0 {
            self.subscriptions
                .fetch_add(delta as usize, Ordering::Relaxed)
                + delta as usize
        } else {
            self.subscriptions
                .fetch_sub((-delta) as usize, Ordering::Relaxed)
                - (-delta) as usize
        };
        metrics::gauge!(m::SUBSCRIPTIONS).set(n as f64);
    }

    /// Starts a subscription: `sub` receives nothing until [`Hub::complete_attach`] has
    /// sent it `subscribed` and what it recovered; live messages wait for it meanwhile.
    pub fn attach(&self, channel: Arc<str>, sub: Subscriber) {
        loop {
            let state = {
                let mut shard = self
                    .shard(&channel)
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                shard
                    .entry(channel.clone())
                    .or_insert_with(|| Arc::new(Mutex::new(ChannelState::new(channel.clone()))))
                    .clone()
            };
            let mut st = lock(&state);
            // The state may have been dropped as empty between the two locks: attach the
            // one the shard maps now.
            let current = self.state(&channel);
            if !current.is_some_and(|c| Arc::ptr_eq(&c, &state)) {
                continue;
            }
            let base = st.position.clone();
            st.attaching.push(Attaching {
                sub,
                waiting: Vec::new(),
                base,
            });
            self.count(1);
            return;
        }
    }

    /// Finishes a attach with the history read for it: queues `subscribed` (with the
    /// position and, for a `since`, whether everything missed could be recovered), the
    /// recovered or asked-for messages, then what arrived meanwhile — each once, in
    /// order — and makes the subscriber live.
    pub fn complete_attach(&self, channel: &str, id: SessionId, attach: Attach<'_>) -> Attached {
        let Some(state) = self.state(channel) else {
            return Attached::Gone;
        };
        let mut st = lock(&state);
        let Some(i) = st.attaching.iter().position(|j| j.sub.id == id) else {
            return Attached::Gone;
        };
        let h = attach.history;
        // The read must reach what the node had dispatched before this subscriber
        // attached (what it dispatched since is in `waiting`), or the messages in between
        // would be neither in this read nor sent to it live.
        let span = Span {
            epoch: h.epoch.as_deref(),
            top: h.top,
            first: h.entries.first().and_then(|e| e.offset),
            last: h.entries.last().and_then(|e| e.offset),
        };
        let stale = st.attaching[i]
            .base
            .as_ref()
            .is_some_and(|b| !reaches(b, span));
        if stale && attach.attempt + 1 < MAX_ATTACH_READS {
            return Attached::Stale;
        }
        let Attaching { sub, waiting, .. } = st.attaching.swap_remove(i);
        if st.attaching.is_empty() {
            // Attaches are brief: an idle channel keeps no room for them.
            st.attaching = Vec::new();
        }
        let name = st.name.clone();
        if stale {
            // Reads kept lagging what the node had dispatched (a lagging replica): the
            // subscriber starts from the node's position and is told it must reload.
            let p = st.position.clone().unwrap_or(Position::new(None, 0));
            if attach.since.is_some() {
                metrics::counter!(m::RECOVERIES_TOTAL, "outcome" => "not_recovered").increment(1);
            }
            let info = SubscribedInfo {
                offset: p.epoch.as_ref().map(|_| p.offset),
                epoch: p.epoch,
                recovered: Some(false),
            };
            let frame = ServerFrame::Subscribed {
                id: attach.id,
                channel,
                info,
            };
            sub.announce(&name, sub.codec.encode(&frame));
            st.make_live(sub);
            return Attached::Live {
                recovered: Some(false),
            };
        }
        // What history can give, within the connection's replay budget: a `since`
        // that cannot be replayed whole is not recovered (the client reloads instead of
        // being flooded); `last` and a job's latest state keep the newest that fit.
        let fit = fitting_suffix(&sub.outbox, &h.entries);
        let recovered = attach
            .since
            .map(|s| recovers(&s.epoch, s.offset, span) && fit == h.entries.len());
        if let Some(r) = recovered {
            let outcome = if r { "recovered" } else { "not_recovered" };
            metrics::counter!(m::RECOVERIES_TOTAL, "outcome" => outcome).increment(1);
        }
        let info = SubscribedInfo {
            offset: h.epoch.as_ref().map(|_| h.top),
            epoch: h.epoch.clone(),
            recovered,
        };
        sub.announce(
            &name,
            sub.codec.encode(&ServerFrame::Subscribed {
                id: attach.id,
                channel,
                info,
            }),
        );
        let from_history: &[Arc<Envelope>] = match (recovered, attach.send_entries) {
            (Some(true), _) => &h.entries,
            (None, true) => &h.entries[h.entries.len() - fit..],
            _ => &[],
        };
        let mut ended = false;
        let mut sent: Option<(Option<&str>, u64)> = None;
        let waited = waiting
            .iter()
            .filter(|e| !covered_or_foreign(e.epoch.as_deref(), e.offset, span));
        for e in from_history.iter().chain(waited) {
            if let (Some(o), Some((epoch, last))) = (e.offset, sent) {
                if o <= last && e.epoch.as_deref() == epoch {
                    continue;
                }
            }
            if let Some(o) = e.offset {
                sent = Some((e.epoch.as_deref(), o));
            }
            sub.message(&name, e.encode_message(channel, sub.codec), true);
            if is_job(channel) && e.is_terminal() {
                ended = true;
                break;
            }
        }
        let mut sub = sub;
        match &st.position {
            None => {
                let position = Position::new(h.epoch, h.top);
                for j in st.attaching.iter_mut() {
                    j.base = Some(position.clone());
                }
                st.position = Some(position);
            }
            // The node's stream is behind what this subscriber read (messages in
            // flight, or a repair under way): those are not sent to it twice.
            Some(p) if p.continued_by(h.epoch.as_deref()) && p.offset < h.top => {
                sub.skip_to = h.top
            }
            Some(_) => {}
        }
        if ended {
            sub.announce(
                &name,
                sub.codec.encode(&ServerFrame::Unsubscribed {
                    id: None,
                    channel,
                    reason: "completed",
                }),
            );
            self.count(-1);
            self.drop_if_empty(channel, &st, &state);
            return Attached::Ended;
        }
        st.make_live(sub);
        Attached::Live { recovered }
    }

    /// Removes session `id` from `channel` (live or attaching); returns whether it was
    /// there — and so whether the caller holds a broker reference to release.
    pub fn remove(&self, channel: &str, id: SessionId) -> bool {
        let Some(state) = self.state(channel) else {
            return false;
        };
        let mut st = lock(&state);
        let removed = if let Some(i) = st.live.iter().position(|s| s.id == id) {
            st.live.swap_remove(i);
            true
        } else if let Some(i) = st.attaching.iter().position(|j| j.sub.id == id) {
            st.attaching.swap_remove(i);
            true
        } else {
            false
        };
        if removed {
            self.count(-1);
            self.drop_if_empty(channel, &st, &state);
        }
        removed
    }

    /// Whether session `id` is subscribed to (or attaching) `channel`.
    pub fn contains(&self, channel: &str, id: SessionId) -> bool {
        self.state(channel).is_some_and(|state| {
            let st = lock(&state);
            st.live.iter().any(|s| s.id == id) || st.attaching.iter().any(|j| j.sub.id == id)
        })
    }

    /// Forgets a channel nobody is on any more (its position goes with it). Called with
    /// the channel's lock held; takes the shard lock after it (never the other order
    /// while holding a channel lock elsewhere).
    fn drop_if_empty(&self, channel: &str, st: &ChannelState, state: &Arc<Mutex<ChannelState>>) {
        if st.is_empty() && !st.repairing {
            // An attacher that cloned this state meanwhile notices it is no longer mapped
            // (see `attach`) and starts over.
            let mut shard = self
                .shard(channel)
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if shard.get(channel).is_some_and(|c| Arc::ptr_eq(c, state)) {
                shard.remove(channel);
            }
        }
    }

    /// One message for `channel`, in the order the broker delivered it. Dispatched to
    /// every local subscriber (encoded once per codec) when it is the next in the
    /// channel's stream; a duplicate is dropped; a gap holds the channel and asks for a
    /// repair.
    // hot path: one lock per message, no allocation or lock per subscriber.
    pub fn deliver(&self, channel: &str, envelope: Arc<Envelope>) -> Delivery {
        let mut out = Delivery::default();
        let Some(state) = self.state(channel) else {
            return out;
        };
        let mut st = lock(&state);
        if st.held.is_some() {
            let name = st.name.clone();
            let held = st.held.as_mut().expect("checked");
            self.hold(&name, held, envelope);
            return out;
        }
        match check(
            st.position.as_ref(),
            envelope.offset,
            envelope.epoch.as_deref(),
        ) {
            Check::Accept => {
                self.accept(&mut st, channel, &envelope, &mut out, false);
                if out.ended > 0 {
                    self.drop_if_empty(channel, &st, &state);
                }
            }
            Check::Duplicate => out.duplicates += 1,
            Check::Gap => {
                let mut held = self.new_hold();
                self.hold(channel, &mut held, envelope);
                st.held = Some(held);
                out.repair = true;
            }
        }
        out
    }

    /// Dispatches the next message of the channel's stream. `replay`: the node is
    /// catching up (a repair), so the frames go within the replay budget.
    fn accept(
        &self,
        st: &mut ChannelState,
        channel: &str,
        env: &Arc<Envelope>,
        out: &mut Delivery,
        replay: bool,
    ) {
        if let (Some(offset), Some(epoch)) = (env.offset, env.epoch.as_deref()) {
            match st.position.as_mut() {
                Some(p) if p.epoch.as_deref() == Some(epoch) => p.offset = offset,
                _ => {
                    st.position = Some(Position {
                        epoch: Some(epoch.to_string()),
                        offset,
                    })
                }
            }
        }
        let mut encoded = Encoded::new(channel, env);
        let offset = env.offset.unwrap_or(u64::MAX);
        let presence = env.notice.is_some();
        for sub in &st.live {
            if offset <= sub.skip_to {
                continue;
            }
            // A join/leave notice never replaces (nor is replaced by) a message.
            let queued = if presence {
                sub.announce(&st.name, encoded.frame(sub.codec))
            } else {
                sub.message(&st.name, encoded.frame(sub.codec), replay)
            };
            if queued {
                out.queued += 1;
            }
        }
        for j in st.attaching.iter_mut() {
            j.waiting.push(env.clone());
        }
        if is_job(channel) && !st.live.is_empty() && env.is_terminal() {
            // The job is over: every live subscription of it ends here.
            let mut announcement = Announcement::new(ServerFrame::Unsubscribed {
                id: None,
                channel,
                reason: "completed",
            });
            let name = st.name.clone();
            for sub in st.live.drain(..) {
                sub.announce(&name, announcement.frame(sub.codec));
                out.ended += 1;
            }
            self.count(-(out.ended as isize));
        }
    }

    /// Starts a repair of `channel` if it has a position and none is running: from now
    /// on its messages are held. Returns the position to read history after.
    pub fn begin_repair(&self, channel: &str) -> Option<Position> {
        let state = self.state(channel)?;
        let mut st = lock(&state);
        if st.repairing {
            return None;
        }
        let position = st.position.clone()?;
        st.repairing = true;
        st.held_at_read = st.held.as_ref().map_or(0, |h| h.len());
        if st.held.is_none() {
            st.held = Some(self.new_hold());
        }
        Some(position)
    }

    /// Whether `channel` holds messages with no repair under way.
    pub fn needs_repair(&self, channel: &str) -> bool {
        self.state(channel).is_some_and(|state| {
            let st = lock(&state);
            st.held.is_some() && !st.repairing
        })
    }

    /// Applies a repair's history read: the missing messages in order, then what was
    /// held. If history cannot fill the gap (trimmed, expired, or a new epoch), every
    /// subscriber is told `recovered:false` with the new position. `None` (the read
    /// failed) keeps holding and asks for another try.
    pub fn finish_repair(&self, channel: &str, read: Option<HistoryRead>) -> Delivery {
        self.apply_repair(channel, read, false)
    }

    /// Gives up a repair whose history reads keep failing: rather than holding the
    /// channel for ever, every subscriber is told `recovered:false`, with the position
    /// just before the oldest held message (or where the channel stood), and what was
    /// held is delivered from there.
    pub fn abandon_repair(&self, channel: &str) -> Delivery {
        let read = {
            let Some(state) = self.state(channel) else {
                return Delivery::default();
            };
            let st = lock(&state);
            let first = st.held.as_ref().and_then(|h| {
                h.queue
                    .iter()
                    .find(|e| e.offset.is_some() && e.epoch.is_some())
                    .cloned()
            });
            match (first, st.position.clone()) {
                (Some(e), p) => {
                    let before_first = e.offset.unwrap_or(1).saturating_sub(1);
                    // Never back: held duplicates of what was dispatched stay dropped.
                    let top = match p {
                        Some(p) if p.epoch == e.epoch => before_first.max(p.offset),
                        _ => before_first,
                    };
                    HistoryRead {
                        epoch: e.epoch.clone(),
                        top,
                        entries: Vec::new(),
                    }
                }
                (None, Some(p)) => HistoryRead {
                    epoch: p.epoch,
                    top: p.offset,
                    entries: Vec::new(),
                },
                (None, None) => HistoryRead::default(),
            }
        };
        self.apply_repair(channel, Some(read), true)
    }

    fn apply_repair(&self, channel: &str, read: Option<HistoryRead>, abandon: bool) -> Delivery {
        let mut out = Delivery::default();
        let Some(state) = self.state(channel) else {
            return out;
        };
        let mut st = lock(&state);
        st.repairing = false;
        let Some(h) = read else {
            out.repair = true;
            return out;
        };
        let held = st.held.take().unwrap_or_else(|| self.new_hold());
        // A repair only starts with a position.
        let position = st.position.clone().unwrap_or(Position::new(None, 0));
        let next = h
            .entries
            .iter()
            .find(|e| e.offset > Some(position.offset))
            .and_then(|e| e.offset);
        let contiguous = !abandon && continues(&position, h.epoch.as_deref(), h.top, next);
        if contiguous {
            for e in h
                .entries
                .iter()
                .filter(|e| e.offset > Some(position.offset))
            {
                if matches!(
                    check(st.position.as_ref(), e.offset, e.epoch.as_deref()),
                    Check::Accept
                ) {
                    self.accept(&mut st, channel, e, &mut out, true);
                    out.repaired += 1;
                }
            }
        } else {
            out.reset = true;
            let position = Position::new(h.epoch.clone(), h.top);
            for j in st.attaching.iter_mut() {
                j.base = Some(position.clone());
            }
            st.position = Some(position);
            let info = SubscribedInfo {
                offset: h.epoch.as_ref().map(|_| h.top),
                epoch: h.epoch.clone(),
                recovered: Some(false),
            };
            let mut announcement = Announcement::new(ServerFrame::Subscribed {
                id: None,
                channel,
                info,
            });
            let name = st.name.clone();
            for sub in st.live.iter_mut() {
                sub.skip_to = 0;
                sub.announce(&name, announcement.frame(sub.codec));
            }
        }
        // (Given up, no read was made: nothing held predates one.)
        let before_read = if abandon { 0 } else { st.held_at_read };
        let mut rest = (*held).into_iter().enumerate();
        while let Some((i, e)) = rest.next() {
            // A message held before the read, of an epoch other than the one read, is
            // from a stream that had already ended when the read was made: the reset
            // above covers it (holding it again would repair forever). One held after
            // the read may be from a newer stream: it is held, and read for, again.
            if let (Some(held_epoch), Some(read_epoch)) = (e.epoch.as_deref(), h.epoch.as_deref()) {
                if i < before_read && held_epoch != read_epoch && e.offset.is_some() {
                    out.duplicates += 1;
                    continue;
                }
            }
            match check(st.position.as_ref(), e.offset, e.epoch.as_deref()) {
                Check::Accept => self.accept(&mut st, channel, &e, &mut out, true),
                Check::Duplicate => out.duplicates += 1,
                Check::Gap => {
                    let mut again = self.new_hold();
                    for e in std::iter::once(e).chain(rest.map(|(_, e)| e)) {
                        self.hold(channel, &mut again, e);
                    }
                    st.held = Some(again);
                    out.repair = true;
                    break;
                }
            }
        }
        if st.is_empty() {
            self.drop_if_empty(channel, &st, &state);
        }
        out
    }

    /// Channels with a known position (to check after a broker reconnect).
    pub fn positioned_channels(&self) -> Vec<Arc<str>> {
        // Channel locks are never taken while a shard lock is held (drop_if_empty takes
        // them in the other order): collect first, then look.
        let all: Vec<(Arc<str>, Arc<Mutex<ChannelState>>)> = self
            .shards
            .iter()
            .flat_map(|s| {
                let s = s.read().unwrap_or_else(PoisonError::into_inner);
                s.iter()
                    .map(|(c, st)| (c.clone(), st.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.into_iter()
            .filter(|(_, st)| lock(st).position.is_some())
            .map(|(c, _)| c)
            .collect()
    }

    /// Client subscriptions across all channels.
    pub fn subscriptions(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// Channels with at least one local subscriber.
    pub fn channels(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// How many of `entries`, counted from the newest, fit the outbox's replay budget.
fn fitting_suffix(outbox: &Outbox, entries: &[Arc<Envelope>]) -> usize {
    // The frame's size, closely enough: data, event and the frame's fixed fields.
    let size =
        |e: &Arc<Envelope>| e.data.get().len() + e.event.as_ref().map_or(0, String::len) + 128;
    let total: usize = entries.iter().map(size).sum();
    if outbox.replay_fits(entries.len(), total) {
        return entries.len();
    }
    let mut bytes = 0;
    let mut n = 0;
    for e in entries.iter().rev() {
        if !outbox.replay_fits(n + 1, bytes + size(e)) {
            break;
        }
        bytes += size(e);
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Control;
    use crate::outbox::OutboxReader;
    use fanout_protocol::CloseCode;

    fn subscriber(id: SessionId, codec: Codec, cap: usize) -> (Subscriber, OutboxReader) {
        let control = Arc::new(Control::new());
        let limits = crate::outbox::QueueLimits {
            messages: cap,
            bytes: 1 << 20,
            replay_messages: 1000,
            replay_bytes: 1 << 20,
        };
        let (outbox, rx) = Outbox::new(limits, control);
        (Subscriber::new(id, codec, outbox, false), rx)
    }

    fn env(offset: u64, epoch: &str, data: &str) -> Arc<Envelope> {
        let payload =
            format!(r#"{{"fanout":1,"offset":{offset},"epoch":"{epoch}","data":{data},"ts":1}}"#);
        let e = Envelope::decode(payload.as_bytes(), 0);
        assert_eq!(e.offset, Some(offset), "{payload}");
        Arc::new(e)
    }

    fn numbered(offset: u64) -> Arc<Envelope> {
        env(offset, "e1", &format!(r#"{{"n":{offset}}}"#))
    }

    fn history(top: u64, offsets: impl IntoIterator<Item = u64>) -> HistoryRead {
        HistoryRead {
            epoch: Some("e1".into()),
            top,
            entries: offsets.into_iter().map(numbered).collect(),
        }
    }

    /// Frames queued for a subscriber, as JSON values.
    fn drain(rx: &mut OutboxReader) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|b| serde_json::from_slice(&b).unwrap())
            .collect()
    }

    fn offsets(frames: &[serde_json::Value]) -> Vec<u64> {
        frames
            .iter()
            .filter(|f| f["type"] == "message")
            .map(|f| f["offset"].as_u64().unwrap())
            .collect()
    }

    /// Completes a first-attempt attach of `id` with the read `history`.
    fn complete(
        hub: &Hub,
        ch: &str,
        id: SessionId,
        since: Option<&Since>,
        send_entries: bool,
        history: HistoryRead,
    ) -> Attached {
        let attach = Attach {
            id: None,
            since,
            send_entries,
            history,
            attempt: 0,
        };
        hub.complete_attach(ch, id, attach)
    }

    /// Attaches `id` with no `since`, reading `top` as the position.
    fn attach_live(hub: &Hub, ch: &str, sub: Subscriber, top: u64) {
        let id = sub.id;
        hub.attach(Arc::from(ch), sub);
        let attached = complete(hub, ch, id, None, false, history(top, []));
        assert_eq!(attached, Attached::Live { recovered: None });
    }

    #[test]
    fn dispatch_shares_one_encoding_per_codec() {
        let hub = Hub::new(4);
        let (a, mut ra) = subscriber(1, Codec::Json, 8);
        let (b, mut rb) = subscriber(2, Codec::Json, 8);
        let (c, mut rc) = subscriber(3, Codec::MsgPack, 8);
        for s in [a, b, c] {
            attach_live(&hub, "user:1", s, 0);
        }
        for rx in [&mut ra, &mut rb, &mut rc] {
            rx.try_recv().expect("subscribed");
        }
        let d = hub.deliver("user:1", Arc::new(Envelope::decode(br#"{"x":1}"#, 5)));
        assert_eq!(d.queued, 3);
        let fa = ra.try_recv().unwrap();
        let fb = rb.try_recv().unwrap();
        // Same allocation: the bytes were encoded once and shared.
        assert_eq!(fa.as_ptr(), fb.as_ptr());
        let fc = rc.try_recv().unwrap();
        assert_ne!(fa, fc);
        let none = hub.deliver("user:2", Arc::new(Envelope::decode(b"1", 5)));
        assert_eq!(none.queued, 0);
    }

    #[test]
    fn full_outbox_closes_only_that_subscriber() {
        let hub = Hub::new(4);
        let (slow, _rs) = subscriber(1, Codec::Json, 2);
        let (fast, mut rf) = subscriber(2, Codec::Json, 100);
        let slow_control = slow.outbox.control().clone();
        let fast_control = fast.outbox.control().clone();
        attach_live(&hub, "user:1", slow, 0);
        attach_live(&hub, "user:1", fast, 0);
        for n in 1..=10 {
            hub.deliver("user:1", numbered(n));
        }
        assert_eq!(slow_control.code(), Some(CloseCode::SlowConsumer));
        assert_eq!(fast_control.code(), None);
        assert_eq!(offsets(&drain(&mut rf)), (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn remove_cleans_up() {
        let hub = Hub::new(2);
        let (a, _ra) = subscriber(1, Codec::Json, 4);
        attach_live(&hub, "user:1", a, 0);
        assert_eq!((hub.channels(), hub.subscriptions()), (1, 1));
        assert!(hub.contains("user:1", 1));
        assert!(hub.remove("user:1", 1));
        assert!(!hub.remove("user:1", 1));
        assert_eq!((hub.channels(), hub.subscriptions()), (0, 0));
    }

    #[test]
    fn attach_sends_recovered_then_waiting_without_duplicates() {
        let hub = Hub::new(2);
        let (a, mut ra) = subscriber(1, Codec::Json, 64);
        hub.attach(Arc::from("c:x"), a);
        // Live messages while the history read is under way: 5 is also in the read.
        hub.deliver("c:x", numbered(5));
        hub.deliver("c:x", numbered(6));
        let since = Since {
            offset: 2,
            epoch: "e1".into(),
        };
        let attached = complete(&hub, "c:x", 1, Some(&since), false, history(5, 3..=5));
        assert_eq!(
            attached,
            Attached::Live {
                recovered: Some(true)
            }
        );
        let frames = drain(&mut ra);
        assert_eq!(frames[0]["type"], "subscribed");
        assert_eq!(frames[0]["recovered"], true);
        assert_eq!(frames[0]["offset"], 5);
        assert_eq!(offsets(&frames), vec![3, 4, 5, 6]);
        hub.deliver("c:x", numbered(7));
        hub.deliver("c:x", numbered(7));
        assert_eq!(offsets(&drain(&mut ra)), vec![7]);
    }

    #[test]
    fn a_gap_holds_the_channel_until_repaired() {
        let hub = Hub::new(2);
        let (a, mut ra) = subscriber(1, Codec::Json, 64);
        attach_live(&hub, "c:x", a, 3);
        drain(&mut ra);
        assert!(!hub.deliver("c:x", numbered(4)).repair);
        let d = hub.deliver("c:x", numbered(7));
        assert!(d.repair);
        // Held meanwhile, in order.
        hub.deliver("c:x", numbered(8));
        assert_eq!(offsets(&drain(&mut ra)), vec![4]);
        let pos = hub.begin_repair("c:x").unwrap();
        assert_eq!(pos.offset, 4);
        assert!(hub.begin_repair("c:x").is_none(), "one repair at a time");
        hub.deliver("c:x", numbered(9));
        let d = hub.finish_repair("c:x", Some(history(8, 5..=8)));
        // 7 and 8 were held and also read from history: dropped as duplicates.
        assert_eq!((d.repaired, d.duplicates, d.repair), (4, 2, false));
        assert_eq!(offsets(&drain(&mut ra)), vec![5, 6, 7, 8, 9]);
    }

    #[test]
    fn a_failed_read_keeps_holding() {
        let hub = Hub::new(2);
        let (a, mut ra) = subscriber(1, Codec::Json, 64);
        attach_live(&hub, "c:x", a, 1);
        drain(&mut ra);
        assert!(hub.deliver("c:x", numbered(3)).repair);
        hub.begin_repair("c:x").unwrap();
        assert!(hub.finish_repair("c:x", None).repair);
        hub.begin_repair("c:x").unwrap();
        let d = hub.finish_repair("c:x", Some(history(3, [2, 3])));
        assert!(!d.repair);
        assert_eq!(offsets(&drain(&mut ra)), vec![2, 3]);
    }

    #[test]
    fn holds_are_bounded_in_bytes_node_wide_and_give_their_bytes_back() {
        // Room for about four held messages across all channels.
        let one = held_size(&numbered(2));
        let hub = Hub::with_hold_limit(2, 4 * one);
        let (a, mut ra) = subscriber(1, Codec::Json, 1024);
        let (b, mut rb) = subscriber(2, Codec::Json, 1024);
        attach_live(&hub, "c:a", a, 1);
        attach_live(&hub, "c:b", b, 1);
        drain(&mut ra);
        drain(&mut rb);
        // Gaps on both channels; each holds what arrives meanwhile.
        for n in 3..=5 {
            hub.deliver("c:a", numbered(n));
        }
        for n in 3..=5 {
            hub.deliver("c:b", numbered(n));
        }
        // Six held in all would pass the bound: the oldest were dropped.
        assert!(hub.held_bytes() <= 4 * one, "{} held", hub.held_bytes());
        // c:b dropped its oldest to stay within the node's bound: the repair reads them.
        hub.begin_repair("c:b").unwrap();
        let d = hub.finish_repair("c:b", Some(history(5, [2, 3, 4, 5])));
        assert!(!d.repair);
        assert_eq!(offsets(&drain(&mut rb)), vec![2, 3, 4, 5]);
        hub.begin_repair("c:a").unwrap();
        hub.finish_repair("c:a", Some(history(5, [2, 3, 4, 5])));
        assert_eq!(offsets(&drain(&mut ra)), vec![2, 3, 4, 5]);
        assert_eq!(hub.held_bytes(), 0, "every held byte given back");
    }

    #[test]
    fn a_repair_given_up_tells_subscribers_and_delivers_what_was_held() {
        let hub = Hub::new(2);
        let (a, mut ra) = subscriber(1, Codec::Json, 64);
        attach_live(&hub, "c:x", a, 1);
        drain(&mut ra);
        assert!(hub.deliver("c:x", numbered(4)).repair);
        assert!(!hub.deliver("c:x", numbered(5)).repair);
        hub.begin_repair("c:x").unwrap();
        assert!(hub.finish_repair("c:x", None).repair);
        let d = hub.abandon_repair("c:x");
        assert!(!d.repair);
        let frames = drain(&mut ra);
        assert_eq!(frames[0]["type"], "subscribed");
        assert_eq!(frames[0]["recovered"], false);
        assert_eq!(frames[0]["offset"], 3, "{}", frames[0]);
        assert_eq!(offsets(&frames), vec![4, 5]);
        assert_eq!(hub.held_bytes(), 0);
        // The stream goes on from there.
        assert!(!hub.deliver("c:x", numbered(6)).repair);
        assert_eq!(offsets(&drain(&mut ra)), vec![6]);
    }

    #[test]
    fn a_lost_history_resets_subscribers() {
        let hub = Hub::new(2);
        let (a, mut ra) = subscriber(1, Codec::Json, 64);
        attach_live(&hub, "c:x", a, 10);
        drain(&mut ra);
        // Redis came back empty: a new epoch starts at 1.
        assert!(hub.deliver("c:x", env(1, "e2", "1")).repair);
        hub.begin_repair("c:x").unwrap();
        let d = hub.finish_repair(
            "c:x",
            Some(HistoryRead {
                epoch: Some("e2".into()),
                top: 1,
                entries: vec![env(1, "e2", "1")],
            }),
        );
        assert!(d.reset);
        let frames = drain(&mut ra);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0]["type"], "subscribed");
        assert_eq!(frames[0]["recovered"], false);
        assert_eq!(frames[0]["epoch"], "e2");
        assert_eq!(frames[0]["offset"], 1);
        hub.deliver("c:x", env(2, "e2", "2"));
        assert_eq!(offsets(&drain(&mut ra)), vec![2]);
    }

    #[test]
    fn an_attach_read_older_than_the_channel_is_read_again() {
        let hub = Hub::new(2);
        let (a, mut ra) = subscriber(1, Codec::Json, 64);
        let (b, mut rb) = subscriber(2, Codec::Json, 64);
        hub.attach(Arc::from("c:x"), a);
        hub.attach(Arc::from("c:x"), b);
        let plain = |top, attempt| Attach {
            id: None,
            since: None,
            send_entries: false,
            history: history(top, []),
            attempt,
        };
        // b read top 10, then 11..15 were published and a read top 15 and went first.
        assert_eq!(
            hub.complete_attach("c:x", 1, plain(15, 0)),
            Attached::Live { recovered: None }
        );
        assert_eq!(hub.complete_attach("c:x", 2, plain(10, 0)), Attached::Stale);
        // 11..15 reach the node now: a already has them in its position.
        for n in 11..=15 {
            hub.deliver("c:x", numbered(n));
        }
        assert_eq!(
            hub.complete_attach("c:x", 2, plain(15, 1)),
            Attached::Live { recovered: None }
        );
        hub.deliver("c:x", numbered(16));
        assert_eq!(offsets(&drain(&mut ra)), vec![16]);
        let frames = drain(&mut rb);
        assert_eq!(frames[0]["offset"], 15);
        assert_eq!(offsets(&frames), vec![16]);
    }

    #[test]
    fn a_since_the_read_does_not_cover_is_not_recovered() {
        let since = Since {
            offset: 2,
            epoch: "e1".into(),
        };
        // History starts at 6 (3..=5 were trimmed); or the read was capped before the
        // top (too many missed messages).
        for (top, kept) in [(8, 6..=8), (100, 3..=50)] {
            let hub = Hub::new(2);
            let (a, mut ra) = subscriber(1, Codec::Json, 64);
            hub.attach(Arc::from("c:x"), a);
            let attached = complete(&hub, "c:x", 1, Some(&since), false, history(top, kept));
            assert_eq!(
                attached,
                Attached::Live {
                    recovered: Some(false)
                }
            );
            let frames = drain(&mut ra);
            assert_eq!(frames.len(), 1, "nothing but `subscribed`: {frames:?}");
            assert_eq!(frames[0]["recovered"], false);
            assert_eq!(frames[0]["offset"], top);
        }
    }

    #[test]
    fn reads_that_keep_lagging_end_in_recovered_false_at_the_node_position() {
        let hub = Hub::new(2);
        let (a, _ra) = subscriber(1, Codec::Json, 64);
        let (b, mut rb) = subscriber(2, Codec::Json, 64);
        hub.attach(Arc::from("c:x"), a);
        hub.attach(Arc::from("c:x"), b);
        complete(&hub, "c:x", 1, None, false, history(15, []));
        let since = Since {
            offset: 3,
            epoch: "e1".into(),
        };
        let lagging = |attempt| Attach {
            id: None,
            since: Some(&since),
            send_entries: false,
            history: history(10, 4..=10),
            attempt,
        };
        assert_eq!(hub.complete_attach("c:x", 2, lagging(0)), Attached::Stale);
        assert_eq!(hub.complete_attach("c:x", 2, lagging(1)), Attached::Stale);
        let last = hub.complete_attach("c:x", 2, lagging(MAX_ATTACH_READS - 1));
        assert_eq!(
            last,
            Attached::Live {
                recovered: Some(false)
            }
        );
        let frames = drain(&mut rb);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(
            (
                frames[0]["offset"].as_u64(),
                frames[0]["recovered"].as_bool()
            ),
            (Some(15), Some(false))
        );
        hub.deliver("c:x", numbered(16));
        assert_eq!(offsets(&drain(&mut rb)), vec![16]);
    }

    #[test]
    fn a_message_of_a_newer_epoch_held_after_the_read_is_kept() {
        let hub = Hub::new(2);
        let (a, mut ra) = subscriber(1, Codec::Json, 64);
        attach_live(&hub, "c:x", a, 3);
        drain(&mut ra);
        assert!(hub.deliver("c:x", numbered(5)).repair);
        hub.begin_repair("c:x").unwrap();
        // The keys expired after the read: a new epoch's first message arrives.
        hub.deliver("c:x", env(1, "e2", "1"));
        let d = hub.finish_repair("c:x", Some(history(5, 4..=5)));
        assert_eq!(d.repaired, 2);
        assert!(
            d.repair,
            "the new epoch's message is held and read for again"
        );
        assert_eq!(offsets(&drain(&mut ra)), vec![4, 5]);
        hub.begin_repair("c:x").unwrap();
        let read = HistoryRead {
            epoch: Some("e2".into()),
            top: 1,
            entries: vec![env(1, "e2", "1")],
        };
        let d = hub.finish_repair("c:x", Some(read));
        assert!(d.reset && !d.repair);
        let frames = drain(&mut ra);
        assert_eq!(frames[0]["recovered"], false, "{frames:?}");
        assert_eq!(frames[0]["epoch"], "e2");
    }

    #[test]
    fn a_channel_without_history_still_detects_a_gap() {
        let hub = Hub::new(2);
        let (a, mut ra) = subscriber(1, Codec::Json, 64);
        // Attached before anything was published: no epoch yet.
        hub.attach(Arc::from("c:x"), a);
        complete(&hub, "c:x", 1, None, false, HistoryRead::default());
        drain(&mut ra);
        // Offsets 1 and 2 never arrived live.
        assert!(hub.deliver("c:x", numbered(3)).repair);
        assert_eq!(hub.begin_repair("c:x").unwrap().offset, 0);
        let d = hub.finish_repair("c:x", Some(history(3, 1..=3)));
        assert_eq!((d.repaired, d.reset), (3, false));
        assert_eq!(offsets(&drain(&mut ra)), vec![1, 2, 3]);
    }

    #[test]
    fn a_late_attacher_is_not_sent_what_it_read() {
        let hub = Hub::new(2);
        let (a, mut ra) = subscriber(1, Codec::Json, 64);
        let (b, mut rb) = subscriber(2, Codec::Json, 64);
        attach_live(&hub, "c:x", a, 3);
        // b read history up to 5 while 4 and 5 are still on their way to the node.
        hub.attach(Arc::from("c:x"), b);
        complete(&hub, "c:x", 2, None, true, history(5, 4..=5));
        for n in 4..=6 {
            hub.deliver("c:x", numbered(n));
        }
        assert_eq!(offsets(&drain(&mut ra)), vec![4, 5, 6]);
        assert_eq!(offsets(&drain(&mut rb)), vec![4, 5, 6]);
    }

    #[test]
    fn a_terminal_status_ends_job_subscriptions() {
        let hub = Hub::new(2);
        let (a, mut ra) = subscriber(1, Codec::Json, 64);
        attach_live(&hub, "job_progress:7", a, 0);
        drain(&mut ra);
        hub.deliver("job_progress:7", env(1, "e1", r#"{"pct":50}"#));
        let d = hub.deliver("job_progress:7", env(2, "e1", r#"{"status":"succeeded"}"#));
        assert_eq!(d.ended, 1);
        let frames = drain(&mut ra);
        assert_eq!(offsets(&frames), vec![1, 2]);
        assert_eq!(frames[2]["type"], "unsubscribed");
        assert_eq!(frames[2]["reason"], "completed");
        assert_eq!((hub.channels(), hub.subscriptions()), (0, 0));
        // A later subscriber gets the final state, then the same end.
        let (b, mut rb) = subscriber(2, Codec::Json, 64);
        hub.attach(Arc::from("job_progress:7"), b);
        let attached = complete(
            &hub,
            "job_progress:7",
            2,
            None,
            true,
            HistoryRead {
                epoch: Some("e1".into()),
                top: 2,
                entries: vec![env(2, "e1", r#"{"status":"succeeded"}"#)],
            },
        );
        assert_eq!(attached, Attached::Ended);
        let frames = drain(&mut rb);
        let types: Vec<_> = frames.iter().map(|f| f["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["subscribed", "message", "unsubscribed"]);
        assert_eq!((hub.channels(), hub.subscriptions()), (0, 0));
    }
}
