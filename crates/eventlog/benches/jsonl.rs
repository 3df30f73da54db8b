//! JSONL adapter throughput against the disk's own ceiling, measured in the same run on the
//! same file system.
//!
//! Run: `cargo bench -p eventlog --bench jsonl`. Figures for events whose envelope JSON is
//! 300 bytes:
//! (a) raw `write` + `fdatasync` of lines as long as the adapter's, in groups as large as the
//!     adapter's can be (one per append in flight) — the ceiling for (b);
//! (b) adapter appends: a window of single-event appends in flight across many aggregates,
//!     half with `ExpectedVersion::At`, half with `Any`, each acknowledged after its sync;
//! (c) raw read of the adapter's file in 1 MiB chunks, split into lines — the ceiling for (d);
//! (d) adapter replay, `read_from(Config, 0, None)`, every event parsed into a `RecordedEvent`;
//! (e) how long opening that file takes (the start-up scan that rebuilds the index);
//! (f) one append at a time (what a lone caller waits for), p50 and p99, against (g) one raw
//!     appending `write` + `fdatasync` of a line as long at a time. The adapter serialises
//!     and hands over to its writer thread and back, but writes over zeros it keeps ahead
//!     (see `jsonl::writer`), so its sync need not record a new file size as (g)'s must.
//!
//! The machine is shared (builds, other benchmarks, one disk), so the whole sequence runs
//! [`ROUNDS`] times; every round is printed and the best of each figure is the result. Each
//! ratio compares figures of the same round.
use std::{
    fs::File,
    io::{Read, Write},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use eventlog::{
    EventLog, ExpectedVersion, LogKind, Subject,
    jsonl::{JsonlLog, JsonlOptions},
};
use futures_util::StreamExt;
use proto::v1::{Envelope, ServerDisabled, envelope::Event};
use tokio::runtime::Runtime;

const ENVELOPE_JSON_BYTES: usize = 300;
const EVENTS: usize = 500_000;
const IN_FLIGHT: usize = 512;
const ROUNDS: usize = 3;
/// Appends (and raw syncs) one at a time for (f) and (g).
const ONE_AT_A_TIME: usize = 2_000;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// A `ServerDisabled` envelope whose proto3 JSON is `reason_len` characters longer than with
/// an empty reason.
fn event(server_id: &str, reason_len: usize) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::now_v7().to_string(),
        occurred_at: Some(proto::Timestamp {
            seconds: 1_764_000_000,
            nanos: 0,
        }),
        actor: None,
        correlation_id: uuid::Uuid::now_v7().to_string(),
        causation_id: String::new(),
        schema_version: proto::SCHEMA_VERSION,
        write_id: String::new(),
        event: Some(Event::ServerDisabled(ServerDisabled {
            server_id: server_id.to_owned(),
            reason: "r".repeat(reason_len),
        })),
    }
}

fn json_len(envelope: &Envelope) -> usize {
    serde_json::to_vec(envelope).map_or(0, |json| json.len())
}

fn server_id(writer: usize) -> String {
    format!("s{writer:04}")
}

fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

/// Events (or lines) per second of one round.
#[derive(Debug, Clone, Copy, Default)]
struct Round {
    raw_write: f64,
    append: f64,
    raw_read: f64,
    replay: f64,
    open: f64,
    /// (f) p50 and p99 of one append at a time, (g) p50 of one raw write and sync at a time.
    append_p50: Duration,
    append_p99: Duration,
    raw_sync_p50: Duration,
}

/// The median and the 99th percentile of `samples`.
fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn main() -> BenchResult<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Pad the reason until the envelope's JSON is ENVELOPE_JSON_BYTES long (an empty reason
    // is left out of the JSON entirely, so start from one character).
    let mut reason_len = 1;
    while json_len(&event(&server_id(0), reason_len)) < ENVELOPE_JSON_BYTES {
        reason_len += 1;
    }
    println!(
        "JSONL event log, {EVENTS} events, envelope JSON {} bytes, {IN_FLIGHT} appends in \
         flight, {} cores, best of {ROUNDS} rounds",
        json_len(&event(&server_id(0), reason_len)),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let mut rounds = Vec::with_capacity(ROUNDS);
    let mut line_len = 0;
    for number in 1..=ROUNDS {
        let dir = tempfile::tempdir()?;
        let (round, len) = run_round(&runtime, dir.path(), reason_len)?;
        line_len = len;
        println!(
            "  round {number}: raw write {:>9.0}/s  append {:>9.0}/s  raw read {:>10.0}/s  \
             replay {:>9.0}/s  open {:>9.0}/s  one append p50 {:.3} ms p99 {:.3} ms, one raw \
             sync p50 {:.3} ms",
            round.raw_write,
            round.append,
            round.raw_read,
            round.replay,
            round.open,
            ms(round.append_p50),
            ms(round.append_p99),
            ms(round.raw_sync_p50),
        );
        rounds.push(round);
    }
    let best = |figure: fn(&Round) -> f64| rounds.iter().map(figure).fold(0.0, f64::max);
    let best_ratio = |figure: fn(&Round) -> f64, ceiling: fn(&Round) -> f64| {
        rounds
            .iter()
            .map(|r| 100.0 * figure(r) / ceiling(r))
            .fold(0.0, f64::max)
    };

    println!(
        "(a) raw write+fdatasync, {line_len}-byte lines, {IN_FLIGHT} per sync: {:>10.0} lines/s",
        best(|r| r.raw_write)
    );
    println!(
        "(b) adapter append, durable, group commit:             {:>10.0} events/s, up to {:.0}% \
         of (a) in the same round",
        best(|r| r.append),
        best_ratio(|r| r.append, |r| r.raw_write)
    );
    println!(
        "(c) raw read + line split (page cache):                {:>10.0} lines/s",
        best(|r| r.raw_read)
    );
    println!(
        "(d) adapter replay read_from(Config, 0):               {:>10.0} events/s, up to {:.1}% \
         of (c) in the same round",
        best(|r| r.replay),
        best_ratio(|r| r.replay, |r| r.raw_read)
    );
    println!(
        "(e) open (start-up scan of the {EVENTS}-event file):   {:>10.0} events/s",
        best(|r| r.open)
    );
    let median = |figure: fn(&Round) -> Duration| {
        let mut values: Vec<Duration> = rounds.iter().map(figure).collect();
        values.sort();
        values[values.len() / 2]
    };
    let added: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.3}", ms(r.append_p50.saturating_sub(r.raw_sync_p50))))
        .collect();
    println!(
        "(f) one append at a time (median of rounds):          p50 {:.3} ms  p99 {:.3} ms",
        ms(median(|r| r.append_p50)),
        ms(median(|r| r.append_p99)),
    );
    println!(
        "(g) one raw write+fdatasync at a time:                p50 {:.3} ms; (f) - (g) by \
         round: {} ms",
        ms(median(|r| r.raw_sync_p50)),
        added.join(", "),
    );
    println!("targets: append >= 200000 events/s, replay >= 1000000 events/s");
    Ok(())
}

/// One round in a fresh directory; returns its figures and the adapter's line length.
fn run_round(runtime: &Runtime, dir: &Path, reason_len: usize) -> BenchResult<(Round, usize)> {
    let log_dir = dir.join("log");
    let log_file = log_dir.join("config.jsonl");

    // (b) adapter appends.
    let append_elapsed = runtime.block_on(append_events(&log_dir, reason_len))?;
    let line_len = std::fs::metadata(&log_file)?.len() as usize / EVENTS;

    // (a) the disk ceiling for the same bytes in groups of IN_FLIGHT.
    let raw_path = dir.join("raw.jsonl");
    let raw_write_elapsed = {
        let mut line = vec![b'x'; line_len - 1];
        line.push(b'\n');
        let group: Vec<u8> = line.repeat(IN_FLIGHT);
        let mut file = File::create(&raw_path)?;
        let started = Instant::now();
        let mut written = 0;
        while written < EVENTS {
            let lines = IN_FLIGHT.min(EVENTS - written);
            file.write_all(&group[..lines * line_len])?;
            file.sync_data()?;
            written += lines;
        }
        started.elapsed()
    };
    std::fs::remove_file(&raw_path)?;

    // (c) the read ceiling: the adapter's file, read and split into lines. Each write group
    // adds two lines (an empty one and its commit mark), and the file starts with a mark.
    let raw_read_elapsed = {
        let started = Instant::now();
        let mut file = File::open(&log_file)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut lines = 0usize;
        loop {
            let read = file.read(&mut buf)?;
            if read == 0 {
                break;
            }
            lines += memchr::memchr_iter(b'\n', &buf[..read]).count();
        }
        let marks = memchr::memmem::find_iter(&std::fs::read(&log_file)?, b"{\"commit\":").count();
        assert_eq!(lines - 2 * marks, EVENTS);
        started.elapsed()
    };

    // (d) adapter replay, (e) open.
    let (open_elapsed, replay_elapsed) = runtime.block_on(replay_events(&log_dir))?;

    // (f) one append at a time, (g) one raw write and sync at a time.
    let (append_p50, append_p99) =
        runtime.block_on(one_append_at_a_time(&dir.join("lone"), reason_len))?;
    let raw_sync_p50 = {
        let mut line = vec![b'x'; line_len - 1];
        line.push(b'\n');
        let mut file = File::create(&raw_path)?;
        let samples = (0..ONE_AT_A_TIME)
            .map(|_| {
                let begun = Instant::now();
                file.write_all(&line)?;
                file.sync_data()?;
                Ok(begun.elapsed())
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        std::fs::remove_file(&raw_path)?;
        percentiles(samples).0
    };

    Ok((
        Round {
            raw_write: per_second(EVENTS, raw_write_elapsed),
            append: per_second(EVENTS, append_elapsed),
            raw_read: per_second(EVENTS, raw_read_elapsed),
            replay: per_second(EVENTS, replay_elapsed),
            open: per_second(EVENTS, open_elapsed),
            append_p50,
            append_p99,
            raw_sync_p50,
        },
        line_len,
    ))
}

async fn append_events(log_dir: &Path, reason_len: usize) -> BenchResult<Duration> {
    let log = Arc::new(JsonlLog::open(log_dir, JsonlOptions::default()).await?);
    let started = Instant::now();
    let mut writers = Vec::with_capacity(IN_FLIGHT);
    for writer in 0..IN_FLIGHT {
        let log = log.clone();
        let appends = EVENTS / IN_FLIGHT + usize::from(writer < EVENTS % IN_FLIGHT);
        writers.push(tokio::spawn(async move {
            let id = server_id(writer);
            let subject = Subject::parse(&format!("server.{id}"))?;
            let mut version = 0;
            for _ in 0..appends {
                let expected = if writer % 2 == 0 {
                    ExpectedVersion::from_loaded(version)
                } else {
                    ExpectedVersion::Any
                };
                let outcome = log
                    .append(&subject, expected, &[event(&id, reason_len)])
                    .await?;
                version = outcome.last_sequence;
            }
            Ok::<_, eventlog::EventLogError>(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    let elapsed = started.elapsed();
    let last = log.last_sequence(LogKind::Config).await?;
    assert_eq!(last, EVENTS as u64, "every append stored once");
    log.close().await;
    Ok(elapsed)
}

async fn one_append_at_a_time(
    log_dir: &Path,
    reason_len: usize,
) -> BenchResult<(Duration, Duration)> {
    let log = JsonlLog::open(log_dir, JsonlOptions::default()).await?;
    let id = server_id(0);
    let subject = Subject::parse(&format!("server.{id}"))?;
    let mut samples = Vec::with_capacity(ONE_AT_A_TIME);
    for _ in 0..ONE_AT_A_TIME {
        let envelope = event(&id, reason_len);
        let begun = Instant::now();
        log.append(&subject, ExpectedVersion::Any, &[envelope])
            .await?;
        samples.push(begun.elapsed());
    }
    log.close().await;
    Ok(percentiles(samples))
}

async fn replay_events(log_dir: &Path) -> BenchResult<(Duration, Duration)> {
    let opening = Instant::now();
    let log = JsonlLog::open(log_dir, JsonlOptions::default()).await?;
    let open_elapsed = opening.elapsed();
    let started = Instant::now();
    let mut stream = log.read_from(LogKind::Config, 0, None).await?;
    let mut next = 1;
    while let Some(event) = stream.next().await {
        assert_eq!(event?.sequence, next, "replay in order");
        next += 1;
    }
    let elapsed = started.elapsed();
    assert_eq!(next - 1, EVENTS as u64, "every event replayed");
    log.close().await;
    Ok((open_elapsed, elapsed))
}
