//! Positions in a channel's stream, and the rules that compare them — pure functions,
//! no locks, no I/O. A stream is numbered by `offset` within an `epoch` (a new epoch
//! starts when a channel's history is lost). The hub keeps, per channel, the position
//! of the last message it dispatched; a history read reports the stream's `top` (its
//! last offset) and the entries it kept; a client's `since` is the last position it saw.
//! See `docs/architecture.md` ("Positions") for a drawing.

/// Where a channel's stream stands: the last offset dispatched, in an epoch. No epoch
/// (offset 0): the channel had no history when the node looked, so its first message
/// will be offset 1 of a new epoch — and one that arrives later than that is a gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Option<String>,
    pub offset: u64,
}

impl Position {
    /// The position a history read leaves a channel at: its top, or "nothing yet".
    pub fn new(epoch: Option<String>, top: u64) -> Position {
        match epoch {
            Some(epoch) => Position {
                epoch: Some(epoch),
                offset: top,
            },
            None => Position {
                epoch: None,
                offset: 0,
            },
        }
    }

    /// Whether history read as `epoch` continues this position's stream.
    pub fn continued_by(&self, epoch: Option<&str>) -> bool {
        match (self.epoch.as_deref(), epoch) {
            (Some(a), Some(b)) => a == b,
            // Nothing had been published: any epoch begun since continues it.
            (None, _) => true,
            (Some(_), None) => false,
        }
    }
}

/// What a history read covers: the stream's epoch and top, and the offsets of the
/// first and last entries it kept (`None` when it kept none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span<'a> {
    pub epoch: Option<&'a str>,
    pub top: u64,
    pub first: Option<u64>,
    pub last: Option<u64>,
}

/// What to do with a message, given the channel's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The next one: dispatch it.
    Accept,
    /// Dispatched already (a replay racing a live message): drop it.
    Duplicate,
    /// Something is missing before it (or its epoch is another): hold and repair.
    Gap,
}

/// Whether a message at `offset` of `epoch` is the next of the stream at `position`.
/// A message without an offset (a raw `PUBLISH`) or a channel with no position yet
/// has nothing to compare with: accepted.
pub fn check(position: Option<&Position>, offset: Option<u64>, epoch: Option<&str>) -> Check {
    let (Some(offset), Some(epoch), Some(p)) = (offset, epoch, position) else {
        return Check::Accept;
    };
    if !p.continued_by(Some(epoch)) {
        return Check::Gap;
    }
    match offset.cmp(&(p.offset + 1)) {
        std::cmp::Ordering::Equal => Check::Accept,
        std::cmp::Ordering::Less => Check::Duplicate,
        std::cmp::Ordering::Greater => Check::Gap,
    }
}

/// An attach (a subscriber joining a channel in the hub): whether a history read
/// reaches `base`, what the node had dispatched when the subscriber attached (what it
/// dispatched since waits for the subscriber). A read behind it — another epoch, or an older top (a lagging replica) — would leave the
/// messages in between neither read nor sent: it is stale, and read again.
pub fn reaches(base: &Position, read: Span<'_>) -> bool {
    base.continued_by(read.epoch) && base.offset <= read.top
}

/// A `since` recovery: whether the read holds every message after `since` — same
/// epoch, `since` not past the top, and the entries run from `since + 1` to the top
/// (or there is nothing after `since`).
pub fn recovers(since_epoch: &str, since_offset: u64, read: Span<'_>) -> bool {
    read.epoch == Some(since_epoch)
        && since_offset <= read.top
        && (since_offset == read.top
            || (read.first == Some(since_offset + 1) && read.last == Some(read.top)))
}

/// A gap repair: whether a read continues the channel's stream from `position`
/// without a hole. `next` is the offset of the first entry read past the position.
pub fn continues(position: &Position, epoch: Option<&str>, top: u64, next: Option<u64>) -> bool {
    position.continued_by(epoch)
        && top >= position.offset
        && (top == position.offset || next == Some(position.offset + 1))
}

/// A message that waited during an attach: whether the attach's read already delivered it
/// (same epoch, at or under the read's top), or it belongs to another stream than the
/// one `subscribed` announced. Either way it is not sent.
pub fn covered_or_foreign(epoch: Option<&str>, offset: Option<u64>, read: Span<'_>) -> bool {
    let covered = epoch.is_some() && epoch == read.epoch && offset.is_some_and(|o| o <= read.top);
    let foreign = read.epoch.is_some() && epoch.is_some() && epoch != read.epoch;
    covered || foreign
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(epoch: &str, offset: u64) -> Position {
        Position {
            epoch: Some(epoch.into()),
            offset,
        }
    }

    fn span(epoch: Option<&str>, top: u64, entries: std::ops::RangeInclusive<u64>) -> Span<'_> {
        let (first, last) = if entries.is_empty() {
            (None, None)
        } else {
            (Some(*entries.start()), Some(*entries.end()))
        };
        Span {
            epoch,
            top,
            first,
            last,
        }
    }

    #[test]
    fn messages_are_checked_against_the_position() {
        let p = at("e1", 7);
        assert_eq!(check(Some(&p), Some(8), Some("e1")), Check::Accept);
        assert_eq!(check(Some(&p), Some(7), Some("e1")), Check::Duplicate);
        assert_eq!(check(Some(&p), Some(9), Some("e1")), Check::Gap);
        assert_eq!(
            check(Some(&p), Some(1), Some("e2")),
            Check::Gap,
            "a new epoch"
        );
        assert_eq!(check(Some(&p), None, None), Check::Accept, "a raw PUBLISH");
        assert_eq!(check(None, Some(40), Some("e1")), Check::Accept);
        // Nothing was published when the node looked: offset 1 of any epoch is next.
        let empty = Position::new(None, 0);
        assert_eq!(check(Some(&empty), Some(1), Some("e9")), Check::Accept);
        assert_eq!(check(Some(&empty), Some(2), Some("e9")), Check::Gap);
    }

    #[test]
    fn an_attach_read_must_reach_what_was_dispatched() {
        let base = at("e1", 10);
        assert!(reaches(&base, span(Some("e1"), 10, 1..=10)));
        assert!(reaches(&base, span(Some("e1"), 12, 1..=12)));
        assert!(
            !reaches(&base, span(Some("e1"), 9, 1..=9)),
            "a lagging replica"
        );
        assert!(
            !reaches(&base, span(Some("e2"), 30, 1..=30)),
            "another stream"
        );
        assert!(reaches(&Position::new(None, 0), span(Some("e2"), 3, 1..=3)));
    }

    #[test]
    fn since_is_recovered_only_with_everything_after_it() {
        assert!(
            recovers("e1", 10, span(Some("e1"), 10, 1..=10)),
            "nothing missed"
        );
        assert!(recovers("e1", 7, span(Some("e1"), 10, 8..=10)));
        assert!(
            !recovers("e1", 7, span(Some("e1"), 10, 9..=10)),
            "8 was trimmed"
        );
        assert!(
            !recovers("e1", 11, span(Some("e1"), 10, 1..=10)),
            "from the future"
        );
        assert!(
            !recovers("e1", 7, span(Some("e2"), 10, 1..=10)),
            "another epoch"
        );
        let nothing = Span {
            epoch: None,
            top: 0,
            first: None,
            last: None,
        };
        assert!(!recovers("e1", 0, nothing), "no history");
    }

    #[test]
    fn a_repair_continues_only_without_a_hole() {
        let p = at("e1", 5);
        assert!(continues(&p, Some("e1"), 5, None), "nothing new");
        assert!(continues(&p, Some("e1"), 9, Some(6)));
        assert!(!continues(&p, Some("e1"), 9, Some(7)), "6 is gone");
        assert!(!continues(&p, Some("e1"), 4, None), "history went back");
        assert!(!continues(&p, Some("e2"), 9, Some(6)), "a new epoch");
    }

    #[test]
    fn waiting_messages_the_read_delivered_are_not_sent_again() {
        let read = span(Some("e1"), 10, 1..=10);
        assert!(covered_or_foreign(Some("e1"), Some(10), read));
        assert!(!covered_or_foreign(Some("e1"), Some(11), read));
        assert!(
            covered_or_foreign(Some("e0"), Some(11), read),
            "another stream"
        );
        assert!(
            !covered_or_foreign(None, None, read),
            "a raw PUBLISH is always sent"
        );
    }

    proptest! {
        /// `recovers` agrees with the plain meaning: replaying the kept entries after
        /// `since` gives exactly since+1 ..= top.
        #[test]
        fn recovers_means_nothing_is_missing(
            since in 0u64..20, top in 0u64..20, kept_from in 1u64..22, same_epoch: bool,
        ) {
            let entries: Vec<u64> = (kept_from..=top).collect();
            let read = Span {
                epoch: Some("e1"),
                top,
                first: entries.first().copied(),
                last: entries.last().copied(),
            };
            let epoch = if same_epoch { "e1" } else { "e0" };
            let replayed: Vec<u64> = entries.iter().copied().filter(|&o| o > since).collect();
            let complete = same_epoch && since <= top && replayed == (since + 1..=top).collect::<Vec<_>>();
            // The rule also wants the kept entries to start right after `since`, which
            // the attach relies on to send them whole (a read never keeps less than it
            // was asked for, so `first > since + 1` means trimmed).
            let expect = complete && (since == top || entries.first() == Some(&(since + 1)));
            prop_assert_eq!(recovers(epoch, since, read), expect);
        }

        /// Accepting exactly the checked-next messages of a shuffled, duplicated
        /// stream dispatches each offset once, in order.
        #[test]
        fn check_dispatches_each_offset_once_in_order(
            order in proptest::collection::vec(1u64..30, 0..80),
        ) {
            let mut p = Position::new(Some("e1".into()), 0);
            let mut dispatched = Vec::new();
            for o in order {
                if check(Some(&p), Some(o), Some("e1")) == Check::Accept {
                    p.offset = o;
                    dispatched.push(o);
                }
            }
            prop_assert_eq!(dispatched.clone(), (1..=dispatched.len() as u64).collect::<Vec<_>>());
        }
    }
}
