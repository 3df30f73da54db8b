//! Crash recovery of the JSONL log: every shape a crash or a power loss can leave the last
//! (unacknowledged) write group in is recovered, damage to acknowledged records is refused.
use eventlog::{
    EventLogError,
    jsonl::{JsonlLog, JsonlOptions},
};

use crate::jsonl::{assert_recovers, config_file, file_ending_in};

/// Events in the last write group (one atomic append): about 13 KiB, room for whole 4 KiB
/// pages inside it.
const LAST_GROUP_EVENTS: usize = 60;

/// A log file as the writer left it: three single appends, then one write group of
/// `LAST_GROUP_EVENTS` events.
struct WrittenLog {
    bytes: Vec<u8>,
    /// Where the last write group starts (the end of the commit mark before it).
    last_start: usize,
    /// Where the last group's commit mark (with the empty line before it) starts.
    mark_start: usize,
    /// What is stored before the last group.
    kept: Vec<(u64, String)>,
}

async fn written_log() -> WrittenLog {
    let (bytes, last_start, kept) = file_ending_in(LAST_GROUP_EVENTS).await;
    // The mark and the empty line before it.
    let mark_start = bytes
        .windows(2)
        .rposition(|pair| pair == b"\n\n")
        .map_or(0, |at| at + 1);
    assert!(
        bytes[mark_start..].starts_with(b"\n{\"commit\":"),
        "the file ends with a commit mark"
    );
    assert!(
        mark_start - last_start > 3 * 4096,
        "the last group spans pages"
    );
    WrittenLog {
        bytes,
        last_start,
        mark_start,
        kept,
    }
}

impl WrittenLog {
    /// Where in the last group's records to damage: its start, a few places inside, and
    /// right before its mark.
    fn offsets_in_last_group(&self, damage_len: usize) -> Vec<usize> {
        let span = self.mark_start - damage_len - self.last_start;
        vec![
            self.last_start,
            self.last_start + 1,
            self.last_start + span / 3,
            self.last_start + span / 2 + 7,
            self.last_start + 2 * span / 3,
            self.mark_start - damage_len,
        ]
    }

    /// The 4 KiB pages (aligned in the file) that lie wholly inside the last group's records.
    fn pages_in_last_group(&self) -> Vec<usize> {
        let first = self.last_start.div_ceil(4096) * 4096;
        (first..)
            .step_by(4096)
            .take_while(|page| page + 4096 <= self.mark_start)
            .collect()
    }

    /// The records of the last group (without their mark), with `damage` applied to them.
    fn without_mark(&self, damage: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut file = self.bytes[..self.mark_start].to_vec();
        damage(&mut file);
        file
    }
}

/// Bytes that are no JSON: a deterministic mix of binary, braces, quotes and newlines, as a
/// disk may return for blocks that were never written.
fn garbage(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..len)
        .map(|i| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            match i % 61 {
                13 => b'\n',
                29 => b'{',
                43 => b'"',
                _ => (state >> 56) as u8,
            }
        })
        .collect()
}

fn zero(file: &mut [u8], at: usize, len: usize) {
    file[at..at + len].fill(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_filled_gap_followed_by_complete_lines_in_the_last_group_is_recovered() {
    let log = written_log().await;
    let dir = tempfile::tempdir().expect("temp dir");
    for at in log.offsets_in_last_group(300) {
        let file = log.without_mark(|f| zero(f, at, 300));
        let what = format!("300 zero bytes at {at}, no commit mark");
        assert_recovers(dir.path(), &file, log.last_start, &log.kept, &what).await;

        // The mark itself torn, or zeroed like the gap.
        let mut torn = file.clone();
        torn.extend_from_slice(&log.bytes[log.mark_start..log.mark_start + 5]);
        let what = format!("300 zero bytes at {at}, a torn commit mark");
        assert_recovers(dir.path(), &torn, log.last_start, &log.kept, &what).await;
        let mut zeroed = file;
        zeroed.resize(log.bytes.len(), 0);
        let what = format!("300 zero bytes at {at}, a zeroed commit mark");
        assert_recovers(dir.path(), &zeroed, log.last_start, &log.kept, &what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zeroed_page_in_the_last_group_is_recovered() {
    let log = written_log().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let pages = log.pages_in_last_group();
    assert!(pages.len() >= 2, "{pages:?}");
    for page in pages {
        let file = log.without_mark(|f| zero(f, page, 4096));
        let what = format!("the page at {page} zeroed");
        assert_recovers(dir.path(), &file, log.last_start, &log.kept, &what).await;
    }
    // The file grew to whole pages but the last one was never written: zeros up to the page
    // boundary where the mark would have been.
    let mut file = log.bytes[..log.mark_start].to_vec();
    file.resize(log.mark_start.div_ceil(4096) * 4096 + 4096, 0);
    assert_recovers(
        dir.path(),
        &file,
        log.last_start,
        &log.kept,
        "zeros to the end of the page instead of the commit mark",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_last_group_is_recovered() {
    let log = written_log().await;
    let dir = tempfile::tempdir().expect("temp dir");
    for at in log.offsets_in_last_group(500) {
        let file = log.without_mark(|f| f[at..at + 500].copy_from_slice(&garbage(500)));
        let what = format!("500 bytes of garbage at {at}");
        assert_recovers(dir.path(), &file, log.last_start, &log.kept, &what).await;
    }
    // Garbage after the complete records, where the mark should be.
    let mut file = log.bytes[..log.mark_start].to_vec();
    file.extend_from_slice(&garbage(700));
    assert_recovers(
        dir.path(),
        &file,
        log.last_start,
        &log.kept,
        "garbage instead of the commit mark",
    )
    .await;
    // Every record complete, the mark never written.
    assert_recovers(
        dir.path(),
        &log.bytes[..log.mark_start],
        log.last_start,
        &log.kept,
        "complete records without their commit mark",
    )
    .await;
}

/// Opens the log in `dir` holding `file` and expects `Corrupt` naming a line, with the file
/// left as it was (by the read-only open as well).
async fn assert_refused(dir: &std::path::Path, file: &[u8], what: &str) {
    let path = config_file(dir);
    std::fs::write(&path, file).expect("write the damaged file");
    for read_only in [true, false] {
        let result = if read_only {
            JsonlLog::open_read_only(dir).await
        } else {
            JsonlLog::open(dir, JsonlOptions::default()).await
        };
        match result {
            Err(EventLogError::Corrupt { location, .. }) => {
                assert!(
                    location.contains("config.jsonl line "),
                    "{what}: {location}"
                );
            }
            Err(other) => panic!("{what}: expected Corrupt, got {other}"),
            Ok(_) => panic!("{what}: damage to acknowledged records was accepted"),
        }
        assert_eq!(
            std::fs::read(&path).expect("read"),
            file,
            "{what}: nothing is dropped"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_before_a_commit_mark_is_refused() {
    let log = written_log().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // The last group's mark is on disk, so its records were synced before it was written:
    // damage to them is not a crash artefact.
    for at in log.offsets_in_last_group(300) {
        let mut file = log.bytes.clone();
        zero(&mut file, at, 300);
        assert_refused(dir.path(), &file, &format!("zeros at {at} before the mark")).await;
        let mut file = log.bytes.clone();
        file[at..at + 300].copy_from_slice(&garbage(300));
        assert_refused(
            dir.path(),
            &file,
            &format!("garbage at {at} before the mark"),
        )
        .await;
    }
    // Damage in a record of an earlier group (each of them), followed by the last group,
    // complete or not.
    let mut earlier_records = vec![];
    let mut line_start = 0;
    for line in log.bytes[..log.last_start].split_inclusive(|b| *b == b'\n') {
        if line.starts_with(b"{\"seq\":") {
            earlier_records.push(line_start + line.len() / 2);
        }
        line_start += line.len();
    }
    assert_eq!(earlier_records.len(), log.kept.len());
    for at in earlier_records {
        for end in [log.bytes.len(), log.mark_start, log.last_start + 10] {
            let mut file = log.bytes[..end].to_vec();
            zero(&mut file, at, 30);
            let what = format!("zeros at {at} in an acknowledged group, file cut at {end}");
            assert_refused(dir.path(), &file, &what).await;
        }
    }
    // A mark that does not match the records before it.
    let mut file = log.bytes[..log.mark_start].to_vec();
    file.extend_from_slice(b"\n{\"commit\":2}\n\n{\"commit\":3}\n");
    assert_refused(dir.path(), &file, "a mark naming the wrong sequence").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_written_without_commit_marks_still_opens_and_gets_one() {
    let log = written_log().await;
    // The same records as an older version wrote them: no marks at all.
    let legacy: Vec<u8> = log
        .bytes
        .split_inclusive(|b| *b == b'\n')
        .filter(|line| *line != b"\n" && !line.starts_with(b"{\"commit\":"))
        .flatten()
        .copied()
        .collect();
    let records = log.kept.len() + LAST_GROUP_EVENTS;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = config_file(dir.path());
    std::fs::write(&path, &legacy).expect("write");
    {
        let opened = JsonlLog::open(dir.path(), JsonlOptions::default())
            .await
            .expect("a file without marks opens");
        assert_eq!(
            crate::jsonl::replay(&opened, eventlog::LogKind::Config)
                .await
                .len(),
            records
        );
        opened.close().await;
    }
    let marked = std::fs::read(&path).expect("read");
    assert_eq!(&marked[..legacy.len()], &legacy[..], "nothing is rewritten");
    assert_eq!(
        &marked[legacy.len()..],
        format!("\n{{\"commit\":{records}}}\n").as_bytes(),
        "the open ends the old records with a commit mark"
    );

    // Without marks, the old rule: damage followed by complete lines is refused...
    let mut damaged = legacy.clone();
    zero(&mut damaged, legacy.len() / 2, 100);
    assert_refused(dir.path(), &damaged, "a file without marks, damaged inside").await;
    // ...and the damage is refused after the conversion mark as well.
    let mut damaged = marked.clone();
    zero(&mut damaged, legacy.len() / 2, 100);
    assert_refused(dir.path(), &damaged, "old records damaged before the mark").await;
}
