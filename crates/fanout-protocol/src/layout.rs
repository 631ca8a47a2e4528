//! The Redis layout of channel history, shared by every publisher (the
//! `fanout-publisher` crate, the `fanout-publish` CLI, the edge's `/api/publish`) and
//! documented in `docs/protocol.md` for publishers in other languages.
//!
//! For channel `C` (all keys hash-tag `{C}` so that, in Redis Cluster, the script, its
//! keys and the sharded channel `C` live in one slot):
//! - `fanout:{C}:meta` — hash: `offset` (last offset given out), `epoch` (random; a new
//!   one whenever the hash is gone, i.e. history was lost).
//! - `fanout:{C}:history` — stream of the last N envelopes, entry id `<offset>-0`, field
//!   `e` = the envelope JSON.
//! - `fanout:{C}:dedup` — hash: the idempotency keys applied in the last
//!   [`DEDUP_WINDOW_SECS`] (at most [`DEDUP_MAX_KEYS`] of them), each with the offset and
//!   epoch its publish got, so that a resent publish is applied at most once (see the
//!   header of `publish.lua` for the fields).
//!
//! [`PUBLISH_SCRIPT`] does the whole publish atomically.

/// Key of the offset/epoch hash of `channel`.
pub fn meta_key(channel: &str) -> String {
    format!("fanout:{{{channel}}}:meta")
}

/// Key of the history stream of `channel`.
pub fn history_key(channel: &str) -> String {
    format!("fanout:{{{channel}}}:history")
}

/// Key of the idempotency-key hash of `channel` (see [`PUBLISH_SCRIPT`]).
pub fn dedup_key(channel: &str) -> String {
    format!("fanout:{{{channel}}}:dedup")
}

/// How long, by default, a publish's idempotency key is remembered: a publish resent
/// with the same key within this window returns the first one's offset and epoch
/// instead of publishing again.
pub const DEDUP_WINDOW_SECS: u64 = 300;

/// How many idempotency keys, by default, a channel remembers at most: past that the
/// oldest is forgotten even within the window.
pub const DEDUP_MAX_KEYS: u32 = 10_000;

/// Key of the presence hash of `channel`: field = client id, value =
/// `<expiry, ms since the Unix epoch>|<client info JSON>`.
pub fn presence_key(channel: &str) -> String {
    format!("fanout:{{{channel}}}:presence")
}

/// Atomic publish. `KEYS[1]` = meta key, `KEYS[2]` = history key, `KEYS[3]` = dedup
/// key (needed only with `ARGV[8]`). `ARGV[1]` = channel, `ARGV[2]` = envelope body
/// (from [`Envelope::encode_body`](crate::Envelope::encode_body), starting with `{`),
/// `ARGV[3]` = history size (0 = keep none), `ARGV[4]` = TTL of both keys in seconds,
/// `ARGV[5]` = epoch to use if the channel has none, `ARGV[6]` = `1` to publish with
/// SPUBLISH (Redis Cluster), `ARGV[7]` = a TTL replacing `ARGV[4]` (a finished job's
/// history) or `0`, `ARGV[8]` = idempotency key or empty/absent, `ARGV[9]` = seconds a
/// key is remembered (default [`DEDUP_WINDOW_SECS`]), `ARGV[10]` = most keys remembered
/// (default [`DEDUP_MAX_KEYS`]). Returns `{offset, epoch}`; with a key
/// `{offset, epoch, duplicate}` where `duplicate` is `1` when the key had already been
/// applied (nothing published; offset and epoch are the first publish's), else `0`.
/// Callers without a key pass 2 keys and 7 arguments, as before.
pub const PUBLISH_SCRIPT: &str = include_str!("publish.lua");

/// Atomic history read: the channel's epoch, its last offset and envelopes from its
/// stream, in one step (see the header of `history.lua` for the arguments).
pub const HISTORY_SCRIPT: &str = include_str!("history.lua");

#[cfg(test)]
mod tests {
    #[test]
    fn keys_hash_tag_the_channel() {
        assert_eq!(super::meta_key("user:42"), "fanout:{user:42}:meta");
        assert_eq!(super::history_key("user:42"), "fanout:{user:42}:history");
        assert_eq!(super::dedup_key("user:42"), "fanout:{user:42}:dedup");
    }
}
