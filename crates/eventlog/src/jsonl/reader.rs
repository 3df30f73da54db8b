//! Reading a log file: replays, aggregates and live subscriptions.
//!
//! Readers never touch the writer's state: they take positions from the index (which holds
//! acknowledged records only) and read the file with positioned reads on their own handle.
//! A replay is cut into pieces of about 1 MiB at record boundaries; a few pieces are read and
//! parsed at once on the blocking pool and handed out in order, so parsing (the costly part)
//! runs on every core while the consumer works through the previous piece. A small piece
//! with nothing ahead of it, which is what a live subscription reads at each commit, is read
//! in place (`INLINE_PIECE_BYTES`).
use std::{
    cell::RefCell,
    collections::VecDeque,
    future::Future,
    ops::Range,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use futures_util::{Stream, StreamExt, future::Either, stream};
use tokio::{sync::watch, task::JoinHandle};

use crate::{AggregateHistory, EventLogError, EventStream, RecordedEvent, Subject, SubjectFilter};

use super::{Head, LogShared, record};

const PIECE_BYTES: u64 = 1 << 20;
/// A piece this small with nothing read ahead of it is read on the task that asks for it:
/// the live tail of a subscription (a write group just committed, still in the page cache)
/// costs a few microseconds to read and parse, less than the hand-over to the blocking pool
/// and back, which every subscriber would pay at every commit.
const INLINE_PIECE_BYTES: u64 = 64 << 10;
/// Pieces being read and parsed ahead of the consumer.
const PIECES_IN_FLIGHT: usize = 3;

type Piece = Vec<Result<RecordedEvent, EventLogError>>;

/// The events `first..=last` (already committed), optionally filtered.
pub(super) fn read_range(
    shared: Arc<LogShared>,
    first: u64,
    last: u64,
    filter: Option<SubjectFilter>,
) -> EventStream {
    end_after_failure(RangeReader::new(shared, first, last, filter))
}

/// Ends a stream after its first error other than `Corrupt`: a failed read leaves a gap, and
/// handing out the events after it would let a consumer that logs and carries on miss events
/// silently (the JetStream adapter's streams end the same way). A `Corrupt` record is one
/// unreadable line; the stream goes on past it.
fn end_after_failure(
    events: impl futures_util::Stream<Item = Result<RecordedEvent, EventLogError>> + Send + 'static,
) -> EventStream {
    Box::pin(events.scan(false, |failed, item| {
        let item = (!*failed).then(|| {
            *failed =
                matches!(&item, Err(error) if !matches!(error, EventLogError::Corrupt { .. }));
            item
        });
        std::future::ready(item)
    }))
}

/// A stream over committed records. Written as a plain `Stream` (no per-event future): a
/// replay hands out a million events a second, and each is a 500-byte value.
struct RangeReader {
    shared: Arc<LogShared>,
    filter: Option<SubjectFilter>,
    pieces: VecDeque<Range<u64>>,
    in_flight: VecDeque<JoinHandle<Piece>>,
    current: std::vec::IntoIter<Result<RecordedEvent, EventLogError>>,
}

impl RangeReader {
    fn new(shared: Arc<LogShared>, first: u64, last: u64, filter: Option<SubjectFilter>) -> Self {
        let pieces = if first > last {
            VecDeque::new()
        } else {
            shared.read_index().pieces(first, last, PIECE_BYTES).into()
        };
        RangeReader {
            shared,
            filter,
            pieces,
            in_flight: VecDeque::new(),
            current: Vec::new().into_iter(),
        }
    }

    fn start_pieces(&mut self) {
        while self.in_flight.len() < PIECES_IN_FLIGHT
            && let Some(piece) = self.pieces.pop_front()
        {
            let shared = self.shared.clone();
            let filter = self.filter.clone();
            self.in_flight
                .push_back(tokio::task::spawn_blocking(move || {
                    read_piece(&shared, piece, filter.as_ref())
                }));
        }
    }
}

impl Stream for RangeReader {
    type Item = Result<RecordedEvent, EventLogError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(item) = this.current.next() {
                return Poll::Ready(Some(item));
            }
            if this.in_flight.is_empty()
                && let Some(piece) = this
                    .pieces
                    .pop_front_if(|piece| piece.end - piece.start <= INLINE_PIECE_BYTES)
            {
                this.current = read_piece(&this.shared, piece, this.filter.as_ref()).into_iter();
                continue;
            }
            this.start_pieces();
            let Some(job) = this.in_flight.front_mut() else {
                return Poll::Ready(None);
            };
            let result = ready!(Pin::new(job).poll(cx));
            this.in_flight.pop_front();
            match result {
                Ok(events) => this.current = events.into_iter(),
                Err(error) => {
                    // The pieces after a lost one cannot be handed out without a gap.
                    this.pieces.clear();
                    this.in_flight.clear();
                    return Poll::Ready(Some(Err(EventLogError::unavailable(format!(
                        "reading {} failed: {error}",
                        this.shared.path.display()
                    )))));
                }
            }
        }
    }
}

fn read_piece(shared: &LogShared, range: Range<u64>, filter: Option<&SubjectFilter>) -> Piece {
    thread_local! {
        // Each blocking thread keeps its read buffer, so a replay does not allocate (and
        // zero) a fresh megabyte per piece.
        static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    let mut out = Vec::new();
    BUFFER.with_borrow_mut(|bytes| {
        match shared.read_into(range.clone(), bytes) {
            Ok(()) => parse_lines(shared, range.start, bytes, filter, &mut out),
            Err(error) => out.push(Err(error)),
        }
        if bytes.capacity() > 4 * PIECE_BYTES as usize {
            *bytes = Vec::new();
        }
    });
    out
}

/// Decodes the records in `bytes` (whole lines read from `base`), in order.
fn parse_lines(
    shared: &LogShared,
    base: u64,
    bytes: &[u8],
    filter: Option<&SubjectFilter>,
    out: &mut Vec<Result<RecordedEvent, EventLogError>>,
) {
    out.reserve(bytes.len() / 300);
    let mut start = 0;
    while start < bytes.len() {
        let end = memchr::memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |n| start + n);
        let line = &bytes[start..end];
        if line.is_empty() || record::is_mark(line) {
            // Commit marks (after an empty line) sit between the records of a range; they
            // carry no event.
            start = end + 1;
            continue;
        }
        let location = || format!("{} byte {}", shared.path.display(), base + start as u64);
        match record::decode_line(shared.kind, line, filter, location) {
            Ok(Some(event)) => out.push(Ok(event)),
            Ok(None) => {}
            Err(error) => out.push(Err(error)),
        }
        start = end + 1;
    }
}

/// All events of one aggregate and its version.
pub(super) async fn read_aggregate(
    shared: Arc<LogShared>,
    subject: &Subject,
) -> Result<AggregateHistory, EventLogError> {
    // Runs of consecutive sequences are read with one positioned read each.
    let (version, runs) = {
        let index = shared.read_index();
        let sequences = index.aggregate(subject.as_str());
        let Some(&version) = sequences.last() else {
            return Ok(AggregateHistory::default());
        };
        let mut runs = vec![];
        let mut run: Option<(u64, u64)> = None;
        for &sequence in sequences {
            run = match run {
                Some((first, last)) if last + 1 == sequence => Some((first, sequence)),
                Some((first, last)) => {
                    runs.push(index.byte_range(first, last));
                    Some((sequence, sequence))
                }
                None => Some((sequence, sequence)),
            };
        }
        if let Some((first, last)) = run {
            runs.push(index.byte_range(first, last));
        }
        (version, runs)
    };
    let reader = shared.clone();
    let events = tokio::task::spawn_blocking(move || {
        let mut events = Vec::new();
        let mut bytes = Vec::new();
        for run in runs {
            reader.read_into(run.clone(), &mut bytes)?;
            parse_lines(&reader, run.start, &bytes, None, &mut events);
        }
        events.into_iter().collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| {
        EventLogError::unavailable(format!("reading {} failed: {e}", shared.path.display()))
    })??;
    Ok(AggregateHistory { version, events })
}

/// The events from `from` on, then every event as it is committed, each exactly once.
///
/// The subscription follows the writer's `head` (the last committed sequence): whenever it
/// is past what the subscriber has read, it reads the new records from the file. Reading from
/// the file instead of receiving events pushed by the writer means a slow subscriber can
/// never lag behind a buffer and lose events, and the stored and live parts cannot overlap or
/// leave a gap: both are the same read, continued from the next sequence.
pub(super) fn subscribe(
    shared: Arc<LogShared>,
    from: u64,
    filter: Option<SubjectFilter>,
) -> EventStream {
    let tail = Tail {
        head: shared.head.subscribe(),
        shared,
        next: from,
        filter,
        ended: false,
    };
    let ranges = stream::unfold(tail, |mut tail| async move {
        let range = tail.next_range().await?;
        Some((range, tail))
    });
    end_after_failure(ranges.flatten())
}

struct Tail {
    shared: Arc<LogShared>,
    head: watch::Receiver<Head>,
    /// The first sequence not yet read.
    next: u64,
    filter: Option<SubjectFilter>,
    ended: bool,
}

type Closing = stream::Iter<std::option::IntoIter<Result<RecordedEvent, EventLogError>>>;

impl Tail {
    /// Waits until there are records past those read, and reads them. After the writer has
    /// stopped and every record is read: one `Closed` error, then the end.
    async fn next_range(&mut self) -> Option<Either<RangeReader, Closing>> {
        if self.ended {
            return None;
        }
        loop {
            let head = *self.head.borrow_and_update();
            if head.last >= self.next {
                let range = RangeReader::new(
                    self.shared.clone(),
                    self.next,
                    head.last,
                    self.filter.clone(),
                );
                self.next = head.last + 1;
                return Some(Either::Left(range));
            }
            if head.closed || self.head.changed().await.is_err() {
                self.ended = true;
                return Some(Either::Right(stream::iter(Some(Err(
                    EventLogError::Closed,
                )))));
            }
        }
    }
}
