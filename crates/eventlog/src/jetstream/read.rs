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

use async_nats::jetstream::{
    self,
    consumer::{
        DeliverPolicy,
        push::{Ordered, OrderedConfig, OrderedErrorKind},
    },
};
use futures_util::{Stream, StreamExt};
use proto::{Message as _, v1::Envelope};

use super::{EVENT_TYPE_HEADER, Inner, JetStreamLog};
use crate::{
    AggregateHistory, EventLogError, EventStream, LogKind, RecordedEvent, Subject, SubjectFilter,
    UnknownBody,
};

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
                    self.next_min = sequence + 1;
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

/// Turns a stored message into a [`RecordedEvent`]; a message that cannot be read is reported
/// as `Corrupt` (it stays in the stream).
fn decode(inner: &Inner, log: LogKind, delivered: Delivered) -> Result<RecordedEvent, EventLogError> {
    let Delivered { sequence, message } = delivered;
    let corrupt = |reason: String| EventLogError::Corrupt {
        location: format!(
            "stream {} sequence {sequence}",
            inner.stream_names[super::log_index(log)]
        ),
        reason,
    };
    let relative = message
        .subject
        .as_str()
        .strip_prefix(inner.subject_root.as_str())
        .ok_or_else(|| corrupt(format!("subject {} is outside {}", message.subject, inner.subject_root)))?;
    let subject = Subject::parse(relative).map_err(|err| corrupt(err.to_string()))?;
    let envelope = Envelope::decode(message.payload.clone())
        .map_err(|err| corrupt(format!("not a protobuf envelope: {err}")))?;
    let (event_type, unknown_body) = match &envelope.event {
        Some(event) => (Cow::Borrowed(event.type_name()), None),
        None => {
            let recorded = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get(EVENT_TYPE_HEADER))
                .map(|value| value.as_str().to_owned());
            (
                recorded.map_or(Cow::Borrowed("Unknown"), Cow::Owned),
                Some(UnknownBody::Protobuf(message.payload)),
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
        let stream = self
            .inner
            .js
            .get_stream_no_info(&stream_name)
            .await
            .map_err(|e| unavailable(&e))?;
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
        let reader = self.open_raw(log, Start::Sequence(from), filter, end).await?;
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

    pub(super) async fn stream_last_sequence(&self, log: LogKind) -> Result<u64, EventLogError> {
        let stream_name = self.stream_of(log);
        let stream = self
            .inner
            .js
            .get_stream_no_info(stream_name)
            .await
            .map_err(EventLogError::unavailable)?;
        let info = stream.get_info().await.map_err(|err| {
            EventLogError::unavailable(format!("cannot read stream {stream_name}: {err}"))
        })?;
        Ok(info.state.last_sequence)
    }
}
