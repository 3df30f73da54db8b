//! The event store port. Both adapters implement [`EventLog`]; services hold an
//! `Arc<dyn EventLog>` and never know which one they run on.
use std::{borrow::Cow, fmt, pin::Pin};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;
use proto::v1::Envelope;

use crate::{EventLogError, LogKind, Subject, SubjectFilter};

/// What the writer believes the aggregate's version is. A version is the log sequence of the
/// aggregate's last event (on JetStream: its stream sequence), so it is also the value of
/// `Nats-Expected-Last-Subject-Sequence`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check (use only for events whose order does not matter to any decision).
    Any,
    /// The aggregate must have no events yet.
    NoEvents,
    /// The aggregate's last event must be at this sequence.
    At(u64),
}

impl ExpectedVersion {
    /// The expectation that matches an aggregate loaded at `version` (0 = no events).
    pub fn from_loaded(version: u64) -> Self {
        if version == 0 {
            ExpectedVersion::NoEvents
        } else {
            ExpectedVersion::At(version)
        }
    }

    /// Whether an aggregate whose last event is at `actual` (0 = none) satisfies this.
    pub fn admits(self, actual: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoEvents => actual == 0,
            ExpectedVersion::At(v) => v == actual,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoEvents => f.write_str("no events"),
            ExpectedVersion::At(v) => write!(f, "version {v}"),
        }
    }
}

/// An event as stored: where it is in its log, which aggregate it belongs to, its envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub log: LogKind,
    /// Position in its log, starting at 1 (on JetStream: the stream sequence).
    pub sequence: u64,
    pub subject: Subject,
    /// The event's type name as the writer recorded it, e.g. `ServerAdded`. Present even when
    /// this version does not know the type (then `envelope.event` is `None`).
    pub event_type: Cow<'static, str>,
    pub envelope: Envelope,
    /// The stored bytes, kept only for events this version cannot fully read (unknown type),
    /// so that the audit can show them instead of dropping them.
    pub unknown_body: Option<UnknownBody>,
}

/// An event body this version does not know, as it was stored.
#[derive(Debug, Clone, PartialEq)]
pub enum UnknownBody {
    /// proto3 JSON of the whole envelope (JSONL adapter).
    Json(Box<str>),
    /// Protobuf encoding of the whole envelope (JetStream adapter).
    Protobuf(Bytes),
}

/// The type name for an envelope: the schema name for known events.
pub fn event_type_of(envelope: &Envelope) -> Option<&'static str> {
    envelope.event.as_ref().map(|e| e.type_name())
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Sequence of the first event appended (or, for a duplicate, originally appended).
    pub first_sequence: u64,
    /// Sequence of the last one: the aggregate's new version.
    pub last_sequence: u64,
    /// Every event id had been stored before (a retried append); nothing new was written.
    pub duplicate: bool,
}

/// An aggregate's events, and its version (the sequence of its last event, 0 if none).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AggregateHistory {
    pub version: u64,
    pub events: Vec<RecordedEvent>,
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<RecordedEvent, EventLogError>> + Send>>;

/// The event store.
///
/// Guarantees every adapter keeps (and the shared conformance suite checks):
/// - `append` is atomic: all of `events` are stored, in order and contiguous within the
///   aggregate, or none is; a conflicting `expected` version writes nothing.
/// - An event id is stored at most once: re-appending an event whose id is already stored
///   (a retry after a lost acknowledgement) returns the original outcome with
///   `duplicate: true`. Adapters remember ids for at least [`DEDUPE_WINDOW`].
/// - An append returns only after the events are durable.
/// - Reads return events in log order with their sequences; a subscriber sees every event
///   after its start position exactly once, in order.
#[async_trait]
pub trait EventLog: Send + Sync + fmt::Debug + 'static {
    /// Appends `events` to the aggregate `subject` if its version satisfies `expected`.
    async fn append(
        &self,
        subject: &Subject,
        expected: ExpectedVersion,
        events: &[Envelope],
    ) -> Result<AppendOutcome, EventLogError>;

    /// All events of one aggregate, in order, and its version.
    async fn read_aggregate(&self, subject: &Subject) -> Result<AggregateHistory, EventLogError>;

    /// The events of `log` from sequence `from` (inclusive; 0 and 1 both mean the start) up to
    /// the end of the log as it was when the call was made; optionally only those whose subject
    /// matches `filter`. The stream ends there.
    async fn read_from(
        &self,
        log: LogKind,
        from: u64,
        filter: Option<&SubjectFilter>,
    ) -> Result<EventStream, EventLogError>;

    /// The event at `sequence` in `log`, if there is one: a point read (where a claimed event
    /// id was stored, say).
    async fn read_event(
        &self,
        log: LogKind,
        sequence: u64,
    ) -> Result<Option<RecordedEvent>, EventLogError>;

    /// Like [`EventLog::read_from`], but the stream never ends: after the stored events it
    /// yields each new event as it is appended.
    async fn subscribe(
        &self,
        log: LogKind,
        from: u64,
        filter: Option<&SubjectFilter>,
    ) -> Result<EventStream, EventLogError>;

    /// The sequence of the last event in `log` (0 if empty).
    async fn last_sequence(&self, log: LogKind) -> Result<u64, EventLogError>;

    /// Whether a filtered read passes over non-matching events where they are stored
    /// (JetStream filters on the server) rather than reading each one in this process (the
    /// JSONL log scans every record). A reader that bounds its work per request must count
    /// what it passes over, so it filters for itself where this is false.
    fn filters_where_stored(&self) -> bool {
        false
    }

    /// The largest event (its encoded envelope and what the store adds around it) the store
    /// takes, if it has a limit: on JetStream an event is one message, at most the server's
    /// `max_payload` (as it was when the log connected). A writer of events that hold large
    /// payloads (captured tool arguments and results) sizes them to fit.
    fn max_event_bytes(&self) -> Option<usize> {
        None
    }
}

/// How long an event id is remembered for dedupe (JetStream's default duplicate window).
pub const DEDUPE_WINDOW: std::time::Duration = std::time::Duration::from_secs(120);
