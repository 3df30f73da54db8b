//! Appends: optimistic concurrency, dedupe and retries.
//!
//! - One event is one message with `Nats-Msg-Id` = event id and, unless the expectation is
//!   `Any`, `Nats-Expected-Last-Subject-Sequence` = expected version (0 for "no events").
//! - Several events are one atomic batch (ADR-50): `Nats-Batch-Id`, `Nats-Batch-Sequence` 1..n,
//!   `Nats-Batch-Commit: 1` on the last; the expected sequence on the first message only. The
//!   server stores all of them contiguously or none. Each message still carries its
//!   `Nats-Msg-Id` (nats-server 2.12+ accepts it inside atomic batches and refuses the whole
//!   batch with error 10201 if any id is already stored).
//! - An acknowledgement that does not arrive in time (or a dropped connection) does not mean the
//!   events were lost: the append is retried with the same ids, a bounded number of times with
//!   backoff. Retried batches use a fresh batch id, so a batch the server abandoned half-way
//!   cannot collide with the retry.
//!
//! Duplicates. A retry whose first attempt was stored is answered by the server in one of
//! three ways, all of which end in `duplicate: true` with the original sequences:
//! - single event, no expected version: the server's dedupe answers with the original sequence;
//! - single event with an expected version: nats-server (checked on 2.15.1) evaluates
//!   `Nats-Expected-Last-Subject-Sequence` *before* dedupe, so the retry is refused with "wrong
//!   last sequence" (10071);
//! - batch: refused with "batch contains duplicate message id" (10201).
//!
//! In the last two cases the adapter looks the ids up: first the message at the aggregate's
//! current version (the common case: the retried events are the aggregate's latest), then, if
//! another writer has appended since, the aggregate's events of the last dedupe window. Found
//! → the original outcome; not found → `Conflict`.
//!
//! Cost: nats-server stages every atomic batch of a file-storage stream in a store of its own
//! (a directory with files, created and removed per batch), so a multi-event append takes
//! milliseconds where a single event takes about 0.1 ms. Decide functions that emit several
//! events are fine; a hot path should emit one.
use std::{collections::HashMap, future::Future, sync::atomic::Ordering, time::Duration};

use async_nats::{
    HeaderMap, HeaderName, HeaderValue,
    header::{
        NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL, NATS_BATCH_ID, NATS_BATCH_SEQUENCE,
        NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID,
    },
    jetstream::{
        self, ErrorCode,
        context::{PublishError, PublishErrorKind},
        publish::PublishAck,
    },
};
use bytes::Bytes;
use proto::{Message as _, v1::Envelope};

use super::{
    EVENT_TYPE_HEADER, JetStreamLog,
    read::{End, Start},
};
use crate::{AppendOutcome, EventLogError, ExpectedVersion, Subject, SubjectFilter};

/// nats-server's limit on messages in one atomic batch.
pub(super) const MAX_BATCH_EVENTS: usize = 1000;
/// Extra time looked back, beyond the dedupe window, when searching for a retried event (covers
/// clock skew between this host and the server).
const LOOKUP_MARGIN: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

const EVENT_TYPE: HeaderName = HeaderName::from_static(EVENT_TYPE_HEADER);

/// A JetStream error answer: its code and its text (with the description).
struct Refusal {
    code: ErrorCode,
    text: String,
}

/// How one publish attempt ended.
enum Attempt {
    Acked(PublishAck),
    /// The server refused the write; retrying the same thing would be refused again.
    Refused(Refusal),
    /// No answer (time-out, connection lost, JetStream momentarily unavailable): the events may
    /// or may not be stored; retry with the same ids.
    NoAnswer(String),
    /// The message does not fit the server's `max_payload`; nothing was sent.
    TooLarge(String),
    /// The client reconnected while the attempt waited: the connection it went out on is
    /// gone, and with it any answer. Retried at once (with the same ids), instead of after
    /// the rest of the acknowledgement time-out.
    Reconnected,
}

/// How often an attempt that is still waiting for its answer checks whether the client has
/// reconnected meanwhile (async-nats offers a counter of connections, not a notification).
/// Answers normally come within a millisecond, so the check costs nothing then.
const RECONNECT_CHECK: Duration = Duration::from_millis(20);

/// How long the look-up of an earlier attempt (after a refusal that may be its echo) may
/// take before the append is retried instead. Right after a server restart, the look-up's
/// consumer can stall until a missed heartbeat recreates it (seconds); a fresh attempt is
/// quicker.
const LOOKUP_BOUND: Duration = Duration::from_secs(1);

impl JetStreamLog {
    pub(super) async fn append_events(
        &self,
        subject: &Subject,
        expected: ExpectedVersion,
        events: &[Envelope],
    ) -> Result<AppendOutcome, EventLogError> {
        validate(events)?;
        if events.len() > 1 && !self.inner.atomic_batches {
            return Err(EventLogError::refused(
                "appending several events at once needs atomic batch publish, which this \
                 nats-server does not support; upgrade to nats-server 2.12 or newer",
            ));
        }
        let nats_subject = self.nats_subject(subject);
        let bodies: Vec<Bytes> = events
            .iter()
            .map(|event| Bytes::from(event.encode_to_vec()))
            .collect();

        let config = &self.inner.config;
        let attempts = config.max_append_attempts.max(1);
        let mut backoff = config.retry_backoff;
        let mut last_failure = String::new();
        for attempt in 1..=attempts {
            let result = if events.len() == 1 {
                // Bounded by the context's timeout (= ack_timeout), both sending and the ack.
                self.unless_reconnected(self.publish_one(
                    &nats_subject,
                    expected,
                    &events[0],
                    &bodies[0],
                ))
                .await
            } else {
                let batch = tokio::time::timeout(
                    config.ack_timeout,
                    Box::pin(self.publish_batch(&nats_subject, expected, events, &bodies, attempt)),
                );
                self.unless_reconnected(async {
                    batch.await.unwrap_or_else(|_| {
                        Attempt::NoAnswer("no acknowledgement in time".to_owned())
                    })
                })
                .await
            };
            match result {
                Attempt::Acked(ack) => {
                    let count = events.len() as u64;
                    return Ok(AppendOutcome {
                        first_sequence: ack.sequence.saturating_sub(count - 1),
                        last_sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    });
                }
                Attempt::Refused(error) => {
                    // Boxed: the look-up is rare and large, and would otherwise bloat every
                    // append's future.
                    let lookup = Box::pin(self.refused(subject, expected, events, error));
                    match tokio::time::timeout(LOOKUP_BOUND, lookup).await {
                        // The look-up could not read the stream: the question is still open,
                        // and the next attempt asks it again.
                        Ok(Err(EventLogError::Unavailable { reason })) => {
                            tracing::debug!(%subject, attempt, %reason, "duplicate look-up failed; retrying");
                            last_failure = reason;
                        }
                        Ok(result) => return result,
                        Err(_) => {
                            tracing::debug!(%subject, attempt, "duplicate look-up too slow; retrying");
                            last_failure =
                                "looking for an earlier attempt took too long".to_owned();
                        }
                    }
                }
                Attempt::TooLarge(reason) => {
                    return Err(EventLogError::InvalidEvent { reason });
                }
                Attempt::NoAnswer(reason) => {
                    tracing::debug!(%subject, attempt, %reason, "append not acknowledged; retrying");
                    last_failure = reason;
                }
                Attempt::Reconnected => {
                    tracing::debug!(%subject, attempt, "reconnected while waiting for the acknowledgement; retrying");
                    last_failure = "the connection was lost while waiting".to_owned();
                    // The server is answering again: no backoff.
                    continue;
                }
            }
            if attempt < attempts {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        Err(EventLogError::unavailable(format!(
            "append to {subject} not acknowledged after {attempts} attempts ({last_failure}); \
             it may or may not be stored: retry with the same event ids"
        )))
    }

    /// Runs one publish attempt, but gives up on it as soon as the client has reconnected
    /// since it began (see [`Attempt::Reconnected`]).
    async fn unless_reconnected(&self, attempt: impl Future<Output = Attempt>) -> Attempt {
        let statistics = self.inner.client.statistics();
        let connects = statistics.connects.load(Ordering::Relaxed);
        let reconnected = async {
            let mut check = tokio::time::interval_at(
                tokio::time::Instant::now() + RECONNECT_CHECK,
                RECONNECT_CHECK,
            );
            loop {
                check.tick().await;
                if statistics.connects.load(Ordering::Relaxed) != connects {
                    return;
                }
            }
        };
        tokio::select! {
            biased;
            result = attempt => result,
            () = reconnected => Attempt::Reconnected,
        }
    }

    async fn publish_one(
        &self,
        nats_subject: &str,
        expected: ExpectedVersion,
        event: &Envelope,
        body: &Bytes,
    ) -> Attempt {
        let headers = event_headers(event, expected);
        match self
            .inner
            .js
            .publish_with_headers(nats_subject.to_owned(), headers, body.clone())
            .await
        {
            Ok(ack) => classify(ack.await),
            Err(err) => classify(Err(err)),
        }
    }

    async fn publish_batch(
        &self,
        nats_subject: &str,
        expected: ExpectedVersion,
        events: &[Envelope],
        bodies: &[Bytes],
        attempt: u32,
    ) -> Attempt {
        let js = &self.inner.js;
        // Atomic batch. The batch id only has to be unique among this stream's open batches; a
        // fresh one per attempt keeps a half-sent earlier attempt from mixing in.
        let batch_id = format!("{}-{attempt}", events[0].event_id);
        let last = events.len() - 1;
        for (i, (event, body)) in events.iter().zip(bodies).enumerate() {
            let mut headers = event_headers(
                event,
                if i == 0 {
                    expected
                } else {
                    ExpectedVersion::Any
                },
            );
            headers.insert(NATS_BATCH_ID, batch_id.as_str());
            headers.insert(NATS_BATCH_SEQUENCE, HeaderValue::from(i + 1));
            if i < last {
                // Only the commit needs an answer: a refusal of any earlier message makes the
                // server refuse the commit.
                if let Err(err) = self
                    .inner
                    .client
                    .publish_with_headers(nats_subject.to_owned(), headers, body.clone())
                    .await
                {
                    return Attempt::NoAnswer(format!("batch message not sent: {err}"));
                }
            } else {
                headers.insert(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
                return match js
                    .publish_with_headers(nats_subject.to_owned(), headers, body.clone())
                    .await
                {
                    Ok(ack) => classify(ack.await),
                    Err(err) => classify(Err(err)),
                };
            }
        }
        Attempt::NoAnswer("empty batch".to_owned())
    }

    /// The server refused the append: a conflict, unless the refusal is the echo of an earlier
    /// attempt of this very append that was stored.
    async fn refused(
        &self,
        subject: &Subject,
        expected: ExpectedVersion,
        events: &[Envelope],
        error: Refusal,
    ) -> Result<AppendOutcome, EventLogError> {
        let code = error.code;
        if code != ErrorCode::STREAM_WRONG_LAST_SEQUENCE
            && code != ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE
        {
            // `classify` already passed on the answers worth retrying (503, too many batches
            // in flight, a clustered write still in progress).
            return Err(EventLogError::refused(format!(
                "append to {subject} refused by JetStream: {}",
                error.text
            )));
        }
        let reported = (code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE)
            .then(|| actual_sequence(&error.text))
            .flatten();
        let actual = match reported {
            Some(actual) => actual,
            None => self.subject_version(subject).await?,
        };
        if let Some(original) = self.find_stored(subject, events, actual).await? {
            return Ok(original);
        }
        if code == ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE {
            return Err(EventLogError::InvalidEvent {
                reason: format!(
                    "some of these event ids are already stored in {subject} (or in another \
                     aggregate of the log); a retried append must repeat exactly the same events"
                ),
            });
        }
        Err(EventLogError::Conflict {
            subject: subject.to_string(),
            expected,
            actual: Some(actual),
        })
    }

    /// The stream sequence of the aggregate's last event, 0 if none.
    async fn subject_version(&self, subject: &Subject) -> Result<u64, EventLogError> {
        let stream = self.stream_handle(subject.log()).await?;
        match stream
            .get_last_raw_message_by_subject(&self.nats_subject(subject))
            .await
        {
            Ok(message) => Ok(message.sequence),
            Err(err)
                if err.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                Ok(0)
            }
            Err(err) => Err(EventLogError::unavailable(format!(
                "cannot read the version of {subject}: {err}"
            ))),
        }
    }

    /// If every one of `events` is already stored in `subject` (an earlier attempt of this
    /// append), the original outcome with `duplicate: true`.
    async fn find_stored(
        &self,
        subject: &Subject,
        events: &[Envelope],
        version: u64,
    ) -> Result<Option<AppendOutcome>, EventLogError> {
        if version == 0 {
            return Ok(None);
        }
        let count = events.len() as u64;
        let last_id = events
            .last()
            .map(|e| e.event_id.as_str())
            .unwrap_or_default();
        let duplicate = |first_sequence, last_sequence| AppendOutcome {
            first_sequence,
            last_sequence,
            duplicate: true,
        };

        // Fast path: the events are the aggregate's latest (a batch is contiguous in the stream).
        if self.message_id_at(subject, version).await?.as_deref() == Some(last_id) {
            if count == 1 {
                return Ok(Some(duplicate(version, version)));
            }
            let first = version.saturating_sub(count - 1);
            if first > 0
                && self.message_id_at(subject, first).await?.as_deref()
                    == Some(events[0].event_id.as_str())
            {
                return Ok(Some(duplicate(first, version)));
            }
        }

        // Slow path: another writer appended since. Look through the aggregate's recent events.
        let wanted: HashMap<&str, usize> = events
            .iter()
            .enumerate()
            .map(|(i, e)| (e.event_id.as_str(), i))
            .collect();
        let mut found: Vec<Option<u64>> = vec![None; events.len()];
        let since = start_of_lookup(self.inner.config.duplicate_window + LOOKUP_MARGIN)?;
        let filter = SubjectFilter::exact(subject);
        let mut messages = self
            .open_raw(
                subject.log(),
                Start::Time(since),
                Some(&filter),
                End::AtSequence(version),
            )
            .await?;
        while let Some(message) = messages.next_message().await? {
            let id = message
                .message
                .headers
                .as_ref()
                .and_then(|h| h.get(NATS_MESSAGE_ID))
                .map(|v| v.as_str());
            if let Some(&index) = id.and_then(|id| wanted.get(id)) {
                found[index] = Some(message.sequence);
            }
        }
        if found.iter().all(Option::is_some) {
            let first = found.first().copied().flatten().unwrap_or_default();
            let last = found.last().copied().flatten().unwrap_or_default();
            return Ok(Some(duplicate(first, last)));
        }
        Ok(None)
    }

    /// The `Nats-Msg-Id` of the message at `sequence` if it belongs to `subject`.
    async fn message_id_at(
        &self,
        subject: &Subject,
        sequence: u64,
    ) -> Result<Option<String>, EventLogError> {
        let stream = self.stream_handle(subject.log()).await?;
        match stream.get_raw_message(sequence).await {
            Ok(message) if message.subject.as_str() == self.nats_subject(subject) => Ok(message
                .headers
                .get(NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_owned())),
            Ok(_) => Ok(None),
            Err(err) if err.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(err) => Err(EventLogError::unavailable(format!(
                "cannot read message {sequence} of {subject}: {err}"
            ))),
        }
    }
}

/// The time `lookback` ago, as async-nats wants it for a consumer's start time.
fn start_of_lookup(lookback: Duration) -> Result<async_nats::datetime::DateTime, EventLogError> {
    let since = std::time::SystemTime::now()
        .checked_sub(lookback)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    async_nats::datetime::from_nanos(since.as_nanos() as i128)
        .map_err(|err| EventLogError::unavailable(format!("clock out of range: {err}")))
}

fn validate(events: &[Envelope]) -> Result<(), EventLogError> {
    if events.is_empty() {
        return Err(EventLogError::InvalidEvent {
            reason: "an append needs at least one event".to_owned(),
        });
    }
    if events.len() > MAX_BATCH_EVENTS {
        return Err(EventLogError::InvalidEvent {
            reason: format!(
                "an append holds at most {MAX_BATCH_EVENTS} events, not {}",
                events.len()
            ),
        });
    }
    for (i, event) in events.iter().enumerate() {
        if uuid::Uuid::try_parse(&event.event_id).is_err() {
            return Err(EventLogError::InvalidEvent {
                reason: format!(
                    "event id {:?} is not a UUID",
                    event.event_id.chars().take(64).collect::<String>()
                ),
            });
        }
        if event.event.is_none() {
            // The same rule as the JSONL log: no event type could be recorded for it and no
            // reader could fold it (only events of a newer type read back without a body).
            return Err(EventLogError::InvalidEvent {
                reason: format!("event {} has no event body", event.event_id),
            });
        }
        if events[..i].iter().any(|e| e.event_id == event.event_id) {
            return Err(EventLogError::InvalidEvent {
                reason: format!("event id {} appears twice in one append", event.event_id),
            });
        }
    }
    Ok(())
}

fn event_headers(event: &Envelope, expected: ExpectedVersion) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MESSAGE_ID, event.event_id.as_str());
    match expected {
        ExpectedVersion::Any => {}
        ExpectedVersion::NoEvents => {
            headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        }
        ExpectedVersion::At(version) => {
            headers.insert(
                NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                HeaderValue::from(version),
            );
        }
    }
    if let Some(type_name) = crate::event_type_of(event) {
        headers.insert(EVENT_TYPE, type_name);
    }
    headers
}

/// Sorts a publish result into acknowledged, refused (final) and unanswered (retry).
fn classify(result: Result<PublishAck, PublishError>) -> Attempt {
    let error = match result {
        Ok(ack) => return Attempt::Acked(ack),
        Err(error) => error,
    };
    match error.kind() {
        PublishErrorKind::WrongLastSequence | PublishErrorKind::Other => {
            if let Some(js_error) = jetstream_error(&error) {
                let code = js_error.error_code();
                // 503: JetStream not (yet) available, e.g. right after a restart; 10210: too many
                // batches in flight on this stream; 10164: another write with an expected
                // sequence on this subject is still being replicated (clustered); 10175 and
                // 10176: a batch's commit reached the server without its earlier messages
                // (sent without an answer, they were lost in a restart or a reconnection) —
                // an atomic batch is stored whole or not at all, so nothing of it is, and the
                // next attempt sends it whole under a new batch id. All pass.
                if js_error.code() == 503
                    || code == ErrorCode::ATOMIC_PUBLISH_TOO_MANY_INFLIGHT
                    || code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
                    || code == ErrorCode::ATOMIC_PUBLISH_MISSING_SEQ
                    || code == ErrorCode::ATOMIC_PUBLISH_INCOMPLETE_BATCH
                {
                    return Attempt::NoAnswer(js_error.to_string());
                }
                return Attempt::Refused(Refusal {
                    code,
                    text: js_error.to_string(),
                });
            }
            Attempt::NoAnswer(error.to_string())
        }
        PublishErrorKind::MaxPayloadExceeded => Attempt::TooLarge(format!(
            "the event does not fit the server's max_payload: {error}"
        )),
        // Time-out, broken pipe, no responders (the stream's server is restarting), too many
        // acknowledgements pending: nothing is known about the outcome.
        _ => Attempt::NoAnswer(error.to_string()),
    }
}

fn jetstream_error(error: &PublishError) -> Option<&jetstream::Error> {
    let mut source = std::error::Error::source(error);
    while let Some(err) = source {
        if let Some(js_error) = err.downcast_ref::<jetstream::Error>() {
            return Some(js_error);
        }
        source = err.source();
    }
    None
}

/// The actual sequence in "wrong last sequence: 41 (code 400, error code 10071)".
fn actual_sequence(description: &str) -> Option<u64> {
    let rest = description.split("wrong last sequence").nth(1)?;
    let digits: String = rest
        .trim_start_matches([':', ' '])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal as async-nats hands it over: JetStream's error under a publish error.
    fn refusal(err_code: u64, description: &str) -> PublishError {
        let js_error: jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 400,
            "err_code": err_code,
            "description": description,
        }))
        .expect("a JetStream error");
        PublishError::with_source(PublishErrorKind::Other, js_error)
    }

    #[test]
    fn a_batch_whose_first_messages_the_server_lost_is_sent_again_not_refused() {
        // Seen when nats-server was killed between a batch's messages and its commit.
        for (code, text) in [
            (10176, "atomic publish batch is incomplete"),
            (10175, "atomic publish sequence is missing"),
        ] {
            assert!(
                matches!(classify(Err(refusal(code, text))), Attempt::NoAnswer(_)),
                "{code}"
            );
        }
        // A refusal that stands is still one.
        assert!(matches!(
            classify(Err(refusal(10071, "wrong last sequence: 4"))),
            Attempt::Refused(Refusal { code, .. }) if code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE
        ));
    }

    #[test]
    fn the_actual_version_is_read_from_the_refusal() {
        assert_eq!(
            actual_sequence("wrong last sequence: 41 (code 400, error code 10071)"),
            Some(41)
        );
        assert_eq!(actual_sequence("wrong last sequence: 0"), Some(0));
        assert_eq!(actual_sequence("wrong last sequence"), None);
        assert_eq!(actual_sequence("something else: 4"), None);
    }
}
