//! Retention of the JSONL invocations log: monthly segment files, dropped whole once past
//! retention, without rewriting history and without reading what is dropped.
use std::{
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use eventlog::{
    EventLog, ExpectedVersion, LogKind,
    jsonl::{DEFAULT_INVOCATION_RETENTION, JsonlLog, JsonlOptions},
};
use futures_util::StreamExt;

use crate::{
    jsonl::{GUARD, replay},
    support::{event, subject},
};

/// The test's clock, in seconds since 1970 (only this test module's log uses it).
static NOW: AtomicU64 = AtomicU64::new(0);

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW.load(Ordering::SeqCst))
}

fn set_now(seconds: u64) {
    NOW.store(seconds, Ordering::SeqCst);
}

const DAY: u64 = 86_400;
/// 2025-01-15T00:00:00Z, 2025-02-10, 2025-03-02.
const JAN_15_2025: u64 = 1_736_899_200;
const FEB_10_2025: u64 = 1_739_145_600;
const MAR_02_2025: u64 = 1_740_873_600;
/// The first instants of 2025-02 and 2025-03.
const FEB_2025: u64 = 1_738_368_000;
const MAR_2025: u64 = 1_740_787_200;

async fn open(dir: &Path) -> JsonlLog {
    let options = JsonlOptions {
        now,
        ..JsonlOptions::default()
    };
    JsonlLog::open(dir, options).await.expect("open")
}

async fn append_invocations(log: &JsonlLog, n: usize) -> Vec<String> {
    let mut ids = vec![];
    for _ in 0..n {
        let e = event("inv");
        log.append(
            &subject("invocation.u_alice"),
            ExpectedVersion::Any,
            std::slice::from_ref(&e),
        )
        .await
        .expect("append an invocation event");
        ids.push(e.event_id);
    }
    ids
}

fn ids(events: &[eventlog::RecordedEvent]) -> Vec<(u64, String)> {
    events
        .iter()
        .map(|e| (e.sequence, e.envelope.event_id.clone()))
        .collect()
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("invocations"))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocation_segments_past_retention_are_dropped_whole() {
    assert_eq!(DEFAULT_INVOCATION_RETENTION, Duration::from_secs(400 * DAY));
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();

    // January: three invocation events, and a configuration event that is kept forever.
    set_now(JAN_15_2025);
    let log = open(dir).await;
    let january = append_invocations(&log, 3).await;
    log.append(&subject("server.s1"), ExpectedVersion::Any, &[event("s1")])
        .await
        .expect("append a configuration event");
    log.close().await;
    drop(log);

    // February (after a restart) and March (without one): each month starts a segment.
    set_now(FEB_10_2025);
    let log = open(dir).await;
    let february = append_invocations(&log, 2).await;
    set_now(MAR_02_2025);
    let march = append_invocations(&log, 2).await;
    assert_eq!(
        segment_files(dir),
        [
            "invocations.2025-01.1.jsonl",
            "invocations.2025-02.4.jsonl",
            "invocations.jsonl"
        ]
    );
    // Reads run across segments.
    let all = ids(&replay(&log, LogKind::Invocations).await);
    let expected: Vec<(u64, String)> = (1..)
        .zip(january.iter().chain(&february).chain(&march).cloned())
        .collect();
    assert_eq!(all, expected);
    let history = log
        .read_aggregate(&subject("invocation.u_alice"))
        .await
        .expect("read");
    assert_eq!((history.version, history.events.len()), (7, 7));
    log.close().await;
    drop(log);

    // Past January's retention: its segment is deleted at open, unread — garbage in it
    // does not matter — and the log starts at February's first event.
    let january_file = dir.join("invocations.2025-01.1.jsonl");
    std::fs::write(&january_file, b"\x00 not read \x00").expect("damage the expired segment");
    set_now(FEB_2025 + 400 * DAY);
    let log = open(dir).await;
    assert!(!january_file.exists(), "the expired segment is gone");
    assert_eq!(
        ids(&replay(&log, LogKind::Invocations).await),
        expected[3..],
        "February and March are kept"
    );
    assert_eq!(
        log.last_sequence(LogKind::Invocations).await.expect("last"),
        7
    );
    assert_eq!(
        replay(&log, LogKind::Config).await.len(),
        1,
        "the configuration log is not touched"
    );
    // Sequences go on, and a subscription from 0 starts at the first kept event.
    let later = append_invocations(&log, 1).await;
    let mut live = log
        .subscribe(LogKind::Invocations, 0, None)
        .await
        .expect("subscribe");
    let first = tokio::time::timeout(GUARD, live.next())
        .await
        .expect("subscriber stalled")
        .expect("stream ended")
        .expect("event");
    assert_eq!(first.sequence, 4);

    // While running: once February is past retention too, the next append drops it.
    set_now(MAR_2025 + 400 * DAY);
    let after = append_invocations(&log, 1).await;
    assert!(!dir.join("invocations.2025-02.4.jsonl").exists());
    let kept = ids(&replay(&log, LogKind::Invocations).await);
    let mut expected_kept: Vec<(u64, String)> = expected[5..].to_vec();
    expected_kept.push((8, later[0].clone()));
    expected_kept.push((9, after[0].clone()));
    assert_eq!(kept, expected_kept);
    log.close().await;
    drop(log);

    // A read-only open and a reopen see the same; nothing was rewritten in place.
    let auditor = JsonlLog::open_read_only(dir).await.expect("read-only open");
    assert_eq!(
        ids(&replay(&auditor, LogKind::Invocations).await),
        expected_kept
    );
    drop(auditor);
    let log = open(dir).await;
    assert_eq!(
        ids(&replay(&log, LogKind::Invocations).await),
        expected_kept
    );
    let next = log
        .append(
            &subject("invocation.u_alice"),
            ExpectedVersion::Any,
            &[event("inv")],
        )
        .await
        .expect("append");
    assert_eq!(next.first_sequence, 10);
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_retention_the_invocations_log_stays_one_file() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let log = JsonlLog::open(
        tmp.path(),
        JsonlOptions {
            invocation_retention: None,
            ..JsonlOptions::default()
        },
    )
    .await
    .expect("open");
    append_invocations(&log, 2).await;
    log.close().await;
    assert_eq!(segment_files(tmp.path()), ["invocations.jsonl"]);
}
