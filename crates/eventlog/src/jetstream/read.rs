//! Reads: ordered push consumers, decoded into [`RecordedEvent`]s.
//!
//! An ordered consumer is an ephemeral, unacknowledged push consumer that async-nats recreates
//! from the last delivered sequence whenever it notices a gap, a missed heartbeat or a
//! reconnect, so a subscription survives a server restart on its own. On top of that this module
//! drops anything at or before the last sequence it has passed on, so a recreation can never
//! show an event twice, and ends finite reads at the log's last sequence as it was when the read
//! started (or, for an aggregate, when the consumer has nothing left to deliver). The consumer is
//! deleted as soon as a read ends or is dropped instead of lingering for its inactivity
//! threshold.
use std::{
    borrow::Cow,
    future::poll_fn,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use async_nats::HeaderMap;
use async_nats::jetstream::{
    self,
    consumer::{
        DeliverPolicy,
        push::{Ordered, OrderedConfig, OrderedErrorKind},
    },
};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use proto::{Message as _, v1::Envelope};

use super::{EVENT_TYPE_HEADER, Inner, JetStreamLog};
use crate::{
    AggregateHistory, EventLogError, EventStream, LogKind, RecordedEvent, Subject, SubjectFilter,
    UnknownBody,
};

/// Events asked for per direct-get request.
const DIRECT_GET_BATCH: u64 = 1000;

/// Where a consumer starts.
pub(super) enum Start {
    /// At this stream sequence (0 and 1 both mean the beginning).
    Sequence(u64),
    /// At the first message stored at or after this time.
    Time(async_nats::datetime::DateTime),
}

/// When a read ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// Never: a live subscription.
    Never,
    /// After the message at this stream sequence (or the last matching one before it).
    AtSequence(u64),
    /// When the consumer has delivered every matching message stored so far.
    CaughtUp,
}

/// A message as delivered, with its stream sequence.
pub(super) struct Delivered {
    pub sequence: u64,
    pub message: async_nats::Message,
}

/// The consumer to delete once a read is over.
struct Cleanup {
    js: jetstream::Context,
    stream: String,
    consumer: String,
}

/// Raw messages from one ordered consumer, bounded by [`End`].
pub(super) struct ConsumerReader {
    messages: Option<Ordered>,
    end: End,
    /// Messages below this stream sequence were already passed on (or precede the start).
    next_min: u64,
    done: bool,
    cleanup: Option<Cleanup>,
}

impl ConsumerReader {
    fn empty(end: End) -> Self {
        ConsumerReader {
            messages: None,
            end,
            next_min: 0,
            done: end != End::Never,
            cleanup: None,
        }
    }

    pub(super) async fn next_message(&mut self) -> Result<Option<Delivered>, EventLogError> {
        poll_fn(|cx| self.poll_delivered(cx)).await.transpose()
    }

    fn poll_delivered(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Delivered, EventLogError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let Some(messages) = self.messages.as_mut() else {
                // Nothing can ever arrive (a filter outside this log): a live subscription
                // stays silent, anything else has ended.
                return Poll::Pending;
            };
            match ready!(messages.poll_next_unpin(cx)) {
                None => {
                    self.finish();
                    return Poll::Ready(Some(Err(EventLogError::unavailable(
                        "the NATS subscription ended (client closed)",
                    ))));
                }
                Some(Err(err)) if err.kind() == OrderedErrorKind::MissingHeartbeat => {
                    // async-nats recreates the consumer from the last delivered sequence.
                    tracing::debug!("ordered consumer missed a heartbeat; it is being recreated");
                }
                Some(Err(err)) => {
                    self.finish();
                    return Poll::Ready(Some(Err(EventLogError::unavailable(format!(
                        "reading from JetStream failed: {err}"
                    )))));
                }
                Some(Ok(message)) => {
                    let Ok(info) = message.info() else {
                        continue;
                    };
                    let (sequence, pending) = (info.stream_sequence, info.pending);
                    if sequence < self.next_min {
                        continue;
                    }
                    let caught_up = match self.end {
                        End::Never => false,
                        End::AtSequence(last) if sequence > last => {
                            self.finish();
                            return Poll::Ready(None);
                        }
                        End::AtSequence(last) => pending == 0 || sequence == last,
                        End::CaughtUp => pending == 0,
                    };
                    self.next_min = sequence.saturating_add(1);
                    if caught_up {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Delivered {
                        sequence,
                        message: message.message,
                    })));
                }
            }
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self.messages = None;
        self.delete_consumer();
    }

    fn delete_consumer(&mut self) {
        let Some(cleanup) = self.cleanup.take() else {
            return;
        };
        // Best effort: an undeleted consumer disappears by itself after 30 s without interest.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(err) = cleanup
                    .js
                    .delete_consumer_from_stream(&cleanup.consumer, &cleanup.stream)
                    .await
                {
                    tracing::debug!(consumer = %cleanup.consumer, %err, "consumer not deleted");
                }
            });
        }
    }
}

impl Drop for ConsumerReader {
    fn drop(&mut self) {
        self.delete_consumer();
    }
}

/// Decoded events of one log.
struct EventsStream {
    reader: ConsumerReader,
    inner: Arc<Inner>,
    log: LogKind,
}

impl Stream for EventsStream {
    type Item = Result<RecordedEvent, EventLogError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match ready!(this.reader.poll_delivered(cx)) {
            None => Poll::Ready(None),
            Some(Err(err)) => Poll::Ready(Some(Err(err))),
            Some(Ok(delivered)) => Poll::Ready(Some(decode(&this.inner, this.log, delivered))),
        }
    }
}

/// Turns a delivered message into a [`RecordedEvent`].
fn decode(
    inner: &Inner,
    log: LogKind,
    delivered: Delivered,
) -> Result<RecordedEvent, EventLogError> {
    let Delivered { sequence, message } = delivered;
    decode_parts(
        inner,
        log,
        sequence,
        message.subject.as_str(),
        message.headers.as_ref(),
        message.payload,
    )
}

/// Where a direct get answer's message is stored: its sequence and its subject.
fn stored_at(reply: &async_nats::Message) -> (Option<u64>, String) {
    let header = |name: &str| {
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str())
    };
    (
        header("Nats-Sequence").and_then(|v| v.parse::<u64>().ok()),
        header("Nats-Subject").unwrap_or_default().to_owned(),
    )
}

/// Turns a direct get answer, the message stored at `sequence` on `stored_subject`, into a
/// [`RecordedEvent`].
fn decode_answer(
    inner: &Inner,
    log: LogKind,
    sequence: u64,
    stored_subject: &str,
    reply: async_nats::Message,
) -> Result<RecordedEvent, EventLogError> {
    decode_parts(
        inner,
        log,
        sequence,
        stored_subject,
        reply.headers.as_ref(),
        reply.payload,
    )
}

/// Turns a stored message into a [`RecordedEvent`]; a message that cannot be read is reported
/// as `Corrupt` (it stays in the stream).
fn decode_parts(
    inner: &Inner,
    log: LogKind,
    sequence: u64,
    nats_subject: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
) -> Result<RecordedEvent, EventLogError> {
    let corrupt = |reason: String| EventLogError::Corrupt {
        location: format!(
            "stream {} sequence {sequence}",
            inner.stream_names[super::log_index(log)]
        ),
        reason,
    };
    let relative = nats_subject
        .strip_prefix(inner.subject_root.as_str())
        .ok_or_else(|| {
            corrupt(format!(
                "subject {nats_subject} is outside {}",
                inner.subject_root
            ))
        })?;
    let subject = Subject::parse(relative).map_err(|err| corrupt(err.to_string()))?;
    let envelope = Envelope::decode(payload.clone())
        .map_err(|err| corrupt(format!("not a protobuf envelope: {err}")))?;
    let (event_type, unknown_body) = match &envelope.event {
        Some(event) => (Cow::Borrowed(event.type_name()), None),
        None => {
            let recorded = headers
                .and_then(|headers| headers.get(EVENT_TYPE_HEADER))
                .map(|value| value.as_str().to_owned());
            (
                recorded.map_or(Cow::Borrowed("Unknown"), Cow::Owned),
                Some(UnknownBody::Protobuf(payload)),
            )
        }
    };
    Ok(RecordedEvent {
        log,
        sequence,
        subject,
        event_type,
        envelope,
        unknown_body,
    })
}

impl JetStreamLog {
    /// An ordered consumer over `log` from `start`, optionally filtered, ending at `end`.
    pub(super) async fn open_raw(
        &self,
        log: LogKind,
        start: Start,
        filter: Option<&SubjectFilter>,
        end: End,
    ) -> Result<ConsumerReader, EventLogError> {
        if filter.is_some_and(|f| !f.logs().contains(&log)) || end == End::AtSequence(0) {
            return Ok(ConsumerReader::empty(end));
        }
        let (deliver_policy, next_min) = match start {
            Start::Sequence(from) => {
                if let End::AtSequence(last) = end
                    && from > last
                {
                    return Ok(ConsumerReader::empty(end));
                }
                let policy = if from <= 1 {
                    DeliverPolicy::All
                } else {
                    DeliverPolicy::ByStartSequence {
                        start_sequence: from,
                    }
                };
                (policy, from)
            }
            Start::Time(start_time) => (DeliverPolicy::ByStartTime { start_time }, 0),
        };
        let stream_name = self.stream_of(log).to_owned();
        let unavailable = |err: &dyn std::fmt::Display| {
            EventLogError::unavailable(format!("cannot read stream {stream_name}: {err}"))
        };
        let stream = self.stream_handle(log).await?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_subject: self.inner.client.new_inbox(),
                filter_subject: filter
                    .map(|f| format!("{}{f}", self.inner.subject_root))
                    .unwrap_or_default(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(&e))?;
        let info = consumer.cached_info();
        let mut reader = ConsumerReader {
            messages: None,
            end,
            next_min,
            done: false,
            cleanup: Some(Cleanup {
                js: self.inner.js.clone(),
                stream: stream_name.clone(),
                consumer: info.name.clone(),
            }),
        };
        if end != End::Never && info.num_pending == 0 {
            reader.finish();
            return Ok(reader);
        }
        reader.messages = Some(consumer.messages().await.map_err(|e| unavailable(&e))?);
        Ok(reader)
    }

    pub(super) async fn open_events(
        &self,
        log: LogKind,
        from: u64,
        filter: Option<&SubjectFilter>,
        finite: bool,
    ) -> Result<EventStream, EventLogError> {
        let end = if finite {
            End::AtSequence(self.stream_last_sequence(log).await?)
        } else {
            End::Never
        };
        let reader = self
            .open_raw(log, Start::Sequence(from), filter, end)
            .await?;
        Ok(Box::pin(EventsStream {
            reader,
            inner: self.inner.clone(),
            log,
        }))
    }

    pub(super) async fn read_aggregate_events(
        &self,
        subject: &Subject,
    ) -> Result<AggregateHistory, EventLogError> {
        if self.inner.direct_reads {
            return self.read_aggregate_direct(subject).await;
        }
        let log = subject.log();
        let filter = SubjectFilter::exact(subject);
        let mut reader = self
            .open_raw(log, Start::Sequence(1), Some(&filter), End::CaughtUp)
            .await?;
        let mut events = Vec::new();
        while let Some(delivered) = reader.next_message().await? {
            events.push(decode(&self.inner, log, delivered)?);
        }
        Ok(AggregateHistory {
            version: events.last().map_or(0, |e| e.sequence),
            events,
        })
    }

    /// `read_aggregate` by batched direct get: `{"seq", "next_by_subj", "batch"}` answered by
    /// up to `batch` messages and an end-of-batch status (204) that says how many are left;
    /// 404 when nothing (more) matches.
    async fn read_aggregate_direct(
        &self,
        subject: &Subject,
    ) -> Result<AggregateHistory, EventLogError> {
        let log = subject.log();
        let stream_name = self.stream_of(log);
        let nats_subject = self.nats_subject(subject);
        let unavailable = |err: &dyn std::fmt::Display| {
            EventLogError::unavailable(format!("cannot read {subject} from {stream_name}: {err}"))
        };
        let client = &self.inner.client;
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| unavailable(&e))?;
        let api = format!("$JS.API.DIRECT.GET.{stream_name}");
        let mut events = Vec::new();
        let mut next = 1;
        'pages: loop {
            let page_start = next;
            let request = serde_json::json!({
                "seq": next,
                "next_by_subj": nats_subject,
                "batch": DIRECT_GET_BATCH,
            });
            client
                .publish_with_reply(api.clone(), inbox.clone(), request.to_string().into())
                .await
                .map_err(|e| unavailable(&e))?;
            loop {
                let reply = tokio::time::timeout(self.inner.config.ack_timeout, replies.next())
                    .await
                    .map_err(|_| unavailable(&"no answer in time"))?
                    .ok_or_else(|| unavailable(&"subscription closed"))?;
                match reply.status.map(|status| status.as_u16()) {
                    None => {
                        let (sequence, stored_subject) = stored_at(&reply);
                        let sequence = sequence
                            .ok_or_else(|| unavailable(&"direct get answer without a sequence"))?;
                        if sequence < next {
                            // Answers go forward; one that does not would repeat events, or
                            // (with the paging below) ask for the same page forever.
                            return Err(unavailable(&format!(
                                "direct get answered sequence {sequence} where {next} or later \
                                 was asked for"
                            )));
                        }
                        next = sequence.saturating_add(1);
                        events.push(decode_answer(
                            &self.inner,
                            log,
                            sequence,
                            &stored_subject,
                            reply,
                        )?);
                    }
                    // End of this batch: ask for the next one if the server says more match.
                    Some(204) => {
                        let pending = reply
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("Nats-Num-Pending"))
                            .and_then(|v| v.as_str().parse::<u64>().ok())
                            .unwrap_or(0);
                        if pending == 0 {
                            break 'pages;
                        }
                        if next == page_start {
                            return Err(unavailable(&format!(
                                "direct get reported {pending} more events but sent none"
                            )));
                        }
                        continue 'pages;
                    }
                    Some(404) => break 'pages,
                    Some(503) => {
                        return Err(unavailable(
                            &"no responders for direct get (is allow_direct set on the stream?)",
                        ));
                    }
                    Some(status) => {
                        return Err(unavailable(&format!(
                            "direct get answered {status} {}",
                            reply.description.as_deref().unwrap_or_default()
                        )));
                    }
                }
            }
        }
        drop(replies);
        Ok(AggregateHistory {
            version: events.last().map_or(0, |e| e.sequence),
            events,
        })
    }

    /// The event at `sequence`, by one direct get (`{"seq"}`); `None` when there is none.
    pub(super) async fn read_event_direct(
        &self,
        log: LogKind,
        sequence: u64,
    ) -> Result<Option<RecordedEvent>, EventLogError> {
        let stream_name = self.stream_of(log);
        let unavailable = |err: &dyn std::fmt::Display| {
            EventLogError::unavailable(format!(
                "cannot read sequence {sequence} of {stream_name}: {err}"
            ))
        };
        let request = serde_json::json!({ "seq": sequence });
        let reply = tokio::time::timeout(
            self.inner.config.ack_timeout,
            self.inner.client.request(
                format!("$JS.API.DIRECT.GET.{stream_name}"),
                request.to_string().into(),
            ),
        )
        .await
        .map_err(|_| unavailable(&"no answer in time"))?
        .map_err(|e| unavailable(&e))?;
        match reply.status.map(|status| status.as_u16()) {
            None => {
                let (stored_sequence, stored_subject) = stored_at(&reply);
                if stored_sequence != Some(sequence) {
                    return Err(unavailable(&"direct get answered another sequence"));
                }
                decode_answer(&self.inner, log, sequence, &stored_subject, reply).map(Some)
            }
            Some(404) => Ok(None),
            Some(status) => Err(unavailable(&format!(
                "direct get answered {status} {}",
                reply.description.as_deref().unwrap_or_default()
            ))),
        }
    }

    pub(super) async fn stream_last_sequence(&self, log: LogKind) -> Result<u64, EventLogError> {
        let stream_name = self.stream_of(log);
        let stream = self.stream_handle(log).await?;
        let info = stream.get_info().await.map_err(|err| {
            EventLogError::unavailable(format!("cannot read stream {stream_name}: {err}"))
        })?;
        Ok(info.state.last_sequence)
    }
}
