//! Crash recovery of the JSONL log: every shape a crash or a power loss can leave the last
//! (unacknowledged) write group in is recovered, damage to acknowledged records is refused.
use std::{
    future::Future,
    io,
    path::Path,
    pin::Pin,
    sync::{Arc, Condvar, Mutex, PoisonError},
};

use eventlog::{
    AppendOutcome, EventLog, EventLogError, ExpectedVersion, LogKind,
    jsonl::{JsonlLog, JsonlOptions, LogFile, LogFileWrapper},
};
use futures_util::FutureExt;
use proto::v1::Envelope;

use crate::{
    jsonl::{GUARD, assert_recovers, config_file, file_ending_in, replay},
    support::{event, subject, this_thread_dir},
};

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

/// Changes the first letter of the first server id from `from` on: the line stays well
/// formed, only a checksum can tell.
fn change_a_server_id(file: &mut [u8], from: usize) {
    const FIELD: &[u8] = b"\"serverId\":\"";
    let at = from
        + file[from..]
            .windows(FIELD.len())
            .position(|w| w == FIELD)
            .expect("a server id")
        + FIELD.len();
    assert!(file[at].is_ascii_alphanumeric(), "{}", file[at] as char);
    file[at] = if file[at] == b'x' { b'y' } else { b'x' };
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
async fn assert_refused(dir: &Path, file: &[u8], what: &str) {
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
async fn the_last_group_cut_under_its_own_commit_mark_is_recovered() {
    // Records and mark are synced together, and the disk may have stored the mark's page
    // but not all of the records' before a power loss: the group was never acknowledged.
    let log = written_log().await;
    let dir = tempfile::tempdir().expect("temp dir");
    for at in log.offsets_in_last_group(300) {
        let mut file = log.bytes.clone();
        zero(&mut file, at, 300);
        let what = format!("zeros at {at} before the group's own mark");
        assert_recovers(dir.path(), &file, log.last_start, &log.kept, &what).await;
        let mut file = log.bytes.clone();
        file[at..at + 300].copy_from_slice(&garbage(300));
        let what = format!("garbage at {at} before the group's own mark");
        assert_recovers(dir.path(), &file, log.last_start, &log.kept, &what).await;
    }
    for page in log.pages_in_last_group() {
        let mut file = log.bytes.clone();
        zero(&mut file, page, 4096);
        let what = format!("the page at {page} zeroed, the group's own mark present");
        assert_recovers(dir.path(), &file, log.last_start, &log.kept, &what).await;
    }
    // Every line still well formed, but not the bytes the mark's checksum covers (a
    // record's text changed inside a string): only the checksum tells.
    let mut file = log.bytes.clone();
    change_a_server_id(&mut file, log.last_start + 10);
    assert_recovers(
        dir.path(),
        &file,
        log.last_start,
        &log.kept,
        "a record changed under the group's own mark",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_to_an_acknowledged_group_is_refused() {
    let log = written_log().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // Damage in a record of an earlier group (each of them), followed by the last group,
    // complete or not: the later group was written only after the damaged one's sync had
    // returned.
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
    // Damage that destroys the commit mark of the group before the last one (and the end of
    // its record): the records of the last group, unfinished as they are, show that a later
    // group was written, which happens only after the damaged group was acknowledged.
    // (The zeros join the last group's first record to the damaged line; a later complete
    // record is what shows the later group.)
    for end in [log.mark_start, log.mark_start - 200, log.last_start + 700] {
        let mut file = log.bytes[..end].to_vec();
        zero(&mut file, log.last_start - 20, 20);
        let what = format!("the mark before the last group zeroed, file cut at {end}");
        assert_refused(dir.path(), &file, &what).await;
    }
    // A record changed under its group's mark (the checksum fails), the last group after it.
    let mut file = log.bytes.clone();
    change_a_server_id(&mut file, 0);
    assert_refused(
        dir.path(),
        &file,
        "an earlier record changed under its mark",
    )
    .await;
    // A mark that does not match the records before it.
    let mut file = log.bytes[..log.mark_start].to_vec();
    file.extend_from_slice(b"\n{\"commit\":2}\n\n{\"commit\":3}\n");
    assert_refused(dir.path(), &file, "a mark naming the wrong sequence").await;
}

/// A record line without its `"group":N` field, as earlier versions wrote it.
fn without_group(line: &[u8]) -> Vec<u8> {
    let Some(at) = line.windows(9).position(|w| w == b",\"group\":") else {
        return line.to_vec();
    };
    let digits = line[at + 9..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    [&line[..at], &line[at + 9 + digits..]].concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_written_without_commit_marks_still_opens_and_gets_one() {
    let log = written_log().await;
    // The same records as an older version wrote them: no marks, no group numbers.
    let legacy: Vec<u8> = log
        .bytes
        .split_inclusive(|b| *b == b'\n')
        .filter(|line| *line != b"\n" && !line.starts_with(b"{\"commit\":"))
        .flat_map(without_group)
        .collect();
    let records = log.kept.len() + LAST_GROUP_EVENTS;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = config_file(dir.path());
    std::fs::write(&path, &legacy).expect("write");
    {
        let opened = JsonlLog::open(dir.path(), JsonlOptions::default())
            .await
            .expect("a file without marks opens");
        assert_eq!(replay(&opened, LogKind::Config).await.len(), records);
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

/// A log file whose writes and syncs a test can watch, hold and make fail: the writer's seam
/// ([`JsonlLog::open_with_files`]) around the real file.
struct ScriptedFile {
    file: std::fs::File,
    script: Arc<Script>,
}

#[derive(Default)]
pub(crate) struct Script {
    state: Mutex<ScriptState>,
    changed: Condvar,
}

#[derive(Default)]
struct ScriptState {
    /// While set, a sync waits for a permit.
    hold: bool,
    permits: usize,
    syncs_entered: usize,
    /// Bytes written, and bytes made durable by a sync that succeeded.
    written: u64,
    durable: u64,
    /// The next fault to inject, counted in calls of its kind from when it was set.
    fault: Option<(Fault, usize)>,
    cut_fails: bool,
    /// The thread that synced last (the writer's), as `/proc/thread-self` names it.
    syncing_thread: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// A write that stores only half of its bytes and fails.
    Write,
    Sync,
}

impl Script {
    fn lock(&self) -> std::sync::MutexGuard<'_, ScriptState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn hold(&self) {
        self.lock().hold = true;
    }

    /// Lets `n` held syncs go ahead.
    pub(crate) fn release(&self, n: usize) {
        self.lock().permits += n;
        self.changed.notify_all();
    }

    pub(crate) fn stop_holding(&self) {
        self.lock().hold = false;
        self.changed.notify_all();
    }

    /// Fails the `nth` (1-based) call of `fault`'s kind from now on.
    fn fail(&self, fault: Fault, nth: usize, cut_fails: bool) {
        let mut state = self.lock();
        state.fault = Some((fault, nth));
        state.cut_fails = cut_fails;
    }

    fn take_fault(&self, kind: Fault) -> bool {
        let mut state = self.lock();
        match &mut state.fault {
            Some((fault, nth)) if *fault == kind => {
                *nth -= 1;
                if *nth == 0 {
                    state.fault = None;
                    return true;
                }
                false
            }
            _ => false,
        }
    }

    /// Waits (on a blocking thread) until `n` syncs have started.
    pub(crate) async fn syncs_entered(self: &Arc<Self>, n: usize) {
        let script = self.clone();
        // Bounded on the blocking thread itself, so that a writer that never syncs fails the
        // test instead of leaving a thread the runtime waits for at the end.
        let reached = tokio::task::spawn_blocking(move || {
            let state = script.lock();
            let (state, _) = script
                .changed
                .wait_timeout_while(state, GUARD, |state| state.syncs_entered < n)
                .unwrap_or_else(PoisonError::into_inner);
            state.syncs_entered >= n
        })
        .await
        .expect("wait");
        assert!(reached, "the writer never synced");
    }

    fn durable(&self) -> u64 {
        self.lock().durable
    }

    /// How many syncs have started so far.
    pub(crate) fn syncs_started(&self) -> usize {
        self.lock().syncs_entered
    }

    /// The writer thread's `/proc` directory (`/proc/<pid>/task/<tid>`), once it has synced.
    pub(crate) fn writer_thread(&self) -> Option<std::path::PathBuf> {
        self.lock().syncing_thread.clone()
    }
}

/// Stops holding syncs when a test ends, also by a failed assertion, so that dropping the log
/// (which joins its writer thread) cannot hang.
pub(crate) struct StopHoldingOnDrop(pub(crate) Arc<Script>);

impl Drop for StopHoldingOnDrop {
    fn drop(&mut self) {
        self.0.stop_holding();
    }
}

impl LogFile for ScriptedFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.script.take_fault(Fault::Write) {
            let half = &bytes[..bytes.len() / 2];
            std::io::Write::write_all(&mut self.file, half)?;
            self.script.lock().written += half.len() as u64;
            return Err(io::Error::other("injected write failure"));
        }
        std::io::Write::write_all(&mut self.file, bytes)?;
        self.script.lock().written += bytes.len() as u64;
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        {
            let thread = this_thread_dir();
            let mut state = self.script.lock();
            state.syncing_thread = thread;
            state.syncs_entered += 1;
            self.script.changed.notify_all();
            while state.hold && state.permits == 0 {
                state = self
                    .script
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.hold {
                state.permits -= 1;
            }
        }
        if self.script.take_fault(Fault::Sync) {
            return Err(io::Error::other("injected sync failure"));
        }
        self.file.sync_data()?;
        let mut state = self.script.lock();
        state.durable = state.written;
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        if self.script.lock().cut_fails {
            return Err(io::Error::other("injected truncate failure"));
        }
        self.file.set_len(len)?;
        let mut state = self.script.lock();
        state.written = state.written.min(len);
        Ok(())
    }
}

/// Opens the log in `dir` with the config log's writer going through a [`ScriptedFile`].
pub(crate) async fn open_scripted(dir: &Path) -> (JsonlLog, Arc<Script>) {
    let script = Arc::new(Script::default());
    let start = std::fs::metadata(config_file(dir)).map_or(0, |m| m.len());
    let for_wrapper = script.clone();
    let wrap: LogFileWrapper = Arc::new(move |kind, file| match kind {
        LogKind::Config => {
            // What is in the file at open has been synced by recovery.
            let mut state = for_wrapper.lock();
            let len = file.metadata().map_or(start, |m| m.len());
            state.written = len;
            state.durable = len;
            drop(state);
            Box::new(ScriptedFile {
                file,
                script: for_wrapper.clone(),
            })
        }
        LogKind::Invocations => Box::new(file),
    });
    let log = JsonlLog::open_with_files(dir, JsonlOptions::default(), wrap)
        .await
        .expect("open");
    (log, script)
}

pub(crate) type PendingAppend<'a> =
    Pin<Box<dyn Future<Output = Result<AppendOutcome, EventLogError>> + Send + 'a>>;

/// Starts an append and hands it to the writer (its request is queued once this returns).
pub(crate) fn start_append<'a>(log: &'a JsonlLog, events: &'a [Envelope]) -> PendingAppend<'a> {
    let mut append: PendingAppend<'a> =
        Box::pin(log.append(&SUBJECT, ExpectedVersion::Any, events));
    assert!(append.as_mut().now_or_never().is_none(), "answered at once");
    append
}

/// The answer to a started append (failing the test if there is none within [`GUARD`]).
pub(crate) async fn answer(append: PendingAppend<'_>) -> Result<AppendOutcome, EventLogError> {
    tokio::time::timeout(GUARD, append).await.expect("stalled")
}

static SUBJECT: std::sync::LazyLock<eventlog::Subject> =
    std::sync::LazyLock::new(|| subject("server.seam"));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_append_is_acknowledged_before_its_records_and_commit_mark_are_synced() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, script) = open_scripted(dir.path()).await;
    let _stop_holding = StopHoldingOnDrop(script.clone());
    let at_open = script.durable();
    script.hold();
    let events = [event("seam"), event("seam")];
    let mut append = start_append(&log, &events);

    // The group's records and its commit mark are written, and their one sync has started
    // and is held: no answer yet.
    script.syncs_entered(1).await;
    assert!(
        append.as_mut().now_or_never().is_none(),
        "answered before the group was synced"
    );
    let written = std::fs::read(config_file(dir.path())).expect("read");
    let group = &written[usize::try_from(at_open).expect("offset")..];
    assert_eq!(
        group.iter().filter(|b| **b == b'\n').count(),
        4,
        "two records, the empty line and the commit mark, in the one write before the sync"
    );
    assert!(
        group.ends_with(b"}\n") && group.windows(10).any(|w| w == b"\n{\"commit\""),
        "{}",
        String::from_utf8_lossy(group)
    );
    assert_eq!(
        script.durable(),
        at_open,
        "nothing of the group is durable yet"
    );
    script.release(1);
    let outcome = tokio::time::timeout(GUARD, append)
        .await
        .expect("append stalled")
        .expect("append");
    assert_eq!((outcome.first_sequence, outcome.last_sequence), (1, 2));
    let on_disk = std::fs::metadata(config_file(dir.path()))
        .expect("metadata")
        .len();
    assert_eq!(
        script.durable(),
        on_disk,
        "everything written was synced before the answer"
    );
    script.stop_holding();
    log.close().await;
}

/// One write group fails at `fault` (the `nth` call of its kind within the group): every
/// append of the group fails, the log refuses appends until reopened, and after reopening
/// every acknowledged append is there and the failed ones are not (and can be retried).
async fn a_failed_group(fault: Fault, nth: usize, cut_fails: bool) {
    let what = format!("{fault:?} #{nth} fails, cutting back fails: {cut_fails}");
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, script) = open_scripted(dir.path()).await;
    let _stop_holding = StopHoldingOnDrop(script.clone());
    let first = [event("seam")];
    log.append(&SUBJECT, ExpectedVersion::Any, &first)
        .await
        .expect("first append");

    // Hold the next group's syncs so that two more appends queue up behind it and are
    // written as one group.
    script.hold();
    let acknowledged = [event("seam")];
    // The held group makes one write and one sync before the failing group's.
    script.fail(fault, nth + 1, cut_fails);
    let entered = script.syncs_started();
    let mut held = start_append(&log, &acknowledged);
    script.syncs_entered(entered + 1).await;
    let failing_a = [event("seam"), event("seam")];
    let failing_b = [event("seam")];
    let a = start_append(&log, &failing_a);
    let b = start_append(&log, &failing_b);
    assert!(held.as_mut().now_or_never().is_none());
    script.release(1);
    answer(held).await.expect("the held append succeeds");
    // The failing group may be written already, but not synced: its sync is still held.
    let kept_len = script.durable();
    script.stop_holding();

    for (append, name) in [(a, "first"), (b, "second")] {
        let err = answer(append)
            .await
            .expect_err(&format!("{what}: the {name} append of the failed group"));
        assert!(
            matches!(err, EventLogError::Unavailable { .. }),
            "{what}: {err}"
        );
    }
    let err = log
        .append(&SUBJECT, ExpectedVersion::Any, &[event("seam")])
        .await
        .expect_err("appends are refused after a failed write");
    assert!(
        matches!(err, EventLogError::Unavailable { .. }),
        "{what}: {err}"
    );
    if !cut_fails {
        assert_eq!(
            std::fs::metadata(config_file(dir.path()))
                .expect("metadata")
                .len(),
            kept_len,
            "{what}: the file is cut back to the last acknowledged group"
        );
    }
    log.close().await;
    drop(log);

    let reopened = JsonlLog::open(dir.path(), JsonlOptions::default())
        .await
        .expect("reopen");
    let stored: Vec<String> = replay(&reopened, LogKind::Config)
        .await
        .into_iter()
        .map(|e| e.envelope.event_id)
        .collect();
    let ids = |events: &[Envelope]| {
        events
            .iter()
            .map(|e| e.event_id.clone())
            .collect::<Vec<_>>()
    };
    let acknowledged_ids = [ids(&first), ids(&acknowledged)].concat();
    assert_eq!(stored[..2], acknowledged_ids[..], "{what}");
    // The failed group is gone, except when it was written whole (its sync failed) and
    // could not be cut off again: then it is whole (its callers were told it may or may not
    // be stored).
    let failed_ids = [ids(&failing_a), ids(&failing_b)].concat();
    assert!(
        stored.len() == 2 || (cut_fails && stored[2..] == failed_ids[..]),
        "{what}: {stored:?}"
    );
    // The failed appends can be retried with the same ids, and are stored once.
    for events in [&failing_a[..], &failing_b[..]] {
        let outcome = reopened
            .append(&SUBJECT, ExpectedVersion::Any, events)
            .await
            .expect("retry");
        assert_eq!(outcome.duplicate, stored.len() > 2, "{what}");
    }
    let after: Vec<String> = replay(&reopened, LogKind::Config)
        .await
        .into_iter()
        .map(|e| e.envelope.event_id)
        .collect();
    assert_eq!(after, [acknowledged_ids, failed_ids].concat(), "{what}");
    reopened.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_or_sync_fails_the_whole_group_and_loses_nothing_acknowledged() {
    for cut_fails in [false, true] {
        // The group's one write (records and commit mark), its one sync.
        a_failed_group(Fault::Write, 1, cut_fails).await;
        a_failed_group(Fault::Sync, 1, cut_fails).await;
    }
}
