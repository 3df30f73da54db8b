//! Reading a log file: replays, aggregates and live subscriptions.
//!
//! Readers never touch the writer's state: they take positions from the index (which holds
//! acknowledged records only) and read the file with positioned reads on their own handle.
//! A replay is cut into pieces of about 1 MiB at record boundaries; a few pieces are read and
//! parsed at once on the blocking pool and handed out in order, so parsing (the costly part)
//! runs on every core while the consumer works through the previous piece.
use std::{collections::VecDeque, ops::Range, sync::Arc};

use futures_util::stream;
use tokio::{sync::watch, task::JoinHandle};

use crate::{AggregateHistory, EventLogError, EventStream, RecordedEvent, Subject, SubjectFilter};

use super::{Head, LogShared, record};

const PIECE_BYTES: u64 = 1 << 20;
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
    let reader = RangeReader::new(shared, first, last, filter);
    Box::pin(stream::unfold(reader, |mut reader| async move {
        reader.next().await.map(|item| (item, reader))
    }))
}

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

    async fn next(&mut self) -> Option<Result<RecordedEvent, EventLogError>> {
        loop {
            if let Some(item) = self.current.next() {
                return Some(item);
            }
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
            let job = self.in_flight.pop_front()?;
            match job.await {
                Ok(events) => self.current = events.into_iter(),
                Err(error) => {
                    // The pieces after a lost one cannot be handed out without a gap.
                    self.pieces.clear();
                    self.in_flight.clear();
                    return Some(Err(EventLogError::unavailable(format!(
                        "reading {} failed: {error}",
                        self.shared.path.display()
                    ))));
                }
            }
        }
    }
}

fn read_piece(shared: &LogShared, range: Range<u64>, filter: Option<&SubjectFilter>) -> Piece {
    let mut out = Vec::new();
    match shared.read_bytes(range.clone()) {
        Ok(bytes) => parse_lines(shared, range.start, &bytes, filter, &mut out),
        Err(error) => out.push(Err(error)),
    }
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
        let location = || format!("{} byte {}", shared.path.display(), base + start as u64);
        match record::decode_line(shared.kind, &bytes[start..end], filter, location) {
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
        for run in runs {
            let bytes = reader.read_bytes(run.clone())?;
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
        current: None,
        ended: false,
    };
    Box::pin(stream::unfold(tail, |mut tail| async move {
        tail.next().await.map(|item| (item, tail))
    }))
}

struct Tail {
    shared: Arc<LogShared>,
    head: watch::Receiver<Head>,
    /// The first sequence not yet read.
    next: u64,
    filter: Option<SubjectFilter>,
    current: Option<RangeReader>,
    ended: bool,
}

impl Tail {
    async fn next(&mut self) -> Option<Result<RecordedEvent, EventLogError>> {
        loop {
            if self.ended {
                return None;
            }
            if let Some(current) = &mut self.current {
                if let Some(item) = current.next().await {
                    return Some(item);
                }
                self.current = None;
            }
            let head = *self.head.borrow_and_update();
            if head.last >= self.next {
                self.current = Some(RangeReader::new(
                    self.shared.clone(),
                    self.next,
                    head.last,
                    self.filter.clone(),
                ));
                self.next = head.last + 1;
                continue;
            }
            if head.closed || self.head.changed().await.is_err() {
                self.ended = true;
                return Some(Err(EventLogError::Closed));
            }
        }
    }
}
