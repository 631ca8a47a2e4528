//! RFC 6455 rules the session applies to each client frame, as pure functions: masking
//! and control-frame size (§5.1, §5.5), reassembly of fragmented messages with their
//! size limit and UTF-8 check (§5.4, §8.1), and which close code answers a client's close
//! frame (§7.4). No I/O here; the session acts on the verdicts.

use bytes::BytesMut;
use fastwebsockets::OpCode;

use super::Received;

/// A close code and its reason, for a frame that breaks the protocol.
pub type Violation = (u16, &'static str);

/// Largest control frame payload (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Whether `opcode` carries (part of) a message.
pub fn is_data(opcode: OpCode) -> bool {
    matches!(opcode, OpCode::Text | OpCode::Binary | OpCode::Continuation)
}

/// Rules every frame must follow, whatever its kind: a client masks every frame, and a
/// control frame carries at most 125 bytes. Both → 1002.
pub fn check(frame: &Received) -> Result<(), Violation> {
    if !frame.masked {
        return Err((1002, "client frames must be masked"));
    }
    if !is_data(frame.opcode) && frame.payload.len() > MAX_CONTROL_PAYLOAD {
        return Err((1002, "control frames carry at most 125 bytes"));
    }
    Ok(())
}

/// The code to answer a client's close frame with: its own code when it is one a
/// client may send (1000–1003, 1007–1011, 3000–4999), 1000 for an empty close, 1007
/// for a reason that is not UTF-8, else 1002.
pub fn close_code(payload: &[u8]) -> u16 {
    match payload.len() {
        0 => 1000,
        1 => 1002,
        _ if std::str::from_utf8(&payload[2..]).is_err() => 1007,
        _ => match u16::from_be_bytes([payload[0], payload[1]]) {
            c @ (1000..=1003 | 1007..=1011 | 3000..=4999) => c,
            _ => 1002,
        },
    }
}

/// A fragmented message being put together, or being skipped.
#[derive(Default)]
pub struct Fragments {
    /// The pieces so far and whether the message is binary (boxed: rare).
    partial: Option<Box<(Vec<u8>, bool)>>,
    /// Skipping the rest of a message one of whose pieces was refused.
    discarding: bool,
}

impl Fragments {
    /// Takes a data frame (text, binary or continuation): the whole message and whether
    /// it is binary once its last piece is in, `None` while more are expected. A message
    /// over `max` bytes → 1009; a text message that is not UTF-8 → 1007; a continuation
    /// with nothing to continue, or a new message before the last one ended → 1002.
    pub fn push(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: BytesMut,
        max: usize,
    ) -> Result<Option<(Vec<u8>, bool)>, Violation> {
        if opcode == OpCode::Continuation && self.discarding {
            self.discarding = !fin;
            return Ok(None);
        }
        let (buf, binary) = match opcode {
            OpCode::Continuation => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err((1002, "a continuation frame with no message to continue"));
                };
                if partial.0.len() + payload.len() > max {
                    return Err((1009, "message too big"));
                }
                partial.0.extend_from_slice(&payload);
                if !fin {
                    return Ok(None);
                }
                *self.partial.take().expect("checked above")
            }
            OpCode::Text | OpCode::Binary => {
                self.discarding = false;
                if self.partial.is_some() {
                    return Err((1002, "a new message began before the fragmented one ended"));
                }
                if payload.len() > max {
                    return Err((1009, "message too big"));
                }
                let started = (payload.to_vec(), opcode == OpCode::Binary);
                if !fin {
                    self.partial = Some(Box::new(started));
                    return Ok(None);
                }
                started
            }
            _ => return Ok(None),
        };
        if !binary && std::str::from_utf8(&buf).is_err() {
            return Err((1007, "text message is not valid UTF-8"));
        }
        Ok(Some((buf, binary)))
    }

    /// A data frame was refused (rate limit): the message it belongs to is dropped, and
    /// its remaining pieces with it.
    pub fn refuse(&mut self, fin: bool) {
        if self.partial.is_some() || !fin {
            self.partial = None;
            self.discarding = !fin;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(masked: bool, opcode: OpCode, len: usize) -> Received {
        Received {
            masked,
            fin: true,
            opcode,
            payload: BytesMut::from(&vec![b'a'; len][..]),
        }
    }

    #[test]
    fn unmasked_frames_and_long_control_frames_are_protocol_errors() {
        assert_eq!(check(&frame(false, OpCode::Text, 3)).unwrap_err().0, 1002);
        assert!(check(&frame(true, OpCode::Text, 3)).is_ok());
        for op in [OpCode::Ping, OpCode::Pong, OpCode::Close] {
            assert!(check(&frame(true, op, 125)).is_ok());
            assert_eq!(check(&frame(true, op, 126)).unwrap_err().0, 1002);
        }
        // Data frames are bounded by the message size, not 125.
        assert!(check(&frame(true, OpCode::Binary, 4096)).is_ok());
    }

    #[test]
    fn close_codes_a_client_may_send_are_echoed() {
        let close = |code: u16, reason: &[u8]| {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(reason);
            close_code(&p)
        };
        assert_eq!(close_code(&[]), 1000);
        assert_eq!(close_code(&[3]), 1002);
        for c in [1000, 1001, 1002, 1003, 1007, 1011, 3000, 4999] {
            assert_eq!(close(c, b"bye"), c);
        }
        for c in [0, 999, 1004, 1005, 1006, 1012, 1014, 1015, 2999, 5000] {
            assert_eq!(close(c, b""), 1002, "code {c}");
        }
        assert_eq!(close(1000, &[0xff, 0xfe]), 1007);
    }

    fn bytes(b: &[u8]) -> BytesMut {
        BytesMut::from(b)
    }

    #[test]
    fn fragments_are_reassembled_and_checked_whole() {
        let mut f = Fragments::default();
        assert_eq!(f.push(OpCode::Text, false, bytes(b"he"), 100), Ok(None));
        assert_eq!(
            f.push(OpCode::Continuation, false, bytes(b"l"), 100),
            Ok(None)
        );
        assert_eq!(
            f.push(OpCode::Continuation, true, bytes(b"lo"), 100),
            Ok(Some((b"hello".to_vec(), false)))
        );
        // "é" split across two fragments is valid once whole.
        assert_eq!(f.push(OpCode::Text, false, bytes(&[0xc3]), 100), Ok(None));
        assert_eq!(
            f.push(OpCode::Continuation, true, bytes(&[0xa9]), 100),
            Ok(Some(("é".as_bytes().to_vec(), false)))
        );
        // Invalid UTF-8, fragmented or whole: 1007. Binary is not checked.
        assert_eq!(f.push(OpCode::Text, false, bytes(&[0xc3]), 100), Ok(None));
        assert_eq!(
            f.push(OpCode::Continuation, true, bytes(b"x"), 100)
                .unwrap_err()
                .0,
            1007
        );
        assert_eq!(
            f.push(OpCode::Text, true, bytes(&[0xff]), 100)
                .unwrap_err()
                .0,
            1007
        );
        assert_eq!(
            f.push(OpCode::Binary, true, bytes(&[0xff]), 100),
            Ok(Some((vec![0xff], true)))
        );
    }

    #[test]
    fn broken_sequences_and_sizes_are_refused() {
        let mut f = Fragments::default();
        assert_eq!(
            f.push(OpCode::Continuation, true, bytes(b"x"), 100)
                .unwrap_err()
                .0,
            1002
        );
        assert_eq!(f.push(OpCode::Binary, false, bytes(b"ab"), 100), Ok(None));
        assert_eq!(
            f.push(OpCode::Text, true, bytes(b"x"), 100).unwrap_err().0,
            1002
        );
        let mut f = Fragments::default();
        assert_eq!(
            f.push(OpCode::Binary, false, bytes(&[0; 60]), 100),
            Ok(None)
        );
        assert_eq!(
            f.push(OpCode::Continuation, true, bytes(&[0; 41]), 100)
                .unwrap_err()
                .0,
            1009
        );
        assert_eq!(
            Fragments::default()
                .push(OpCode::Text, true, bytes(&[b'a'; 101]), 100)
                .unwrap_err()
                .0,
            1009
        );
    }

    #[test]
    fn a_refused_piece_drops_its_whole_message() {
        let mut f = Fragments::default();
        assert_eq!(f.push(OpCode::Text, false, bytes(b"a"), 100), Ok(None));
        f.refuse(false);
        assert_eq!(
            f.push(OpCode::Continuation, false, bytes(b"b"), 100),
            Ok(None)
        );
        assert_eq!(
            f.push(OpCode::Continuation, true, bytes(b"c"), 100),
            Ok(None)
        );
        // The next message is whole again.
        assert_eq!(
            f.push(OpCode::Text, true, bytes(b"d"), 100),
            Ok(Some((b"d".to_vec(), false)))
        );
        // A refused whole frame changes nothing.
        f.refuse(true);
        assert_eq!(
            f.push(OpCode::Text, true, bytes(b"e"), 100),
            Ok(Some((b"e".to_vec(), false)))
        );
    }

    proptest! {
        /// Any split of any message reassembles to the message (or to the verdict the
        /// whole message gets), whatever the pieces' sizes.
        #[test]
        fn any_split_reassembles_like_the_whole(
            msg in proptest::collection::vec(any::<u8>(), 0..300),
            text in any::<bool>(),
            cuts in proptest::collection::vec(0usize..300, 0..6),
            max in 1usize..400,
        ) {
            let opcode = if text { OpCode::Text } else { OpCode::Binary };
            let whole = Fragments::default().push(opcode, true, bytes(&msg), max);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(msg.len())).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut pieces = Vec::new();
            let mut start = 0;
            for c in cuts {
                pieces.push(&msg[start..c]);
                start = c;
            }
            pieces.push(&msg[start..]);
            let mut f = Fragments::default();
            let mut result = Ok(None);
            for (i, piece) in pieces.iter().enumerate() {
                let op = if i == 0 { opcode } else { OpCode::Continuation };
                result = f.push(op, i + 1 == pieces.len(), bytes(piece), max);
                if result.is_err() {
                    break;
                }
            }
            match (&whole, &result) {
                (Ok(w), Ok(r)) => prop_assert_eq!(w, r),
                // Too big: refused as soon as the pieces pass the limit.
                (Err((a, _)), Err((b, _))) => prop_assert_eq!(a, b),
                _ => prop_assert!(false, "whole {:?} vs pieces {:?}", whole, result),
            }
        }

        /// Any close payload gets a code a server may send, never a reserved one.
        #[test]
        fn close_answers_are_always_sendable(payload in proptest::collection::vec(any::<u8>(), 0..40)) {
            let c = close_code(&payload);
            prop_assert!(matches!(c, 1000..=1003 | 1007..=1011 | 3000..=4999), "{}", c);
        }
    }
}
