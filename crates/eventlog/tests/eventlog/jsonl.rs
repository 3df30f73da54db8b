//! The JSONL file adapter: the conformance suite, plus what only a file can get wrong —
//! torn tails after a crash, corruption, reopening, and two processes on one directory.
use std::{path::Path, sync::Arc, time::Duration};

use eventlog::{
    EventLog, EventLogError, ExpectedVersion, LogKind, RecordedEvent, UnknownBody,
    jsonl::{JsonlLog, JsonlOptions},
};
use futures_util::StreamExt;

use crate::support::{TestLog, event, subject};

/// Guard against a hang; never used to wait for something to happen.
pub(crate) const GUARD: Duration = Duration::from_secs(30);

async fn open_jsonl() -> TestLog {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open(dir.path()).await;
    TestLog {
        log: Arc::new(log),
        _guard: Box::new(dir),
    }
}

crate::conformance_suite!(open_jsonl());

pub(crate) async fn open(dir: &Path) -> JsonlLog {
    JsonlLog::open(dir, JsonlOptions::default())
        .await
        .expect("open the JSONL log")
}

pub(crate) async fn replay(log: &JsonlLog, kind: LogKind) -> Vec<RecordedEvent> {
    let stream = log.read_from(kind, 0, None).await.expect("read_from");
    tokio::time::timeout(GUARD, stream.map(|r| r.expect("event")).collect::<Vec<_>>())
        .await
        .expect("replay stalled")
}

pub(crate) fn ids_and_sequences(events: &[RecordedEvent]) -> Vec<(u64, String)> {
    events
        .iter()
        .map(|e| (e.sequence, e.envelope.event_id.clone()))
        .collect()
}

/// What the writer has written to `path`, without the zeros it keeps ahead of its writes
/// while the log is open.
pub(crate) fn written(path: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).expect("read the log file");
    let end = bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |last| last + 1);
    bytes.truncate(end);
    bytes
}

pub(crate) fn config_file(dir: &Path) -> std::path::PathBuf {
    dir.join("config.jsonl")
}

/// Writes `records` through the adapter and returns the file's bytes, the byte offset where
/// the last append starts, and what was stored before it.
pub(crate) async fn file_ending_in(last_append: usize) -> (Vec<u8>, usize, Vec<(u64, String)>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open(dir.path()).await;
    let s = subject("server.torn");
    for _ in 0..3 {
        log.append(&s, ExpectedVersion::Any, &[event("torn")])
            .await
            .expect("append");
    }
    let kept = ids_and_sequences(&replay(&log, LogKind::Config).await);
    let before = written(&config_file(dir.path())).len();
    let batch: Vec<_> = (0..last_append).map(|_| event("torn")).collect();
    log.append(&s, ExpectedVersion::Any, &batch)
        .await
        .expect("last append");
    log.close().await;
    let bytes = std::fs::read(config_file(dir.path())).expect("read file");
    (bytes, before, kept)
}

/// For every cut inside the last append: start-up keeps exactly the earlier records, and the
/// log takes the next append at the next sequence, which a further reopen still sees.
async fn every_cut_inside_the_last_append_recovers(last_append: usize) {
    let (bytes, last_start, kept) = file_ending_in(last_append).await;
    assert!(
        bytes.len() > last_start + 100,
        "the last append has some size"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    for cut in last_start + 1..bytes.len() {
        assert_recovers(
            dir.path(),
            &bytes[..cut],
            last_start,
            &kept,
            &format!("cut at byte {cut}"),
        )
        .await;
    }
}

/// Writes `file` as the config log in `dir` and checks that it holds an unfinished last write
/// group starting at `last_start`: a read-only open leaves it out and changes nothing, the
/// writer's open keeps exactly `kept` and cuts the file back to `last_start`, and the log then
/// takes the next append at the next sequence, which a further reopen still sees.
pub(crate) async fn assert_recovers(
    dir: &Path,
    file: &[u8],
    last_start: usize,
    kept: &[(u64, String)],
    what: &str,
) {
    let path = config_file(dir);
    std::fs::write(&path, file).expect("write the damaged file");
    let auditor = JsonlLog::open_read_only(dir)
        .await
        .unwrap_or_else(|e| panic!("read-only open ({what}): {e}"));
    assert_eq!(
        ids_and_sequences(&replay(&auditor, LogKind::Config).await),
        kept,
        "{what}, read-only"
    );
    drop(auditor);
    assert_eq!(
        std::fs::read(&path).expect("read"),
        file,
        "{what}: a read-only open changes nothing"
    );

    let log = JsonlLog::open(dir, JsonlOptions::default())
        .await
        .unwrap_or_else(|e| panic!("open ({what}): {e}"));
    let recovered = replay(&log, LogKind::Config).await;
    assert_eq!(ids_and_sequences(&recovered), kept, "{what}");
    assert_eq!(
        std::fs::metadata(&path).expect("metadata").len(),
        last_start as u64,
        "the unfinished write group is cut off the file ({what})"
    );

    let next = event("torn");
    let outcome = log
        .append(
            &subject("server.torn"),
            ExpectedVersion::At(kept.len() as u64),
            std::slice::from_ref(&next),
        )
        .await
        .unwrap_or_else(|e| panic!("the recovered log is appendable ({what}): {e}"));
    assert_eq!(outcome.first_sequence, kept.len() as u64 + 1);
    log.close().await;
    drop(log);

    let reopened = open(dir).await;
    let after = ids_and_sequences(&replay(&reopened, LogKind::Config).await);
    let mut expected = kept.to_vec();
    expected.push((kept.len() as u64 + 1, next.event_id.clone()));
    assert_eq!(after, expected, "{what}, after reopening");
    reopened.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_record_is_dropped_at_start_up_and_the_log_stays_appendable() {
    every_cut_inside_the_last_append_recovers(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_last_batch_is_dropped_whole_at_start_up() {
    every_cut_inside_the_last_append_recovers(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_line_in_the_middle_fails_the_open_and_names_the_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open(dir.path()).await;
    for _ in 0..5 {
        log.append(&subject("server.c"), ExpectedVersion::Any, &[event("c")])
            .await
            .expect("append");
    }
    log.close().await;
    drop(log);

    let path = config_file(dir.path());
    let original = std::fs::read(&path).expect("read");
    let mut lines: Vec<Vec<u8>> = original
        .split_inclusive(|b| *b == b'\n')
        .map(<[u8]>::to_vec)
        .collect();
    // The mark that starts the file, then each append's record and commit mark (each mark
    // after an empty line).
    assert_eq!(lines.len(), 17);
    let third_record = 8;
    let middle = lines[third_record].len() / 2;
    lines[third_record][middle..middle + 4].copy_from_slice(b"\x00#!{");
    let damaged = lines.concat();
    std::fs::write(&path, &damaged).expect("write");

    let err = JsonlLog::open(dir.path(), JsonlOptions::default())
        .await
        .expect_err("a corrupt middle line fails the open");
    match &err {
        EventLogError::Corrupt { location, .. } => {
            assert!(location.contains("config.jsonl"), "{err}");
            assert!(location.ends_with("line 9"), "{err}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert_eq!(
        std::fs::read(&path).expect("read"),
        damaged,
        "nothing is dropped"
    );

    // The same damage in the last line is what a crash mid-write leaves: that line is cut.
    lines.truncate(third_record + 1);
    std::fs::write(&path, lines.concat()).expect("write");
    let log = open(dir.path()).await;
    assert_eq!(log.last_sequence(LogKind::Config).await.expect("last"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_events_versions_and_event_ids_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = subject("server.keep");
    let first_batch = [event("keep"), event("keep")];
    let (original, invocation) = {
        let log = open(dir.path()).await;
        let original = log
            .append(&s, ExpectedVersion::NoEvents, &first_batch)
            .await
            .expect("append");
        let invocation = log
            .append(
                &subject("invocation.u_a"),
                ExpectedVersion::Any,
                &[event("x")],
            )
            .await
            .expect("append invocation");
        log.close().await;
        (original, invocation)
    };

    let log = open(dir.path()).await;
    assert_eq!(log.last_sequence(LogKind::Config).await.expect("last"), 2);
    assert_eq!(
        log.last_sequence(LogKind::Invocations).await.expect("last"),
        1
    );
    assert_eq!(invocation.first_sequence, 1);
    let history = log.read_aggregate(&s).await.expect("read");
    assert_eq!(history.version, original.last_sequence);
    let ids: Vec<_> = history
        .events
        .iter()
        .map(|e| e.envelope.event_id.clone())
        .collect();
    assert_eq!(
        ids,
        first_batch
            .iter()
            .map(|e| e.event_id.clone())
            .collect::<Vec<_>>()
    );

    // A retry of the append made before the restart is still recognised.
    let retried = log
        .append(&s, ExpectedVersion::NoEvents, &first_batch)
        .await
        .expect("retry");
    assert!(retried.duplicate);
    assert_eq!(
        (retried.first_sequence, retried.last_sequence),
        (original.first_sequence, original.last_sequence)
    );
    // Optimistic concurrency goes on from the stored versions.
    let err = log
        .append(&s, ExpectedVersion::NoEvents, &[event("keep")])
        .await
        .expect_err("stale version");
    assert!(err.is_conflict(), "{err}");
    let next = log
        .append(&s, ExpectedVersion::At(history.version), &[event("keep")])
        .await
        .expect("append at the stored version");
    assert_eq!(next.first_sequence, 3);
    let next = log
        .append(
            &subject("invocation.u_a"),
            ExpectedVersion::At(1),
            &[event("x")],
        )
        .await
        .expect("append invocation");
    assert_eq!(next.first_sequence, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_naming_one_event_id_twice_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open(dir.path()).await;
    let s = subject("server.partial");
    let twice = event("p");
    let err = log
        .append(&s, ExpectedVersion::Any, &[twice.clone(), twice])
        .await
        .expect_err("one event id twice in an append");
    assert!(matches!(err, EventLogError::InvalidEvent { .. }), "{err}");
    assert_eq!(log.read_aggregate(&s).await.expect("read").version, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = open(dir.path()).await;
    let err = JsonlLog::open(dir.path(), JsonlOptions::default())
        .await
        .expect_err("the directory is in use");
    assert!(err.to_string().contains("already open"), "{err}");

    // Once the first handle is gone, the directory can be opened again.
    drop(first);
    let again = open(dir.path()).await;
    again
        .append(&subject("server.x"), ExpectedVersion::Any, &[event("x")])
        .await
        .expect("append");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_an_unknown_type_is_read_back_as_stored() {
    let dir = tempfile::tempdir().expect("temp dir");
    let id = uuid::Uuid::now_v7().to_string();
    let envelope = format!(
        r#"{{"eventId":"{id}","occurredAt":"2025-11-24T16:00:00Z","schemaVersion":2,"someFutureEvent":{{"x":1}}}}"#
    );
    let line = format!(
        r#"{{"seq":1,"subject":"server.future","type":"SomeFutureEvent","envelope":{envelope}}}"#
    );
    std::fs::write(config_file(dir.path()), format!("{line}\n")).expect("write");

    let log = open(dir.path()).await;
    let events = replay(&log, LogKind::Config).await;
    assert_eq!(events.len(), 1);
    let event = &events[0];
    assert_eq!(event.sequence, 1);
    assert_eq!(event.subject.as_str(), "server.future");
    assert_eq!(event.event_type, "SomeFutureEvent");
    assert_eq!(event.envelope.event_id, id);
    assert_eq!(event.envelope.schema_version, 2);
    assert!(event.envelope.event.is_none());
    assert_eq!(event.unknown_body, Some(UnknownBody::Json(envelope.into())));

    let history = log
        .read_aggregate(&subject("server.future"))
        .await
        .expect("read");
    assert_eq!(history.events, events);
    let next = log
        .append(
            &subject("server.future"),
            ExpectedVersion::At(1),
            &[crate::support::event("f")],
        )
        .await
        .expect("append after it");
    assert_eq!(next.first_sequence, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_ends_subscriptions_after_every_stored_event_and_refuses_appends() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open(dir.path()).await;
    let mut live = log
        .subscribe(LogKind::Config, 0, None)
        .await
        .expect("subscribe");
    let stored = log
        .append(&subject("server.z"), ExpectedVersion::Any, &[event("z")])
        .await
        .expect("append");
    log.close().await;

    let next = tokio::time::timeout(GUARD, live.next())
        .await
        .expect("subscriber stalled")
        .expect("an item")
        .expect("the stored event");
    assert_eq!(next.sequence, stored.first_sequence);
    let end = tokio::time::timeout(GUARD, live.next())
        .await
        .expect("subscriber stalled")
        .expect("an item");
    assert!(matches!(end, Err(EventLogError::Closed)), "{end:?}");
    assert!(live.next().await.is_none());

    let err = log
        .append(&subject("server.z"), ExpectedVersion::Any, &[event("z")])
        .await
        .expect_err("closed");
    assert!(matches!(err, EventLogError::Closed), "{err}");
    assert_eq!(
        replay(&log, LogKind::Config).await.len(),
        1,
        "reads still work"
    );
}

pub(crate) async fn open_read_only(dir: &Path) -> JsonlLog {
    JsonlLog::open_read_only(dir)
        .await
        .expect("open the JSONL log read-only")
}

fn assert_read_only_error(err: &EventLogError) {
    assert!(matches!(err, EventLogError::ReadOnly { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("read-only"), "{message}");
    assert!(message.contains("running Switchboard"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_open_reads_what_the_running_writer_has_appended() {
    let dir = tempfile::tempdir().expect("temp dir");
    let writer = open(dir.path()).await;
    let s = subject("server.audit");
    writer
        .append(&s, ExpectedVersion::NoEvents, &[event("a"), event("a")])
        .await
        .expect("append a batch");
    writer
        .append(
            &subject("server.other"),
            ExpectedVersion::Any,
            &[event("b")],
        )
        .await
        .expect("append");
    writer
        .append(
            &subject("invocation.u_a"),
            ExpectedVersion::Any,
            &[event("x")],
        )
        .await
        .expect("append invocation");

    // The writer holds the directory; the auditor gets in anyway.
    let auditor = open_read_only(dir.path()).await;
    assert!(auditor.is_read_only());
    assert!(!writer.is_read_only());
    let stored = replay(&writer, LogKind::Config).await;
    let seen = replay(&auditor, LogKind::Config).await;
    assert_eq!(ids_and_sequences(&seen), ids_and_sequences(&stored));
    assert_eq!(
        seen.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(seen, stored);
    assert_eq!(
        auditor.last_sequence(LogKind::Config).await.expect("last"),
        3
    );
    assert_eq!(
        ids_and_sequences(&replay(&auditor, LogKind::Invocations).await),
        ids_and_sequences(&replay(&writer, LogKind::Invocations).await)
    );
    let history = auditor.read_aggregate(&s).await.expect("read aggregate");
    assert_eq!(history.version, 2);
    assert_eq!(history, writer.read_aggregate(&s).await.expect("read"));

    // Appends through the auditor are refused, and write nothing.
    let err = auditor
        .append(&s, ExpectedVersion::At(2), &[event("a")])
        .await
        .expect_err("a read-only log takes no appends");
    assert_read_only_error(&err);
    let err = auditor
        .append(
            &subject("invocation.u_a"),
            ExpectedVersion::Any,
            &[event("x")],
        )
        .await
        .expect_err("a read-only log takes no appends");
    assert_read_only_error(&err);
    auditor.close().await;

    // The writer is undisturbed: it still holds the lock and appends at the next sequence.
    let err = JsonlLog::open(dir.path(), JsonlOptions::default())
        .await
        .expect_err("the writer still holds the directory");
    assert!(err.to_string().contains("already open"), "{err}");
    let next = writer
        .append(&s, ExpectedVersion::At(2), &[event("a")])
        .await
        .expect("the writer appends on");
    assert_eq!(next.first_sequence, 4);

    // The auditor's log is a snapshot; a new read-only open sees the new event.
    assert_eq!(
        auditor.last_sequence(LogKind::Config).await.expect("last"),
        3
    );
    assert_eq!(replay(&auditor, LogKind::Config).await.len(), 3);
    let later = open_read_only(dir.path()).await;
    assert_eq!(later.last_sequence(LogKind::Config).await.expect("last"), 4);
    assert_eq!(
        ids_and_sequences(&replay(&later, LogKind::Config).await),
        ids_and_sequences(&replay(&writer, LogKind::Config).await)
    );

    // A subscription on the snapshot delivers it from its start position, then ends.
    let live = auditor
        .subscribe(LogKind::Config, 2, None)
        .await
        .expect("subscribe");
    let items = tokio::time::timeout(GUARD, live.collect::<Vec<_>>())
        .await
        .expect("a read-only subscription ends");
    assert_eq!(items.len(), 3, "{items:?}");
    let sequences: Vec<_> = items[..2]
        .iter()
        .map(|item| item.as_ref().expect("event").sequence)
        .collect();
    assert_eq!(sequences, [2, 3]);
    assert!(matches!(items[2], Err(EventLogError::Closed)), "{items:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_open_sees_only_complete_appends_while_the_writer_appends() {
    let dir = tempfile::tempdir().expect("temp dir");
    let writer = Arc::new(open(dir.path()).await);
    let appender = {
        let writer = writer.clone();
        tokio::spawn(async move {
            for _ in 0..300 {
                let batch: Vec<_> = (0..3).map(|_| event("busy")).collect();
                writer
                    .append(&subject("server.busy"), ExpectedVersion::Any, &batch)
                    .await
                    .expect("append");
            }
        })
    };
    let mut seen = 0;
    while !appender.is_finished() {
        let auditor = open_read_only(dir.path()).await;
        let events = replay(&auditor, LogKind::Config).await;
        let last = auditor.last_sequence(LogKind::Config).await.expect("last");
        assert_eq!(events.len() as u64, last);
        assert!(
            events.iter().zip(1..).all(|(e, n)| e.sequence == n),
            "sequences are contiguous"
        );
        assert_eq!(last % 3, 0, "only whole batches are in a snapshot");
        assert!(last >= seen, "a later snapshot has no fewer events");
        seen = last;
    }
    appender.await.expect("appender");
    let auditor = open_read_only(dir.path()).await;
    assert_eq!(
        auditor.last_sequence(LogKind::Config).await.expect("last"),
        900
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_open_leaves_an_unfinished_tail_out_and_the_file_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = config_file(dir.path());
    let s = subject("server.tail");
    let (kept, kept_len) = {
        let writer = open(dir.path()).await;
        for _ in 0..2 {
            writer
                .append(&s, ExpectedVersion::Any, &[event("t")])
                .await
                .expect("append");
        }
        let kept = ids_and_sequences(&replay(&writer, LogKind::Config).await);
        let kept_len = written(&path).len();
        writer
            .append(
                &s,
                ExpectedVersion::Any,
                &[event("t"), event("t"), event("t")],
            )
            .await
            .expect("append a batch");
        writer.close().await;
        (kept, kept_len)
    };
    let full = std::fs::read(&path).expect("read");
    let batch_lines: Vec<usize> = full[kept_len..]
        .split_inclusive(|b| *b == b'\n')
        .map(<[u8]>::len)
        .collect();
    // Three records and the group's commit mark after an empty line.
    assert_eq!(batch_lines.len(), 5);
    let cuts = [
        // Half of the batch's first line: a torn last line.
        kept_len + batch_lines[0] / 2,
        // The first line of the batch: an incomplete batch.
        kept_len + batch_lines[0],
        // One line and a half of it: both.
        kept_len + batch_lines[0] + batch_lines[1] / 2,
        // The whole batch without its commit mark.
        kept_len + batch_lines[0] + batch_lines[1] + batch_lines[2],
    ];
    for cut in cuts {
        let tail = &full[..cut];
        std::fs::write(&path, tail).expect("write the torn file");

        let auditor = open_read_only(dir.path()).await;
        assert_eq!(
            ids_and_sequences(&replay(&auditor, LogKind::Config).await),
            kept,
            "cut at byte {cut}"
        );
        assert_eq!(
            auditor.last_sequence(LogKind::Config).await.expect("last"),
            2
        );
        assert_eq!(auditor.read_aggregate(&s).await.expect("read").version, 2);
        drop(auditor);
        assert_eq!(
            std::fs::read(&path).expect("read"),
            tail,
            "a read-only open changes nothing (cut at byte {cut})"
        );

        // A normal open still recovers the same file.
        let writer = open(dir.path()).await;
        assert_eq!(
            writer.last_sequence(LogKind::Config).await.expect("last"),
            2
        );
        assert_eq!(
            std::fs::metadata(&path).expect("metadata").len(),
            kept_len as u64,
            "the writer's open cuts the unfinished append off (cut at byte {cut})"
        );
        writer.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_open_fails_on_damage_in_the_middle() {
    let dir = tempfile::tempdir().expect("temp dir");
    let writer = open(dir.path()).await;
    for _ in 0..3 {
        writer
            .append(&subject("server.c"), ExpectedVersion::Any, &[event("c")])
            .await
            .expect("append");
    }
    writer.close().await;
    drop(writer);
    let path = config_file(dir.path());
    let mut lines: Vec<Vec<u8>> = std::fs::read(&path)
        .expect("read")
        .split_inclusive(|b| *b == b'\n')
        .map(<[u8]>::to_vec)
        .collect();
    let middle = lines[1].len() / 2;
    lines[1][middle..middle + 4].copy_from_slice(b"\x00#!{");
    let damaged = lines.concat();
    std::fs::write(&path, &damaged).expect("write");

    let err = JsonlLog::open_read_only(dir.path())
        .await
        .expect_err("a corrupt middle line fails the read-only open too");
    match &err {
        EventLogError::Corrupt { location, .. } => {
            assert!(location.ends_with("config.jsonl line 2"), "{err}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert_eq!(std::fs::read(&path).expect("read"), damaged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_open_reads_missing_log_files_as_empty_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let auditor = open_read_only(dir.path()).await;
    for kind in [LogKind::Config, LogKind::Invocations] {
        assert_eq!(auditor.last_sequence(kind).await.expect("last"), 0);
        assert!(replay(&auditor, kind).await.is_empty());
        let live = auditor.subscribe(kind, 0, None).await.expect("subscribe");
        let items = tokio::time::timeout(GUARD, live.collect::<Vec<_>>())
            .await
            .expect("a read-only subscription ends");
        assert!(
            matches!(items.as_slice(), [Err(EventLogError::Closed)]),
            "{items:?}"
        );
    }
    let history = auditor
        .read_aggregate(&subject("server.none"))
        .await
        .expect("read");
    assert_eq!(history.version, 0);
    assert!(history.events.is_empty());
    let err = auditor
        .append(&subject("server.none"), ExpectedVersion::Any, &[event("n")])
        .await
        .expect_err("read-only");
    assert_read_only_error(&err);
    drop(auditor);
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("list").count(),
        0,
        "no lock file, no log file"
    );

    // One log file there, the other not (yet).
    let s = subject("server.one");
    {
        let writer = open(dir.path()).await;
        writer
            .append(&s, ExpectedVersion::Any, &[event("one")])
            .await
            .expect("append");
        writer.close().await;
    }
    std::fs::remove_file(dir.path().join("invocations.jsonl")).expect("remove");
    let auditor = open_read_only(dir.path()).await;
    assert_eq!(
        auditor.last_sequence(LogKind::Config).await.expect("last"),
        1
    );
    assert_eq!(auditor.read_aggregate(&s).await.expect("read").version, 1);
    assert_eq!(
        auditor
            .last_sequence(LogKind::Invocations)
            .await
            .expect("last"),
        0
    );
    assert!(replay(&auditor, LogKind::Invocations).await.is_empty());
    assert!(!dir.path().join("invocations.jsonl").exists());

    // A directory that is not there at all is an error, and is not created.
    let missing = dir.path().join("no-such-dir");
    let err = JsonlLog::open_read_only(&missing)
        .await
        .expect_err("no directory");
    assert!(matches!(err, EventLogError::Io { .. }), "{err}");
    assert!(!missing.exists());
}

#[cfg(unix)]
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// Invocation events hold tool arguments: the log's directory and files are the owner's
/// alone, also when an earlier version created them with the default umask.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_directory_and_files_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data").join("events");
    let files = ["config.jsonl", "invocations.jsonl", "eventlog.lock"];
    let log = open(&dir).await;
    log.close().await;
    drop(log);
    assert_eq!(mode_of(&dir), 0o700, "the log directory");
    assert_eq!(
        mode_of(&tmp.path().join("data")),
        0o700,
        "a parent it created"
    );
    for file in files {
        assert_eq!(mode_of(&dir.join(file)), 0o600, "{file}");
    }

    // Made readable by others (as an earlier version left them), they are tightened at open.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for file in files {
        std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
    }
    let log = open(&dir).await;
    assert_eq!(mode_of(&dir), 0o700);
    for file in files {
        assert_eq!(mode_of(&dir.join(file)), 0o600, "{file}, reopened");
    }
    log.close().await;
}

/// The file as a crash would leave it after `appends` single-event appends (the log still
/// open, so with the zeros its writer keeps ahead), and where each append's write group
/// ended.
async fn file_of_an_open_log(
    dir: &Path,
    appends: usize,
) -> (Vec<u8>, Vec<usize>, Vec<(u64, String)>) {
    let log = open(dir).await;
    let s = subject("server.torn");
    let mut ends = Vec::new();
    for _ in 0..appends {
        log.append(&s, ExpectedVersion::Any, &[event("ahead")])
            .await
            .expect("append");
        ends.push(written(&config_file(dir)).len());
    }
    let kept = ids_and_sequences(&replay(&log, LogKind::Config).await);
    let bytes = std::fs::read(config_file(dir)).expect("read");
    drop(log);
    (bytes, ends, kept)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zeros_the_writer_keeps_ahead_are_space_after_a_crash_and_gone_at_rest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (crashed, ends, kept) = file_of_an_open_log(dir.path(), 5).await;
    let last = *ends.last().expect("appends");
    assert!(
        crashed.len() > last && crashed[last..].iter().all(|&b| b == 0),
        "while the log is open its file runs on in zeros past the last commit mark"
    );
    // At rest (closed or dropped), the file is its JSON lines alone.
    assert_eq!(
        std::fs::read(config_file(dir.path())).expect("read").len(),
        last
    );

    // Opened as a crash left it: every record, the zeros read as space and reused.
    let copy = tempfile::tempdir().expect("temp dir");
    std::fs::write(config_file(copy.path()), &crashed).expect("write");
    let log = open(copy.path()).await;
    assert_eq!(
        ids_and_sequences(&replay(&log, LogKind::Config).await),
        kept
    );
    let next = log
        .append(
            &subject("server.torn"),
            ExpectedVersion::Any,
            &[event("ahead")],
        )
        .await
        .expect("append after the zeros");
    assert_eq!(next.last_sequence, kept.len() as u64 + 1);
    drop(log);
    let log = open(copy.path()).await;
    assert_eq!(
        replay(&log, LogKind::Config).await.len(),
        kept.len() + 1,
        "the append went over the zeros, not after them"
    );
    let auditor = open_read_only(copy.path()).await;
    assert_eq!(
        replay(&auditor, LogKind::Config).await.len(),
        kept.len() + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_cut_short_inside_the_zeros_ahead_is_dropped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (full, ends, kept) = file_of_an_open_log(dir.path(), 4).await;
    let (before_last, last) = (ends[2], ends[3]);
    // A power loss during the last group's sync: part of it reached the disk, the rest of
    // the file is the zeros written ahead.
    for cut in [before_last + 1, (before_last + last) / 2, last - 2] {
        let mut crashed = full[..cut].to_vec();
        crashed.resize(full.len(), 0);
        let what = format!("cut at {cut}, zeros after it");
        assert_recovers(dir.path(), &crashed, before_last, &kept[..3], &what).await;
    }
    // A page of the last group lost, its commit mark and the zeros after it on disk: the
    // zeros are not "bytes after the damaged group's mark" (which would prove a later
    // group, and refuse the file); the group is the last one, unfinished, and dropped.
    let mut crashed = full.clone();
    crashed[before_last + 10..before_last + 30].fill(0);
    let what = "a lost page in the last group, its mark and the zeros after it on disk";
    assert_recovers(dir.path(), &crashed, before_last, &kept[..3], what).await;
}
