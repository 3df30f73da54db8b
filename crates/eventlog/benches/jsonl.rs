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
//! (d) adapter replay, `read_from(Config, 0, None)`, every event parsed into a `RecordedEvent`.
use std::{
    fs::File,
    io::{Read, Write},
    sync::Arc,
    time::{Duration, Instant},
};

use eventlog::{
    EventLog, ExpectedVersion, LogKind, Subject,
    jsonl::{JsonlLog, JsonlOptions},
};
use futures_util::StreamExt;
use proto::v1::{Envelope, ServerDisabled, envelope::Event};

const ENVELOPE_JSON_BYTES: usize = 300;
const EVENTS: usize = 500_000;
const IN_FLIGHT: usize = 512;

/// A `ServerDisabled` envelope whose proto3 JSON is [`ENVELOPE_JSON_BYTES`] long.
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let reason_len = ENVELOPE_JSON_BYTES.saturating_sub(json_len(&event(&server_id(0), 0)));
    let sample = event(&server_id(0), reason_len);
    println!(
        "JSONL event log, {EVENTS} events, envelope JSON {} bytes, {IN_FLIGHT} appends in flight, \
         {} cores",
        json_len(&sample),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // (b) adapter appends.
    let log_dir = dir.path().join("log");
    let (append_elapsed, line_len) = runtime.block_on(async {
        let log = Arc::new(JsonlLog::open(&log_dir, JsonlOptions::default()).await?);
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
        let file_len = std::fs::metadata(log_dir.join("config.jsonl"))?.len();
        Ok::<_, Box<dyn std::error::Error>>((elapsed, file_len as usize / EVENTS))
    })?;

    // (a) the disk ceiling for the same bytes in groups of IN_FLIGHT.
    let raw_path = dir.path().join("raw.jsonl");
    let raw_elapsed = {
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

    let append_rate = per_second(EVENTS, append_elapsed);
    let raw_rate = per_second(EVENTS, raw_elapsed);
    println!(
        "(a) raw write+fdatasync, {line_len}-byte lines, {IN_FLIGHT} per sync: {:>10.0} lines/s  ({:.2} s)",
        raw_rate,
        raw_elapsed.as_secs_f64()
    );
    println!(
        "(b) adapter append, durable, group commit:            {:>10.0} events/s ({:.2} s), {:.0}% of (a)",
        append_rate,
        append_elapsed.as_secs_f64(),
        100.0 * append_rate / raw_rate
    );

    // (c) the read ceiling: the adapter's file, read and split into lines.
    let log_file = log_dir.join("config.jsonl");
    let (raw_read_elapsed, raw_lines) = {
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
        (started.elapsed(), lines)
    };
    assert_eq!(raw_lines, EVENTS);

    // (d) adapter replay.
    let (replay_elapsed, replayed) = runtime.block_on(async {
        let log = JsonlLog::open(&log_dir, JsonlOptions::default()).await?;
        let started = Instant::now();
        let mut stream = log.read_from(LogKind::Config, 0, None).await?;
        let mut count = 0usize;
        let mut next = 1;
        while let Some(event) = stream.next().await {
            let event = event?;
            assert_eq!(event.sequence, next, "replay in order");
            next += 1;
            count += 1;
        }
        let elapsed = started.elapsed();
        log.close().await;
        Ok::<_, Box<dyn std::error::Error>>((elapsed, count))
    })?;
    assert_eq!(replayed, EVENTS);

    let raw_read_rate = per_second(EVENTS, raw_read_elapsed);
    let replay_rate = per_second(EVENTS, replay_elapsed);
    println!(
        "(c) raw read + line split (page cache):              {:>10.0} lines/s  ({:.2} s)",
        raw_read_rate,
        raw_read_elapsed.as_secs_f64()
    );
    println!(
        "(d) adapter replay read_from(Config, 0):              {:>10.0} events/s ({:.2} s), {:.1}% of (c)",
        replay_rate,
        replay_elapsed.as_secs_f64(),
        100.0 * replay_rate / raw_read_rate
    );
    println!("targets: append >= 200000 events/s, replay >= 1000000 events/s");
    Ok(())
}
