//! Channel rules (docs/protocol.md, "Channels and permissions"): who may subscribe to
//! and publish on a channel, and what each namespace keeps. `user:<id>` belongs to its
//! owner; `job_progress:<id>` needs the `channels` claim or a subscription token; other
//! namespaces come from the config file; an unknown namespace is refused unless the
//! token's `channels` claim names it.

use std::collections::HashMap;
use std::time::Duration;

use fanout_protocol::{Channel, ErrorCode};
use fanout_publisher::HistoryPolicy;
use serde::Deserialize;

use crate::auth::Principal;

/// Who may subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscribeRule {
    /// Only the user whose id is the channel's rest (`user:<id>`).
    Owner,
    /// The `channels` claim or a subscription token.
    Claim,
    /// Any authenticated connection.
    Authenticated,
}

/// Who may publish from a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishRule {
    /// Nobody: only workers (publisher crate, CLI, server API, Redis).
    None,
    /// Connections subscribed to the channel.
    Subscribers,
    /// Connections whose `channels` claim names the channel.
    Claim,
    /// Any authenticated connection.
    Authenticated,
}

/// One namespace's rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Namespace {
    pub name: String,
    pub subscribe: SubscribeRule,
    pub publish: PublishRule,
    pub history: HistoryPolicy,
    pub presence: bool,
    pub join_leave: bool,
    /// A slow consumer keeps only the newest queued message per channel of this
    /// namespace instead of being closed with 4009 (progress and state channels).
    pub conflate: bool,
}

impl Namespace {
    /// Defaults for a namespace named in the config file.
    pub fn configured(name: &str) -> Namespace {
        Namespace {
            name: name.to_string(),
            subscribe: SubscribeRule::Claim,
            publish: PublishRule::None,
            history: HistoryPolicy::default(),
            presence: false,
            join_leave: false,
            conflate: false,
        }
    }
}

/// All namespaces.
#[derive(Debug, Clone)]
pub struct Namespaces {
    by_name: HashMap<String, Namespace>,
    unknown: Namespace,
}

/// Why an action on a channel is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    fn forbidden(message: impl Into<String>) -> Refusal {
        Refusal {
            code: ErrorCode::Forbidden,
            message: message.into(),
        }
    }
}

/// What the rules need to know about a subscribe request.
pub enum Grant {
    None,
    /// A subscription token for this channel and user was verified.
    SubscriptionToken,
}

impl Namespaces {
    pub fn builtin() -> Namespaces {
        let user = Namespace {
            name: "user".into(),
            subscribe: SubscribeRule::Owner,
            publish: PublishRule::None,
            history: HistoryPolicy::default(),
            presence: false,
            join_leave: false,
            conflate: false,
        };
        let job = Namespace {
            name: "job_progress".into(),
            subscribe: SubscribeRule::Claim,
            publish: PublishRule::None,
            history: HistoryPolicy {
                size: 100,
                ttl: Duration::from_secs(24 * 3600),
                finished_ttl: Some(Duration::from_secs(3600)),
            },
            presence: false,
            join_leave: false,
            conflate: false,
        };
        let mut unknown = Namespace::configured("");
        unknown.subscribe = SubscribeRule::Claim;
        Namespaces {
            by_name: HashMap::from([(user.name.clone(), user), (job.name.clone(), job)]),
            unknown,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Namespace> {
        self.by_name.get(name)
    }

    pub(crate) fn insert(&mut self, ns: Namespace) {
        self.by_name.insert(ns.name.clone(), ns);
    }

    pub fn iter(&self) -> impl Iterator<Item = &Namespace> {
        self.by_name.values()
    }

    /// The rules for a channel's namespace (an unknown namespace gets claim-only rules).
    pub fn for_channel(&self, channel: &Channel<'_>) -> &Namespace {
        self.by_name
            .get(channel.namespace())
            .unwrap_or(&self.unknown)
    }

    /// Parses `name`, answering `bad_request` for an invalid one.
    pub fn parse<'a>(&self, name: &'a str) -> Result<Channel<'a>, Refusal> {
        Channel::parse(name).map_err(|e| Refusal {
            code: ErrorCode::BadRequest,
            message: e.to_string(),
        })
    }

    /// May `principal` subscribe to `channel`?
    pub fn check_subscribe(
        &self,
        principal: &Principal,
        channel: &Channel<'_>,
        grant: Grant,
    ) -> Result<(), Refusal> {
        let ns = self.for_channel(channel);
        let known = self.by_name.contains_key(channel.namespace());
        let granted =
            principal.has_claim(channel.as_str()) || matches!(grant, Grant::SubscriptionToken);
        let ok = match ns.subscribe {
            SubscribeRule::Owner => channel.rest() == &*principal.user,
            SubscribeRule::Authenticated => true,
            SubscribeRule::Claim => granted,
        };
        if ok {
            return Ok(());
        }
        Err(Refusal::forbidden(match (ns.subscribe, known) {
            (SubscribeRule::Owner, _) => format!(
                "{} belongs to another user",
                channel.as_str()
            ),
            (_, true) => format!(
                "{} needs the channel in the token's `channels` claim or a subscription token",
                channel.as_str()
            ),
            (_, false) => format!(
                "namespace `{}` is not configured and the token's `channels` claim does not name {}",
                channel.namespace(),
                channel.as_str()
            ),
        }))
    }

    /// May `principal` publish on `channel` from a client connection?
    pub fn check_publish(
        &self,
        principal: &Principal,
        channel: &Channel<'_>,
        subscribed: bool,
    ) -> Result<(), Refusal> {
        let ns = self.for_channel(channel);
        let ok = match ns.publish {
            PublishRule::None => false,
            PublishRule::Subscribers => subscribed,
            PublishRule::Claim => principal.has_claim(channel.as_str()),
            PublishRule::Authenticated => true,
        };
        if ok {
            Ok(())
        } else {
            Err(Refusal::forbidden(format!(
                "clients may not publish on {}",
                channel.as_str()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(user: &str, channels: &[&str]) -> Principal {
        Principal {
            user: user.into(),
            exp: u64::MAX,
            channels: channels.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn user_channel_only_for_its_owner() {
        let ns = Namespaces::builtin();
        let c = Channel::parse("user:42").unwrap();
        assert!(ns
            .check_subscribe(&principal("42", &[]), &c, Grant::None)
            .is_ok());
        let e = ns
            .check_subscribe(&principal("43", &["user:*"]), &c, Grant::None)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
    }

    #[test]
    fn job_progress_needs_claim_or_token() {
        let ns = Namespaces::builtin();
        let c = Channel::parse("job_progress:7").unwrap();
        assert_eq!(
            ns.check_subscribe(&principal("1", &[]), &c, Grant::None)
                .unwrap_err()
                .code,
            ErrorCode::Forbidden
        );
        assert!(ns
            .check_subscribe(&principal("1", &["job_progress:*"]), &c, Grant::None)
            .is_ok());
        assert!(ns
            .check_subscribe(&principal("1", &[]), &c, Grant::SubscriptionToken)
            .is_ok());
    }

    #[test]
    fn unknown_namespace_needs_claim() {
        let ns = Namespaces::builtin();
        let c = Channel::parse("chat:1").unwrap();
        assert!(ns
            .check_subscribe(&principal("1", &[]), &c, Grant::None)
            .is_err());
        assert!(ns
            .check_subscribe(&principal("1", &["chat:1"]), &c, Grant::None)
            .is_ok());
    }

    #[test]
    fn clients_may_not_publish_on_builtins() {
        let ns = Namespaces::builtin();
        let c = Channel::parse("user:1").unwrap();
        assert_eq!(
            ns.check_publish(&principal("1", &[]), &c, true)
                .unwrap_err()
                .code,
            ErrorCode::Forbidden
        );
    }
}
