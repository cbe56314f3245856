//! What each user may do: send on which channels, receive on which (`[permissions]` of the
//! broker config, reloaded with the users). Channel patterns are exact names, `prefix*`, or
//! `*`. A user without rules gets `permissions.default`: `"all"` (every channel both ways, as
//! before permissions existed) or `"none"`.
//!
//! The same rules govern the HTTP SMS API: sending SMS is sending on the jobs channel; reading
//! message states and their webhooks is receiving on the status channel; the inbox and
//! `sms:received` are receiving on the inbox channel.

use std::collections::BTreeMap;

use serde::Deserialize;

/// What a user without rules may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAccess {
    /// Everything (the default: existing installs keep working).
    #[default]
    All,
    /// Nothing.
    None,
}

/// One user's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserRules {
    /// Channels it may send on.
    pub send: Vec<String>,
    /// Channels it may receive on.
    pub receive: Vec<String>,
}

/// `[permissions]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PermissionsConfig {
    /// For users without rules.
    pub default: DefaultAccess,
    /// Rules by user name.
    pub users: BTreeMap<String, UserRules>,
}

/// An action on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `send-message` (or, over HTTP, what amounts to it).
    Send,
    /// `receive-message` (or reading what arrives there).
    Receive,
}

impl Action {
    /// The action in words, for errors.
    pub fn words(self) -> &'static str {
        match self {
            Action::Send => "send on",
            Action::Receive => "receive on",
        }
    }
}

/// Why rules are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permissions.users.{user}: {what}")]
pub struct RuleError {
    /// The user.
    pub user: String,
    /// What is wrong.
    pub what: String,
}

fn matches(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => pattern == channel,
    }
}

impl PermissionsConfig {
    /// Checks the patterns: not empty, `*` only at the end.
    pub fn validate(&self) -> Result<(), RuleError> {
        for (user, r) in &self.users {
            for p in r.send.iter().chain(&r.receive) {
                let body = p.strip_suffix('*').unwrap_or(p);
                if p.is_empty() || body.contains('*') || p.len() > 100 {
                    return Err(RuleError {
                        user: user.clone(),
                        what: format!(
                            "channel pattern {p:?}: write a channel name, a prefix ending in *, \
                             or * (at most 100 bytes)"
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether no user has rules (everyone gets the default).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `user` may do `action` on `channel`.
    pub fn allows(&self, user: &str, action: Action, channel: &str) -> bool {
        match self.users.get(user) {
            None => self.default == DefaultAccess::All,
            Some(r) => {
                let list = match action {
                    Action::Send => &r.send,
                    Action::Receive => &r.receive,
                };
                list.iter().any(|p| matches(p, channel))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> PermissionsConfig {
        wsmb_common::from_toml(
            r#"
            default = "none"
            [users.app]
            send = ["sms"]
            receive = ["sms-status", "sms-inbox"]
            [users.agent]
            receive = ["sms"]
            send = ["sms-*"]
            [users.admin]
            send = ["*"]
            receive = ["*"]
            "#,
            std::path::Path::new("p.toml"),
        )
        .expect("toml")
    }

    #[test]
    fn exact_names_prefixes_and_the_default() {
        let p = rules();
        p.validate().expect("valid");
        assert!(p.allows("app", Action::Send, "sms"));
        assert!(!p.allows("app", Action::Send, "sms-status"));
        assert!(!p.allows("app", Action::Receive, "sms"));
        assert!(p.allows("app", Action::Receive, "sms-inbox"));
        assert!(p.allows("agent", Action::Send, "sms-status"));
        assert!(!p.allows("agent", Action::Send, "sms"));
        assert!(p.allows("admin", Action::Receive, "anything"));
        assert!(
            !p.allows("stranger", Action::Receive, "sms"),
            "default none"
        );
        let open = PermissionsConfig::default();
        assert!(open.is_empty());
        assert!(open.allows("anyone", Action::Send, "sms"), "default all");
    }

    #[test]
    fn bad_patterns_are_refused_with_the_user() {
        let mut p = rules();
        p.users.get_mut("app").expect("app").send = vec!["s*ms".into()];
        let e = p.validate().expect_err("bad");
        assert!(e.to_string().contains("permissions.users.app"), "{e}");
        let e = wsmb_common::from_toml::<PermissionsConfig>(
            "default = \"some\"",
            std::path::Path::new("p.toml"),
        )
        .expect_err("bad");
        assert!(e.to_string().contains("some"), "{e}");
    }
}
