//! Aggregate subjects and the logs they live in.
use std::fmt;

use crate::EventLogError;

/// The two logs of Switchboard. Configuration-side events (servers, connections, tool policy)
/// and the high-volume invocation events are kept apart so that rebuilding configuration state
/// never wades through invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LogKind {
    Config,
    Invocations,
}

impl LogKind {
    pub const ALL: [LogKind; 2] = [LogKind::Config, LogKind::Invocations];

    /// Short lowercase name, used for file names and checkpoint keys.
    pub fn as_str(self) -> &'static str {
        match self {
            LogKind::Config => "config",
            LogKind::Invocations => "invocations",
        }
    }
}

impl fmt::Display for LogKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `token` is one non-empty subject token of `A-Z a-z 0-9 _ -`: valid in a NATS
/// subject without escaping, never a wildcard, and safe in a file or bucket key name.
pub(crate) fn is_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The kinds of aggregate, each the first token of its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AggregateKind {
    /// `server.<server_id>`
    Server,
    /// `connection.<server_id>.<user_key>`
    Connection,
    /// `policy.<user_key>.<server_id>`
    Policy,
    /// `invocation.<user_key>`: a bounded subject space, one per user, not one per invocation.
    Invocation,
}

impl AggregateKind {
    pub fn token(self) -> &'static str {
        match self {
            AggregateKind::Server => "server",
            AggregateKind::Connection => "connection",
            AggregateKind::Policy => "policy",
            AggregateKind::Invocation => "invocation",
        }
    }

    pub fn log(self) -> LogKind {
        match self {
            AggregateKind::Invocation => LogKind::Invocations,
            _ => LogKind::Config,
        }
    }

    fn from_token(token: &str) -> Option<Self> {
        Some(match token {
            "server" => AggregateKind::Server,
            "connection" => AggregateKind::Connection,
            "policy" => AggregateKind::Policy,
            "invocation" => AggregateKind::Invocation,
            _ => return None,
        })
    }
}

/// An aggregate's subject, relative to the deployment's prefix: `server.0193…`,
/// `connection.<server_id>.<user_key>`. The JetStream adapter publishes it under
/// `<prefix>.evt.<subject>`; the JSONL adapter stores it as is.
///
/// Tokens are `[A-Za-z0-9_-]+` (so every subject is a valid, wildcard-free NATS subject and
/// a safe file name part); user ids are encoded with `domain::UserKey` before they get here.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject {
    value: Box<str>,
    kind: AggregateKind,
}

/// Room for the longest `UserKey` (a 256-character user id of 4-byte characters, each byte
/// escaped as `_XX`: 3,072 bytes) with the aggregate kind and a server id, still inside
/// nats-server's 4 KiB protocol control line with the `<prefix>.evt.` prefix and a reply inbox.
const MAX_SUBJECT_LEN: usize = 3200;

impl Subject {
    pub fn parse(value: &str) -> Result<Self, EventLogError> {
        let invalid = |reason: &str| EventLogError::InvalidSubject {
            subject: value.chars().take(MAX_SUBJECT_LEN).collect(),
            reason: reason.to_owned(),
        };
        if value.len() > MAX_SUBJECT_LEN {
            return Err(invalid("longer than 3200 bytes"));
        }
        let mut tokens = value.split('.');
        let first = tokens.next().unwrap_or_default();
        let kind = AggregateKind::from_token(first).ok_or_else(|| {
            invalid("must start with server., connection., policy. or invocation.")
        })?;
        let mut count = 0;
        for token in tokens {
            count += 1;
            if !is_token(token) {
                return Err(invalid(
                    "tokens must be non-empty and use only A-Z a-z 0-9 _ -",
                ));
            }
        }
        if count == 0 {
            return Err(invalid("needs at least one token after the aggregate kind"));
        }
        Ok(Subject {
            value: value.into(),
            kind,
        })
    }

    /// Builds `<kind>.<id parts…>`; each part must already be subject-safe.
    pub fn for_aggregate(kind: AggregateKind, parts: &[&str]) -> Result<Self, EventLogError> {
        let mut value = String::from(kind.token());
        for part in parts {
            value.push('.');
            value.push_str(part);
        }
        Subject::parse(&value)
    }

    pub fn as_str(&self) -> &str {
        &self.value
    }

    pub fn kind(&self) -> AggregateKind {
        self.kind
    }

    pub fn log(&self) -> LogKind {
        self.kind.log()
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.value)
    }
}

/// A NATS-style subject filter over relative subjects: `*` matches one token, a final `>`
/// matches one or more. `server.>` selects every server event; `connection.*.u_alice` one
/// user's connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectFilter {
    value: Box<str>,
}

impl SubjectFilter {
    pub fn parse(value: &str) -> Result<Self, EventLogError> {
        let invalid = |reason: &str| EventLogError::InvalidSubject {
            subject: value.chars().take(MAX_SUBJECT_LEN).collect(),
            reason: reason.to_owned(),
        };
        if value.is_empty() || value.len() > MAX_SUBJECT_LEN {
            return Err(invalid("a filter is 1 to 3200 bytes"));
        }
        let tokens: Vec<&str> = value.split('.').collect();
        for (i, token) in tokens.iter().enumerate() {
            let ok = match *token {
                "*" => true,
                ">" => i == tokens.len() - 1,
                t => is_token(t),
            };
            if !ok {
                return Err(invalid(
                    "tokens are A-Z a-z 0-9 _ -, or the wildcards * and a final >",
                ));
            }
        }
        Ok(SubjectFilter {
            value: value.into(),
        })
    }

    /// Every subject of one aggregate kind, e.g. `server.>`.
    pub fn kind(kind: AggregateKind) -> Self {
        SubjectFilter {
            value: format!("{}.>", kind.token()).into(),
        }
    }

    /// Exactly one subject.
    pub fn exact(subject: &Subject) -> Self {
        SubjectFilter {
            value: subject.as_str().into(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// Whether `subject` is selected by this filter (NATS wildcard rules).
    pub fn matches(&self, subject: &str) -> bool {
        let mut pattern = self.value.split('.');
        let mut tokens = subject.split('.');
        loop {
            match (pattern.next(), tokens.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(p), Some(t)) if p == t => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// The logs this filter can select from (a filter on `invocation.…` only reads that log).
    pub fn logs(&self) -> &'static [LogKind] {
        match self.value.split('.').next() {
            Some("invocation") => &[LogKind::Invocations],
            Some("server" | "connection" | "policy") => &[LogKind::Config],
            _ => &LogKind::ALL,
        }
    }
}

impl fmt::Display for SubjectFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_their_log() {
        let s = Subject::parse("invocation.u_alice").expect("valid");
        assert_eq!(s.log(), LogKind::Invocations);
        let s = Subject::parse("connection.srv1.u_alice").expect("valid");
        assert_eq!(s.log(), LogKind::Config);
        assert_eq!(s.kind(), AggregateKind::Connection);
    }

    #[test]
    fn the_longest_user_key_fits_in_every_subject() {
        // 256 four-byte characters, every byte escaped as `_XX` (domain::UserKey).
        let user_key = "_F0_9F_98_80".repeat(256);
        let server_id = "0193a5b2-7c1e-7000-8000-000000000001";
        for subject in [
            format!("connection.{server_id}.{user_key}"),
            format!("policy.{user_key}.{server_id}"),
            format!("invocation.{user_key}"),
        ] {
            Subject::parse(&subject).expect("the longest user key fits");
        }
    }

    #[test]
    fn malformed_subjects_are_refused_with_a_reason() {
        for bad in [
            "",
            "server",
            "server.",
            "server..x",
            "other.x",
            "server.a b",
            "server.*",
            "server.>",
        ] {
            let err = Subject::parse(bad).expect_err(bad);
            assert!(
                matches!(err, EventLogError::InvalidSubject { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn filters_follow_nats_wildcards() {
        let f = SubjectFilter::parse("connection.*.u_alice").expect("valid");
        assert!(f.matches("connection.s1.u_alice"));
        assert!(!f.matches("connection.s1.u_bob"));
        assert!(!f.matches("connection.s1.u_alice.x"));
        let f = SubjectFilter::parse("server.>").expect("valid");
        assert!(f.matches("server.s1"));
        assert!(!f.matches("server"));
        assert!(SubjectFilter::parse("server.>.x").is_err());
        assert_eq!(SubjectFilter::parse(">").expect("valid").logs().len(), 2);
    }
}
