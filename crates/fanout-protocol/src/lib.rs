//! # fanout-protocol
//!
//! The wire types of fanout and nothing else: the frames a client and an edge node
//! exchange (JSON or MessagePack), the envelope workers put on Redis, channel names and
//! their namespaces, the Redis key layout of channel history, and the error and close
//! codes. This crate never does I/O; every other crate builds on it.
//!
//! ```
//! use fanout_protocol::{ClientFrame, Codec, Channel};
//!
//! let frame = Codec::Json.decode_client(br#"{"type":"subscribe","id":1,"channel":"user:42"}"#).unwrap();
//! match frame.frame {
//!     ClientFrame::Subscribe { channel, .. } => {
//!         let channel = Channel::parse(&channel).unwrap();
//!         assert_eq!(channel.namespace(), "user");
//!         assert_eq!(channel.rest(), "42");
//!     }
//!     _ => unreachable!(),
//! }
//! ```

mod channel;
mod codec;
mod codes;
mod envelope;
mod frame;
pub mod layout;

pub use channel::{claim_matches, Channel, ChannelError, MAX_CHANNEL_LEN};
pub use codec::{Codec, DecodeError, DecodedFrame};
pub use codes::{CloseCode, ErrorCode};
pub use envelope::{data_is_terminal, Envelope, EnvelopeError, Notice, ENVELOPE_VERSION};
pub use frame::{ClientFrame, FrameId, ServerFrame, Since, SubscribedInfo};

/// The terminal job statuses: a `job_progress` message whose data has one of these as
/// `"status"` ends the job's subscription with `reason: "completed"`.
pub const TERMINAL_STATUSES: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// Milliseconds since the Unix epoch, the unit of `ts` everywhere in the protocol.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
