//! Error codes (carried in `error` frames) and WebSocket close codes, each a named value
//! with the string or number the contract fixes. Nothing here decides *when* a code is
//! used; callers map their typed errors onto these.

use serde::{Deserialize, Serialize};

/// The `code` of an `{"type":"error"}` frame (docs/protocol.md, "Error codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    LimitExceeded,
    RateLimited,
    TooLarge,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The wire string, also used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status the server API answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::LimitExceeded => 429,
            ErrorCode::RateLimited => 429,
            ErrorCode::TooLarge => 413,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

/// WebSocket close codes (docs/protocol.md, "Close codes"). `reconnect()` says whether
/// a well-behaved client should reconnect after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// Drain: reconnect elsewhere.
    GoingAway = 1001,
    ProtocolError = 1002,
    /// A text message that is not UTF-8.
    InvalidData = 1007,
    /// Origin not allowed.
    Policy = 1008,
    TooBig = 1009,
    Internal = 1011,
    /// Node full: try again later.
    TryLater = 1013,
    Unauthorized = 4001,
    Forbidden = 4003,
    TokenExpired = 4004,
    RateLimited = 4008,
    SlowConsumer = 4009,
    /// Disconnected by an administrator: do not reconnect.
    DisconnectedByAdmin = 4010,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        self as u16
    }

    /// Short reason sent in the close frame and used as a metric label.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::GoingAway => "going away",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::InvalidData => "invalid UTF-8",
            CloseCode::Policy => "policy violation",
            CloseCode::TooBig => "message too big",
            CloseCode::Internal => "internal error",
            CloseCode::TryLater => "node full, try later",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::Forbidden => "forbidden",
            CloseCode::TokenExpired => "token expired",
            CloseCode::RateLimited => "rate limited",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::DisconnectedByAdmin => "disconnected by admin",
        }
    }

    /// Whether a client should reconnect after this close. It should not after a
    /// protocol error, invalid data, a refused Origin, a message too big, a refused
    /// token (unless a new token fixes it), a forbidden channel or an admin
    /// disconnect: trying again would fail the same way.
    pub fn reconnect(self) -> bool {
        !matches!(
            self,
            CloseCode::ProtocolError
                | CloseCode::InvalidData
                | CloseCode::Policy
                | CloseCode::TooBig
                | CloseCode::Unauthorized
                | CloseCode::Forbidden
                | CloseCode::DisconnectedByAdmin
        )
    }

    pub fn from_u16(code: u16) -> Option<CloseCode> {
        Some(match code {
            1001 => CloseCode::GoingAway,
            1002 => CloseCode::ProtocolError,
            1007 => CloseCode::InvalidData,
            1008 => CloseCode::Policy,
            1009 => CloseCode::TooBig,
            1011 => CloseCode::Internal,
            1013 => CloseCode::TryLater,
            4001 => CloseCode::Unauthorized,
            4003 => CloseCode::Forbidden,
            4004 => CloseCode::TokenExpired,
            4008 => CloseCode::RateLimited,
            4009 => CloseCode::SlowConsumer,
            4010 => CloseCode::DisconnectedByAdmin,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_serialize_to_contract_strings() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
            ErrorCode::LimitExceeded,
            ErrorCode::RateLimited,
            ErrorCode::TooLarge,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn close_codes_round_trip() {
        for n in [
            1001, 1002, 1008, 1009, 1011, 1013, 4001, 4003, 4004, 4008, 4009, 4010,
        ] {
            assert_eq!(CloseCode::from_u16(n).unwrap().code(), n);
        }
        assert!(CloseCode::from_u16(4999).is_none());
        assert!(!CloseCode::DisconnectedByAdmin.reconnect());
        assert!(CloseCode::GoingAway.reconnect());
        // What the contract says a client does: stop on these …
        for c in [1002, 1007, 1008, 1009, 4001, 4003, 4010] {
            assert!(!CloseCode::from_u16(c).unwrap().reconnect(), "{c}");
        }
        // … and reconnect (with backoff, or a new token) on these.
        for c in [1001, 1011, 1013, 4004, 4008, 4009] {
            assert!(CloseCode::from_u16(c).unwrap().reconnect(), "{c}");
        }
    }
}
