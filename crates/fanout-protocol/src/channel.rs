//! Channel names: `namespace:rest`. A name is also the Redis channel, and the part of the
//! history keys inside the `{…}` hash tag, so the character set excludes braces,
//! whitespace and glob characters.

use thiserror::Error;

/// The longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    #[error("channel name must be `namespace:rest`")]
    NoNamespace,
    #[error("channel name has a character outside [A-Za-z0-9_.:@=+/|-]: {0:?}")]
    BadChar(char),
}

/// A validated channel name, split at the first `:`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Channel<'a> {
    name: &'a str,
    colon: usize,
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@' | '=' | '+' | '/' | '|')
}

impl<'a> Channel<'a> {
    pub fn parse(name: &'a str) -> Result<Channel<'a>, ChannelError> {
        if name.is_empty() {
            return Err(ChannelError::Empty);
        }
        if name.len() > MAX_CHANNEL_LEN {
            return Err(ChannelError::TooLong);
        }
        if let Some(c) = name.chars().find(|c| !allowed(*c)) {
            return Err(ChannelError::BadChar(c));
        }
        let colon = name.find(':').ok_or(ChannelError::NoNamespace)?;
        if colon == 0 || colon + 1 == name.len() {
            return Err(ChannelError::NoNamespace);
        }
        Ok(Channel { name, colon })
    }

    pub fn as_str(&self) -> &'a str {
        self.name
    }

    pub fn namespace(&self) -> &'a str {
        &self.name[..self.colon]
    }

    pub fn rest(&self) -> &'a str {
        &self.name[self.colon + 1..]
    }
}

/// Whether `channel` matches a `channels` claim entry: an exact name, or a prefix ending
/// in `*` (`job_progress:*`, `chat:room-1*`). A lone `*` matches nothing: a token must
/// at least name the namespace.
pub fn claim_matches(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => !prefix.is_empty() && prefix.contains(':') && channel.starts_with(prefix),
        None => pattern == channel,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_namespace_and_rest() {
        let c = Channel::parse("job_progress:7").unwrap();
        assert_eq!(c.namespace(), "job_progress");
        assert_eq!(c.rest(), "7");
        let c = Channel::parse("chat:room:1").unwrap();
        assert_eq!(c.namespace(), "chat");
        assert_eq!(c.rest(), "room:1");
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(Channel::parse(""), Err(ChannelError::Empty));
        assert_eq!(Channel::parse("nocolon"), Err(ChannelError::NoNamespace));
        assert_eq!(Channel::parse(":x"), Err(ChannelError::NoNamespace));
        assert_eq!(Channel::parse("user:"), Err(ChannelError::NoNamespace));
        assert_eq!(Channel::parse("user:{42}"), Err(ChannelError::BadChar('{')));
        assert_eq!(Channel::parse("user:4 2"), Err(ChannelError::BadChar(' ')));
        assert_eq!(Channel::parse("user:*"), Err(ChannelError::BadChar('*')));
        let long = format!("user:{}", "a".repeat(MAX_CHANNEL_LEN));
        assert_eq!(Channel::parse(&long), Err(ChannelError::TooLong));
    }

    #[test]
    fn claims_match_exact_and_prefix() {
        assert!(claim_matches("job_progress:7", "job_progress:7"));
        assert!(!claim_matches("job_progress:7", "job_progress:70"));
        assert!(claim_matches("job_progress:*", "job_progress:70"));
        assert!(claim_matches("job_progress:7*", "job_progress:70"));
        assert!(!claim_matches("*", "job_progress:7"));
        assert!(!claim_matches("job*", "job_progress:7"));
    }
}
