//! What a history read asks for and returns: a channel's position (epoch, last offset)
//! and its kept messages. Plain data, shared by the broker (which reads) and the hub
//! (which applies reads to joins and repairs); no I/O.

use std::sync::Arc;

use fanout_protocol::Envelope;

/// What to read from a channel's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryQuery {
    /// Every kept message with an offset greater than this.
    After(u64),
    /// The newest `n` messages (0: only the position).
    Last(u32),
}

/// A channel's position and the history asked for, read atomically.
#[derive(Debug, Clone, Default)]
pub struct HistoryRead {
    /// `None` when the channel has no history (never published with offsets, or expired).
    pub epoch: Option<String>,
    /// The last offset given out (0 when none).
    pub top: u64,
    /// Oldest first.
    pub entries: Vec<Arc<Envelope>>,
}

/// The most history entries one read returns.
pub const MAX_HISTORY_READ: u32 = 10_000;
