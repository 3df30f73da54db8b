//! Switchboard's memory and audit trail: the event store.
//!
//! One port, [`EventLog`], with two adapters that behave identically (one conformance suite
//! runs against both):
//! - [`jetstream::JetStreamLog`] for the distributed deployment;
//! - [`jsonl::JsonlLog`], an append-only JSON-lines file per log, for the embedded default.
//!
//! [`projection`] folds a log into in-memory state with checkpoints.
mod error;
pub mod jetstream;
pub mod jsonl;
mod port;
mod private_fs;
pub mod projection;
mod subject;

pub use error::EventLogError;
pub use port::{
    AggregateHistory, AppendOutcome, DEDUPE_WINDOW, EventLog, EventStream, ExpectedVersion,
    RecordedEvent, UnknownBody, event_type_of,
};
pub use subject::{AggregateKind, LogKind, Subject, SubjectFilter};
