//! JetStream adapter (distributed deployment).
//!
//! Layout on the server, for a deployment prefix `sb`:
//! - stream `SB_CONFIG` holds `sb.evt.server.>`, `sb.evt.connection.>` and `sb.evt.policy.>`
//!   and keeps them forever; stream `SB_INVOCATIONS` holds `sb.evt.invocation.>` for the
//!   configured retention. A log's sequence is its stream sequence; an aggregate's version is
//!   the stream sequence of its last event.
//! - Both streams are `deny_delete` and `deny_purge`, so no client can remove events. Deleting a
//!   whole stream stays possible for an administrator with access to the JetStream API (an
//!   account-level operation Switchboard never performs); deny `$JS.API.STREAM.DELETE.*` in the
//!   account's permissions where that matters.
//!
//! Writes: one event is one message, published with `Nats-Msg-Id` = event id (server dedupe) and
//! `Nats-Expected-Last-Subject-Sequence` = expected version; several events are one atomic batch
//! (ADR-50, nats-server 2.12+). Unacknowledged publishes are retried with the same ids; a retry
//! whose first attempt was stored returns the original outcome with `duplicate: true` (details
//! in `jetstream/append.rs`).
//!
//! Reads use ordered push consumers (recreated by async-nats after a gap or a reconnect) that end
//! at the log's last sequence as it was when the read started; `read_aggregate` uses a batched
//! direct get on a single replica (see [`AggregateReads`]).
//!
//! [`KvCheckpointStore`] keeps projection checkpoints in a JetStream KV bucket.
mod append;
mod checkpoints;
mod read;

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use proto::v1::Envelope;

use crate::{
    AggregateHistory, AppendOutcome, DEDUPE_WINDOW, EventLog, EventLogError, EventStream,
    ExpectedVersion, LogKind, RecordedEvent, Subject, SubjectFilter,
};

pub use checkpoints::{KvCheckpointStore, MAX_CHECKPOINT_VALUE_SIZE};

/// Header carrying the event's type name (`ServerAdded`), so readers that do not know the type
/// can still name it.
pub const EVENT_TYPE_HEADER: &str = "Sb-Event-Type";

/// Oldest nats-server this adapter accepts.
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 11);

/// How the adapter lays out and talks to JetStream.
#[derive(Debug, Clone)]
pub struct JetStreamConfig {
    /// Subject prefix and stream-name base: subjects `<prefix>.evt.<aggregate subject>`,
    /// streams `<PREFIX>_CONFIG` and `<PREFIX>_INVOCATIONS`, checkpoint bucket
    /// `<PREFIX>_checkpoints`. 1 to 64 of `a-z 0-9 _ -`: lowercase and no dots, so that the
    /// upper-cased stream names are one-to-one with prefixes (with `A-Z` or `.` allowed,
    /// `sb`/`SB` and `a.b`/`a_b` would share, and rewrite, each other's streams).
    pub prefix: String,
    /// Stream replicas: 1 on a single server, 3 in a cluster.
    pub replicas: usize,
    /// How long invocation events are kept (`max_age` of the invocations stream). The
    /// configuration stream keeps everything forever.
    pub invocation_retention: Duration,
    /// The streams' dedupe window: how long an event id is remembered. The port promises
    /// at least [`DEDUPE_WINDOW`], and an invocation's claim rests on it; only benchmarks
    /// that measure what stays after the window set it shorter.
    pub duplicate_window: Duration,
    /// How long one publish attempt waits for the server's acknowledgement before it is
    /// retried (with the same event ids, so a retry never writes twice). Also bounds every
    /// JetStream API request and each direct-get answer.
    pub ack_timeout: Duration,
    /// Publish attempts per append before it fails with `Unavailable`.
    pub max_append_attempts: u32,
    /// Pause before the second attempt; doubles per attempt, capped at two seconds.
    pub retry_backoff: Duration,
    /// How `read_aggregate` reads an aggregate's events.
    pub aggregate_reads: AggregateReads,
}

/// How `read_aggregate` reads. Both give the same result on a single server; they differ in
/// cost and in who answers in a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AggregateReads {
    /// Direct get with one replica (one round trip, no server-side state), an ordered consumer
    /// with several.
    #[default]
    Auto,
    /// Batched direct get (`$JS.API.DIRECT.GET`, nats-server 2.11+): one request per 1,000
    /// events. With several replicas any replica may answer, possibly one that lags behind the
    /// leader: the version read can be stale, and the append that follows then fails with
    /// `Conflict` (and is retried by the service), so use it on replicated streams only if
    /// that trade is wanted.
    DirectGet,
    /// An ordered consumer, served by the stream leader: always current, but a consumer is
    /// created (and deleted) per read.
    OrderedConsumer,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            prefix: "sb".to_owned(),
            replicas: 1,
            invocation_retention: Duration::from_secs(400 * 24 * 60 * 60),
            duplicate_window: DEDUPE_WINDOW,
            ack_timeout: Duration::from_secs(5),
            max_append_attempts: 6,
            retry_backoff: Duration::from_millis(50),
            aggregate_reads: AggregateReads::Auto,
        }
    }
}

impl JetStreamConfig {
    /// The defaults with another prefix.
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        JetStreamConfig {
            prefix: prefix.into(),
            ..JetStreamConfig::default()
        }
    }

    /// The stream that holds `log`: `<PREFIX>_CONFIG` or `<PREFIX>_INVOCATIONS`.
    pub fn stream_name(&self, log: LogKind) -> String {
        let base = self.prefix.to_uppercase();
        match log {
            LogKind::Config => format!("{base}_CONFIG"),
            LogKind::Invocations => format!("{base}_INVOCATIONS"),
        }
    }

    /// The KV bucket for projection checkpoints: `<PREFIX>_checkpoints`.
    pub fn checkpoint_bucket(&self) -> String {
        format!("{}_checkpoints", self.prefix.to_uppercase())
    }

    fn validate(&self) -> Result<(), EventLogError> {
        if !is_valid_prefix(&self.prefix) {
            return Err(EventLogError::InvalidSubject {
                subject: self.prefix.chars().take(64).collect(),
                reason: "the JetStream prefix is 1 to 64 characters of a-z 0-9 _ - (lowercase, \
                         no dots: each prefix must name streams of its own)"
                    .to_owned(),
            });
        }
        if self.replicas == 0 || self.replicas > 5 {
            return Err(EventLogError::refused(format!(
                "stream replicas must be 1 to 5, not {}",
                self.replicas
            )));
        }
        Ok(())
    }
}

/// Longest pause between two reconnection attempts with [`reconnect_promptly`].
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_millis(250);

/// Connection options for a client the event log uses: reconnect attempts at most
/// [`MAX_RECONNECT_DELAY`] apart. async-nats' default backs off to 4 seconds between attempts,
/// so after an outage of a few seconds a restarted server could wait that long for the client
/// — and every append with it. An append waiting for its acknowledgement is retried as soon
/// as the client has reconnected.
pub fn reconnect_promptly(options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
    options.reconnect_delay_callback(|attempts| {
        let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
        (Duration::from_millis(10).saturating_mul(attempts)).min(MAX_RECONNECT_DELAY)
    })
}

/// Whether `prefix` is a valid deployment prefix: 1 to 64 of `a-z 0-9 _ -`. The set leaves
/// nothing for the stream-name mapping (upper-casing) to merge.
pub fn is_valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The event store on NATS JetStream. Cheap to clone: clones share one client.
#[derive(Debug, Clone)]
pub struct JetStreamLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    config: JetStreamConfig,
    /// `<prefix>.evt.`
    subject_root: String,
    /// Indexed by [`log_index`].
    stream_names: [String; 2],
    /// Whether the server accepted `allow_atomic_publish` (2.12+); multi-event appends need it.
    atomic_batches: bool,
    /// `read_aggregate` by direct get (else by ordered consumer).
    direct_reads: bool,
}

fn log_index(log: LogKind) -> usize {
    match log {
        LogKind::Config => 0,
        LogKind::Invocations => 1,
    }
}

/// Whether opening the log may create or change its streams.
#[derive(Debug, Clone, Copy)]
enum Streams {
    CreateOrUpdate,
    Existing,
}

impl JetStreamLog {
    /// Checks that the server is recent enough and creates both streams, or brings an existing
    /// pair up to `config` (idempotent: every process of a deployment calls this at start-up).
    pub async fn connect(
        client: async_nats::Client,
        config: JetStreamConfig,
    ) -> Result<JetStreamLog, EventLogError> {
        Self::open(client, config, Streams::CreateOrUpdate).await
    }

    /// Like [`JetStreamLog::connect`], but only uses streams that already exist and changes
    /// nothing: for auditors, who must not create an empty history under a mistyped prefix.
    pub async fn connect_existing(
        client: async_nats::Client,
        config: JetStreamConfig,
    ) -> Result<JetStreamLog, EventLogError> {
        Self::open(client, config, Streams::Existing).await
    }

    async fn open(
        client: async_nats::Client,
        config: JetStreamConfig,
        streams: Streams,
    ) -> Result<JetStreamLog, EventLogError> {
        config.validate()?;
        check_server_version(&client.server_info().version)?;
        // The timeout bounds each publish (sending and awaiting the ack) and each API request.
        let js = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .build(client.clone());
        let mut atomic_batches = true;
        for log in LogKind::ALL {
            let info = match streams {
                Streams::CreateOrUpdate => js
                    .create_or_update_stream(stream_config(&config, log))
                    .await
                    .map_err(|err| {
                        let message = format!(
                            "cannot create or update stream {} (is JetStream enabled on the \
                             server, and was the stream created with compatible settings?): {err}",
                            config.stream_name(log)
                        );
                        // The server's own answer (a bad replica count, a setting it will
                        // not change) stays the same however often it is asked; no answer
                        // may be a restart.
                        match err.kind() {
                            jetstream::context::CreateStreamErrorKind::JetStream(api)
                                if api.code() != 503 =>
                            {
                                EventLogError::refused(message)
                            }
                            _ => EventLogError::unavailable(message),
                        }
                    })?,
                Streams::Existing => {
                    let name = config.stream_name(log);
                    let mut stream = js.get_stream(&name).await.map_err(|err| {
                        let message = format!(
                            "cannot open stream {name}: {err} (no Switchboard history under the \
                             prefix {:?} on this server? check --nats-prefix)",
                            config.prefix
                        );
                        match err.kind() {
                            jetstream::context::GetStreamErrorKind::JetStream(api)
                                if api.code() != 503 =>
                            {
                                EventLogError::refused(message)
                            }
                            _ => EventLogError::unavailable(message),
                        }
                    })?;
                    stream
                        .info()
                        .await
                        .map_err(|err| {
                            EventLogError::unavailable(format!("cannot read stream {name}: {err}"))
                        })?
                        .clone()
                }
            };
            if !info.config.deny_delete || !info.config.deny_purge {
                return Err(EventLogError::refused(format!(
                    "stream {} does not deny delete and purge; the audit history must be \
                     append-only",
                    info.config.name
                )));
            }
            atomic_batches &= info.config.allow_atomic_publish;
        }
        if !atomic_batches {
            tracing::warn!(
                version = %client.server_info().version,
                "nats-server does not support atomic batch publish (2.12+): appends of several \
                 events at once will be refused"
            );
        }
        let subject_root = format!("{}.evt.", config.prefix);
        let stream_names = [
            config.stream_name(LogKind::Config),
            config.stream_name(LogKind::Invocations),
        ];
        let direct_reads = match config.aggregate_reads {
            AggregateReads::Auto => config.replicas == 1,
            AggregateReads::DirectGet => true,
            AggregateReads::OrderedConsumer => false,
        };
        Ok(JetStreamLog {
            inner: Arc::new(Inner {
                client,
                js,
                config,
                subject_root,
                stream_names,
                atomic_batches,
                direct_reads,
            }),
        })
    }

    /// The name of the stream that holds `log`.
    pub fn stream_name(&self, log: LogKind) -> String {
        self.inner.stream_names[log_index(log)].clone()
    }

    /// The NATS subject an aggregate's events are published on: `<prefix>.evt.<subject>`.
    pub fn nats_subject(&self, subject: &Subject) -> String {
        format!("{}{}", self.inner.subject_root, subject)
    }

    pub fn config(&self) -> &JetStreamConfig {
        &self.inner.config
    }

    /// The JetStream context this log uses (for opening KV buckets next to it).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// The checkpoint store of this deployment: KV bucket `<PREFIX>_checkpoints`, with the
    /// streams' replica count.
    pub async fn checkpoint_store(&self) -> Result<KvCheckpointStore, EventLogError> {
        KvCheckpointStore::open_with_replicas(
            &self.inner.js,
            &self.inner.config.checkpoint_bucket(),
            self.inner.config.replicas,
        )
        .await
    }

    fn stream_of(&self, log: LogKind) -> &str {
        &self.inner.stream_names[log_index(log)]
    }

    /// A handle on the stream that holds `log` (no request is made).
    async fn stream_handle(
        &self,
        log: LogKind,
    ) -> Result<jetstream::stream::Stream<()>, EventLogError> {
        self.inner
            .js
            .get_stream_no_info(self.stream_of(log))
            .await
            .map_err(EventLogError::unavailable)
    }
}

/// The stream configuration for `log`.
fn stream_config(config: &JetStreamConfig, log: LogKind) -> stream::Config {
    let root = format!("{}.evt", config.prefix);
    let (subjects, max_age, description) = match log {
        LogKind::Config => (
            vec![
                format!("{root}.server.>"),
                format!("{root}.connection.>"),
                format!("{root}.policy.>"),
            ],
            Duration::ZERO,
            "Switchboard configuration events (servers, connections, tool policy); append-only",
        ),
        LogKind::Invocations => (
            vec![format!("{root}.invocation.>")],
            config.invocation_retention,
            "Switchboard invocation events; append-only, kept for the configured retention",
        ),
    };
    stream::Config {
        name: config.stream_name(log),
        description: Some(description.to_owned()),
        subjects,
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        discard: stream::DiscardPolicy::Old,
        max_age,
        max_messages: -1,
        max_bytes: -1,
        max_messages_per_subject: -1,
        duplicate_window: config.duplicate_window,
        deny_delete: true,
        deny_purge: true,
        allow_rollup: false,
        // Direct get: read_aggregate on one replica, and auditors' tools.
        allow_direct: true,
        allow_atomic_publish: true,
        ..Default::default()
    }
}

/// Refuses nats-server versions older than 2.11 (Debian's 2.9 silently ignores several stream
/// settings and breaks the KV client). `version` is what the server reports in its INFO.
pub fn check_server_version(version: &str) -> Result<(), EventLogError> {
    let unreadable = || EventLogError::Unavailable {
        reason: format!(
            "cannot read the nats-server version {:?}; Switchboard needs nats-server {}.{} or \
             newer",
            version.chars().take(40).collect::<String>(),
            MIN_SERVER_VERSION.0,
            MIN_SERVER_VERSION.1
        ),
    };
    let trimmed = version.trim();
    let trimmed = trimmed.strip_prefix('v').unwrap_or(trimmed);
    // "2.12.0-RC.1" and "2.11.3+build" count as their release numbers.
    let release = trimmed.split(['-', '+']).next().unwrap_or_default();
    let mut parts = release.split('.');
    let mut number = || -> Option<u64> {
        let part = parts.next()?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let major = number().ok_or_else(unreadable)?;
    let minor = number().ok_or_else(unreadable)?;
    if (major, minor) < MIN_SERVER_VERSION {
        return Err(EventLogError::ServerTooOld {
            found: trimmed.to_owned(),
        });
    }
    Ok(())
}

#[async_trait]
impl EventLog for JetStreamLog {
    async fn append(
        &self,
        subject: &Subject,
        expected: ExpectedVersion,
        events: &[Envelope],
    ) -> Result<AppendOutcome, EventLogError> {
        self.append_events(subject, expected, events).await
    }

    async fn read_aggregate(&self, subject: &Subject) -> Result<AggregateHistory, EventLogError> {
        self.read_aggregate_events(subject).await
    }

    async fn read_from(
        &self,
        log: LogKind,
        from: u64,
        filter: Option<&SubjectFilter>,
    ) -> Result<EventStream, EventLogError> {
        self.open_events(log, from, filter, true).await
    }

    async fn subscribe(
        &self,
        log: LogKind,
        from: u64,
        filter: Option<&SubjectFilter>,
    ) -> Result<EventStream, EventLogError> {
        self.open_events(log, from, filter, false).await
    }

    async fn read_event(
        &self,
        log: LogKind,
        sequence: u64,
    ) -> Result<Option<RecordedEvent>, EventLogError> {
        self.read_event_direct(log, sequence).await
    }

    async fn last_sequence(&self, log: LogKind) -> Result<u64, EventLogError> {
        self.stream_last_sequence(log).await
    }

    fn filters_where_stored(&self) -> bool {
        true
    }

    fn max_event_bytes(&self) -> Option<usize> {
        // An event is one message. The server's current limit: the client updates it from
        // each INFO, a reconnection to a server with another limit included (one atomic load).
        Some(self.inner.client.max_payload())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_older_than_2_11_are_refused_with_a_clear_message() {
        let err = check_server_version("2.9.25").expect_err("2.9 is too old");
        assert!(matches!(err, EventLogError::ServerTooOld { .. }), "{err}");
        assert!(err.to_string().contains("2.11 or newer"), "{err}");
        assert!(err.to_string().contains("2.9.25"), "{err}");
        assert!(check_server_version("2.10.22").is_err());
        assert!(check_server_version("1.4.0").is_err());
    }

    #[test]
    fn servers_from_2_11_on_are_accepted() {
        for ok in [
            "2.11.0",
            "2.15.1",
            "v2.12.3",
            "2.12.0-RC.1",
            "3.0.0",
            "2.11",
        ] {
            check_server_version(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn an_unreadable_version_is_a_clear_error() {
        for garbage in ["", "garbage", "2", "2.x.1", "two.eleven", ".11.0"] {
            let err = check_server_version(garbage).expect_err(garbage);
            let text = err.to_string();
            assert!(
                text.contains("cannot read the nats-server version"),
                "{text}"
            );
            assert!(text.contains("2.11 or newer"), "{text}");
        }
    }

    #[test]
    fn stream_names_and_subjects_follow_the_prefix() {
        let config = JetStreamConfig::with_prefix("acme-sb_2");
        assert_eq!(config.stream_name(LogKind::Config), "ACME-SB_2_CONFIG");
        assert_eq!(
            config.stream_name(LogKind::Invocations),
            "ACME-SB_2_INVOCATIONS"
        );
        assert_eq!(config.checkpoint_bucket(), "ACME-SB_2_checkpoints");
        let streams = stream_config(&config, LogKind::Config);
        assert_eq!(
            streams.subjects,
            [
                "acme-sb_2.evt.server.>",
                "acme-sb_2.evt.connection.>",
                "acme-sb_2.evt.policy.>"
            ]
        );
        assert!(streams.deny_delete && streams.deny_purge && !streams.allow_rollup);
        assert_eq!(streams.max_age, Duration::ZERO);
        let invocations = stream_config(&config, LogKind::Invocations);
        assert_eq!(invocations.subjects, ["acme-sb_2.evt.invocation.>"]);
        assert_eq!(invocations.max_age, config.invocation_retention);
        assert!(config.validate().is_ok());
        // Refused: what is no subject token, and what would share streams with another
        // prefix once upper-cased (case, dots).
        for prefix in ["a b", "sb.>", "", "acme.sb", "Sb", "SB"] {
            assert!(
                JetStreamConfig::with_prefix(prefix).validate().is_err(),
                "{prefix}"
            );
        }
    }
}
