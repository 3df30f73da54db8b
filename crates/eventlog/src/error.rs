use crate::ExpectedVersion;

/// Everything the event store can refuse or fail with. Messages never contain event payloads
/// (payloads are not secret, but they can be large and are not the caller's business here).
#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    /// Optimistic concurrency: another writer appended to the aggregate since it was loaded.
    /// Nothing was written; reload the aggregate, decide again and retry.
    #[error(
        "conflict on {subject}: expected {expected}, but the aggregate is at {}; reload and retry",
        actual.map_or_else(|| "an unknown version".to_owned(), |v| format!("version {v}"))
    )]
    Conflict {
        subject: String,
        expected: ExpectedVersion,
        actual: Option<u64>,
    },

    #[error("invalid subject {subject:?}: {reason}")]
    InvalidSubject { subject: String, reason: String },

    #[error("invalid event: {reason}")]
    InvalidEvent { reason: String },

    /// A stored record could not be decoded. The record is kept; readers report it.
    #[error("corrupt record at {location}: {reason}")]
    Corrupt { location: String, reason: String },

    /// The configured nats-server is older than Switchboard supports.
    #[error(
        "nats-server {found} is too old: Switchboard needs nats-server 2.11 or newer \
         (install it with scripts/install-nats-server.sh or from nats.io)"
    )]
    ServerTooOld { found: String },

    /// The store could not be reached or did not answer; the append may be retried with the
    /// same event ids (it is stored at most once).
    #[error("event store unavailable: {reason}")]
    Unavailable { reason: String },

    /// The store refused the request for a reason retrying cannot fix (a replica count the
    /// cluster cannot place, a stream configuration it refuses, streams that are missing or
    /// not append-only, a feature the server lacks). Fix the configuration or the server;
    /// do not retry.
    #[error("event store refused the request: {reason}")]
    Refused { reason: String },

    #[error("event log file error: {context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The store was opened read-only (`JsonlLog::open_read_only`, for auditing): it takes no
    /// appends. Append through the Switchboard process that has the store open.
    #[error(
        "the event log in {dir} was opened read-only (for auditing); appends go through the \
         running Switchboard"
    )]
    ReadOnly { dir: String },

    /// The store is shut down (or its writer task ended).
    #[error("event store is closed")]
    Closed,
}

impl EventLogError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, EventLogError::Conflict { .. })
    }

    /// Whether an append that failed with this error certainly stored nothing. An unreachable
    /// store, a file error or a store closing mid-append leave it open: the events may be
    /// stored (or be stored yet, on JetStream), so what they reference must stay.
    pub fn nothing_stored(&self) -> bool {
        matches!(
            self,
            EventLogError::Conflict { .. }
                | EventLogError::InvalidSubject { .. }
                | EventLogError::InvalidEvent { .. }
                | EventLogError::ServerTooOld { .. }
                | EventLogError::Refused { .. }
                | EventLogError::ReadOnly { .. }
        )
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EventLogError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn refused(reason: impl std::fmt::Display) -> Self {
        EventLogError::Refused {
            reason: reason.to_string(),
        }
    }

    pub(crate) fn unavailable(reason: impl std::fmt::Display) -> Self {
        EventLogError::Unavailable {
            reason: reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_failure_before_the_append_says_nothing_was_stored() {
        let conflict = EventLogError::Conflict {
            subject: "server.x".into(),
            expected: ExpectedVersion::NoEvents,
            actual: Some(1),
        };
        assert!(conflict.nothing_stored());
        assert!(EventLogError::refused("no replicas").nothing_stored());
        // The store may have taken the append before it failed to answer.
        assert!(!EventLogError::unavailable("timed out").nothing_stored());
        assert!(!EventLogError::io("fsync", std::io::Error::other("disk")).nothing_stored());
        assert!(!EventLogError::Closed.nothing_stored());
    }
}
