//! The projection runner: catches up, follows live, checkpoints, resumes without replaying
//! from zero, and folds "as of position N".
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use eventlog::{
    EventLog, ExpectedVersion, LogKind, RecordedEvent,
    jsonl::{JsonlLog, JsonlOptions},
    projection::{
        CheckpointPolicy, CheckpointStore, FileCheckpointStore, ProjectionRunner, ProjectionSpec,
        fold_until,
    },
};
use serde::{Deserialize, Serialize};

use crate::support::{event, subject};

/// Guard against a hang; never used to wait for something to happen.
const GUARD: Duration = Duration::from_secs(30);

/// `runner.wait_for(sequence)`, failing the test instead of hanging it if the follower broke.
async fn wait_for<P>(runner: &ProjectionRunner<P>, sequence: u64)
where
    P: Default + Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    tokio::time::timeout(GUARD, runner.wait_for(sequence))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the projection never reached {sequence} (it is at {})",
                runner.position()
            )
        });
}

/// Counts events per subject; `applied_since_start` is not saved, so it shows how much a
/// runner replayed after a restart.
#[derive(Debug, Default, Serialize, Deserialize)]
struct EventsPerSubject {
    counts: BTreeMap<String, u64>,
    #[serde(skip)]
    applied_since_start: u64,
}

fn apply(state: &mut EventsPerSubject, event: &RecordedEvent) {
    *state.counts.entry(event.subject.to_string()).or_default() += 1;
    state.applied_since_start += 1;
}

fn spec() -> ProjectionSpec<EventsPerSubject> {
    ProjectionSpec {
        name: "events_per_subject",
        log: LogKind::Config,
        filter: None,
        apply,
        rewind: None,
    }
}

async fn append_n(log: &dyn EventLog, subject_name: &str, n: usize) -> u64 {
    let mut last = 0;
    for _ in 0..n {
        last = log
            .append(&subject(subject_name), ExpectedVersion::Any, &[event("p")])
            .await
            .expect("append")
            .last_sequence;
    }
    last
}

/// The embedded default's stores: a JSONL log and file checkpoints under `dir`.
async fn open_embedded(dir: &std::path::Path) -> (Arc<dyn EventLog>, Arc<dyn CheckpointStore>) {
    let log = JsonlLog::open(&dir.join("events"), JsonlOptions::default())
        .await
        .expect("open");
    let checkpoints = FileCheckpointStore::open(&dir.join("checkpoints")).expect("store");
    (Arc::new(log), Arc::new(checkpoints))
}

#[tokio::test]
async fn a_projection_catches_up_then_follows_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, checkpoints) = open_embedded(dir.path()).await;
    append_n(log.as_ref(), "server.a", 5).await;

    let runner = ProjectionRunner::start(
        log.clone(),
        checkpoints,
        spec(),
        CheckpointPolicy::default(),
    )
    .await
    .expect("start");
    assert_eq!(runner.position(), 5, "caught up before start returns");
    assert_eq!(runner.read(|s| s.counts.get("server.a").copied()), Some(5));

    let last = append_n(log.as_ref(), "server.b", 3).await;
    wait_for(&runner, last).await;
    assert_eq!(runner.read(|s| s.counts.get("server.b").copied()), Some(3));
}

#[tokio::test]
async fn a_restarted_projection_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events_dir = dir.path().join("events");
    let checkpoints: Arc<dyn CheckpointStore> =
        Arc::new(FileCheckpointStore::open(&dir.path().join("checkpoints")).expect("store"));
    {
        let jsonl = JsonlLog::open(&events_dir, JsonlOptions::default())
            .await
            .expect("open");
        let log: Arc<dyn EventLog> = Arc::new(jsonl.clone());
        append_n(log.as_ref(), "server.a", 100).await;
        let runner = ProjectionRunner::start(
            log.clone(),
            checkpoints.clone(),
            spec(),
            CheckpointPolicy::default(),
        )
        .await
        .expect("start");
        runner.shutdown().await.expect("final checkpoint");
        append_n(log.as_ref(), "server.a", 10).await;
        jsonl.close().await;
    }
    let saved = checkpoints
        .load("events_per_subject")
        .await
        .expect("load")
        .expect("a checkpoint");
    assert_eq!(saved.position, 100);

    let log: Arc<dyn EventLog> = Arc::new(
        JsonlLog::open(&events_dir, JsonlOptions::default())
            .await
            .expect("reopen"),
    );
    let runner = ProjectionRunner::start(log, checkpoints, spec(), CheckpointPolicy::default())
        .await
        .expect("restart");
    assert_eq!(runner.position(), 110);
    assert_eq!(
        runner.read(|s| s.counts.get("server.a").copied()),
        Some(110)
    );
    assert_eq!(
        runner.read(|s| s.applied_since_start),
        10,
        "only the events after the checkpoint were applied"
    );
}

/// The last sequences seen, kept in memory only; a restored state folds again from the
/// oldest it should know (as the open invocations do for the claim window).
#[derive(Debug, Serialize, Deserialize)]
struct RecentSequences {
    last_seen: u64,
    #[serde(skip)]
    recent: Vec<u64>,
    /// How many to keep: a setting, not in the snapshot.
    #[serde(skip, default = "default_keep")]
    keep: u64,
}

impl Default for RecentSequences {
    fn default() -> Self {
        RecentSequences {
            last_seen: 0,
            recent: Vec::new(),
            keep: default_keep(),
        }
    }
}

fn default_keep() -> u64 {
    5
}

fn spec_with_rewind() -> ProjectionSpec<RecentSequences> {
    ProjectionSpec {
        name: "recent_sequences",
        log: LogKind::Config,
        filter: None,
        apply: |state: &mut RecentSequences, event: &RecordedEvent| {
            if !state.recent.contains(&event.sequence) {
                state.recent.push(event.sequence);
            }
            let keep = state.keep;
            state.recent.retain(|s| s + keep > event.sequence);
            state.last_seen = state.last_seen.max(event.sequence);
        },
        rewind: Some(|state: &RecentSequences| state.last_seen.saturating_sub(state.keep - 1)),
    }
}

#[tokio::test]
async fn a_restored_state_is_folded_again_from_where_it_rewinds_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, checkpoints) = open_embedded(dir.path()).await;
    append_n(log.as_ref(), "server.a", 20).await;
    let runner = ProjectionRunner::start(
        log.clone(),
        checkpoints.clone(),
        spec_with_rewind(),
        CheckpointPolicy::default(),
    )
    .await
    .expect("start");
    assert_eq!(runner.read(|s| s.recent.clone()), [16, 17, 18, 19, 20]);
    runner.shutdown().await.expect("final checkpoint");
    append_n(log.as_ref(), "server.a", 2).await;

    let runner = ProjectionRunner::start(
        log,
        checkpoints,
        spec_with_rewind(),
        CheckpointPolicy::default(),
    )
    .await
    .expect("restart");
    // Without the rewind only 21 and 22 would be known: the rest is not in the snapshot.
    assert_eq!(runner.read(|s| s.recent.clone()), [18, 19, 20, 21, 22]);
    assert_eq!(runner.position(), 22);
}

/// Settings are not in a snapshot: the restored state gets them before it folds anything,
/// so they decide the rewind and every event folded after the restart.
#[tokio::test]
async fn a_configured_projection_is_given_its_settings_before_it_folds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, checkpoints) = open_embedded(dir.path()).await;
    append_n(log.as_ref(), "server.a", 20).await;
    let runner = ProjectionRunner::start(
        log.clone(),
        checkpoints.clone(),
        spec_with_rewind(),
        CheckpointPolicy::default(),
    )
    .await
    .expect("start");
    runner.shutdown().await.expect("final checkpoint");
    append_n(log.as_ref(), "server.a", 2).await;

    let runner = ProjectionRunner::start_configured(
        log.clone(),
        checkpoints.clone(),
        spec_with_rewind(),
        CheckpointPolicy::default(),
        |state: &mut RecentSequences| state.keep = 3,
    )
    .await
    .expect("restart");
    // Kept three, folded again from 18 (the configured rewind): with the default of five
    // it would know 18 to 22.
    assert_eq!(runner.read(|s| s.recent.clone()), [20, 21, 22]);
    // And it stays configured while it follows the log.
    append_n(log.as_ref(), "server.a", 1).await;
    runner.wait_for(23).await;
    assert_eq!(runner.read(|s| s.recent.clone()), [21, 22, 23]);
}

#[tokio::test]
async fn state_as_of_a_position_folds_only_up_to_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = JsonlLog::open(dir.path(), JsonlOptions::default())
        .await
        .expect("open");
    append_n(&log, "server.a", 4).await;
    append_n(&log, "server.b", 4).await;
    let state = fold_until(&log, &spec(), EventsPerSubject::default(), 6)
        .await
        .expect("fold");
    assert_eq!(state.counts.get("server.a").copied(), Some(4));
    assert_eq!(state.counts.get("server.b").copied(), Some(2));
}

#[tokio::test]
async fn checkpoints_survive_reopening_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FileCheckpointStore::open(dir.path()).expect("store");
    assert!(store.load("p").await.expect("load").is_none());
    let checkpoint = eventlog::projection::Checkpoint {
        position: 42,
        snapshot: bytes::Bytes::from_static(b"{\"x\":1}"),
    };
    store.save("p", &checkpoint).await.expect("save");
    let reopened = FileCheckpointStore::open(dir.path()).expect("reopen");
    assert_eq!(reopened.load("p").await.expect("load"), Some(checkpoint));
    assert!(
        store.load("../etc").await.is_err(),
        "names cannot escape the directory"
    );
}

#[tokio::test]
async fn a_restarted_projection_resumes_from_its_kv_checkpoint_on_jetstream() {
    use eventlog::jetstream::{JetStreamConfig, JetStreamLog};

    let config = JetStreamConfig::with_prefix(testkit::unique_name("p"));
    let connect = || async {
        let client = async_nats::connect(testkit::shared_nats().url())
            .await
            .expect("connect");
        JetStreamLog::connect(client, config.clone())
            .await
            .expect("jetstream log")
    };
    let first = connect().await;
    let log: Arc<dyn EventLog> = Arc::new(first.clone());
    let checkpoints: Arc<dyn CheckpointStore> =
        Arc::new(first.checkpoint_store().await.expect("kv checkpoints"));
    append_n(log.as_ref(), "server.a", 30).await;
    let runner = ProjectionRunner::start(
        log.clone(),
        checkpoints.clone(),
        spec(),
        CheckpointPolicy::default(),
    )
    .await
    .expect("start");
    let last = append_n(log.as_ref(), "server.b", 5).await;
    wait_for(&runner, last).await;
    runner.shutdown().await.expect("final checkpoint");
    append_n(log.as_ref(), "server.b", 7).await;

    // A new process: new connection, same streams and bucket.
    let second = connect().await;
    let checkpoints: Arc<dyn CheckpointStore> =
        Arc::new(second.checkpoint_store().await.expect("kv checkpoints"));
    let runner = ProjectionRunner::start(
        Arc::new(second),
        checkpoints,
        spec(),
        CheckpointPolicy::default(),
    )
    .await
    .expect("restart");
    assert_eq!(runner.position(), 42);
    assert_eq!(runner.read(|s| s.counts.get("server.b").copied()), Some(12));
    assert_eq!(runner.read(|s| s.applied_since_start), 7);
}

#[tokio::test]
async fn a_checkpoint_ahead_of_the_log_is_not_trusted_and_the_projection_rebuilds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, checkpoints) = open_embedded(dir.path()).await;
    // A checkpoint left over from another log (e.g. the event store was recreated).
    checkpoints
        .save(
            "events_per_subject",
            &eventlog::projection::Checkpoint {
                position: 1_000,
                snapshot: bytes::Bytes::from_static(b"{\"counts\":{\"server.gone\":1000}}"),
            },
        )
        .await
        .expect("save");
    append_n(log.as_ref(), "server.a", 5).await;

    let runner = ProjectionRunner::start(
        log.clone(),
        checkpoints,
        spec(),
        CheckpointPolicy::default(),
    )
    .await
    .expect("start");
    assert_eq!(runner.position(), 5);
    assert_eq!(runner.read(|s| s.counts.get("server.a").copied()), Some(5));
    assert_eq!(runner.read(|s| s.counts.get("server.gone").copied()), None);

    let last = append_n(log.as_ref(), "server.b", 2).await;
    wait_for(&runner, last).await;
    assert_eq!(runner.read(|s| s.counts.get("server.b").copied()), Some(2));
}

/// Counts every event of the config log: after a checkpoint at position N it must be N.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct EventCount {
    events: u64,
}

fn count(state: &mut EventCount, _: &RecordedEvent) {
    state.events += 1;
}

fn counting_spec() -> ProjectionSpec<EventCount> {
    ProjectionSpec {
        name: "event_count",
        log: LogKind::Config,
        filter: None,
        apply: count,
        rewind: None,
    }
}

/// Keeps every checkpoint saved, and restores a chosen one.
#[derive(Debug, Default)]
struct RecordingStore {
    saved: Mutex<Vec<eventlog::projection::Checkpoint>>,
    restore: Option<eventlog::projection::Checkpoint>,
}

#[async_trait::async_trait]
impl CheckpointStore for RecordingStore {
    async fn load(
        &self,
        _: &str,
    ) -> Result<Option<eventlog::projection::Checkpoint>, eventlog::EventLogError> {
        Ok(self.restore.clone())
    }

    async fn save(
        &self,
        _: &str,
        checkpoint: &eventlog::projection::Checkpoint,
    ) -> Result<(), eventlog::EventLogError> {
        self.saved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(checkpoint.clone());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_taken_while_events_are_applied_pairs_the_state_with_its_position() {
    const APPENDERS: u64 = 4;
    const APPENDS: u64 = 60;
    const EVENTS_PER_APPEND: u64 = 20;
    const TOTAL: u64 = APPENDERS * APPENDS * EVENTS_PER_APPEND;
    let dir = tempfile::tempdir().expect("tempdir");
    let log: Arc<dyn EventLog> = Arc::new(
        JsonlLog::open(dir.path(), JsonlOptions::default())
            .await
            .expect("open"),
    );
    let store = Arc::new(RecordingStore::default());
    let runner = ProjectionRunner::start(
        log.clone(),
        store.clone(),
        counting_spec(),
        CheckpointPolicy::default(),
    )
    .await
    .expect("start");

    // Checkpoints are taken all the time while the follower applies events.
    let done = Arc::new(AtomicBool::new(false));
    let checkpointers: Vec<_> = (0..3)
        .map(|_| {
            let runner = runner.clone();
            let done = done.clone();
            tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    runner.save_checkpoint().await.expect("checkpoint");
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let appenders: Vec<_> = (0..APPENDERS)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move {
                let s = subject(&format!("server.c{i}"));
                let mut last = 0;
                for _ in 0..APPENDS {
                    let events: Vec<_> = (0..EVENTS_PER_APPEND).map(|_| event("c")).collect();
                    last = log
                        .append(&s, ExpectedVersion::Any, &events)
                        .await
                        .expect("append")
                        .last_sequence;
                }
                last
            })
        })
        .collect();
    for appender in appenders {
        appender.await.expect("appender");
    }
    wait_for(&runner, TOTAL).await;
    runner.read_at(|state, position| assert_eq!((state.events, position), (TOTAL, TOTAL)));
    done.store(true, Ordering::Relaxed);
    for checkpointer in checkpointers {
        checkpointer.await.expect("checkpointer");
    }
    runner.save_checkpoint().await.expect("last checkpoint");

    let saved = std::mem::take(&mut *store.saved.lock().unwrap_or_else(PoisonError::into_inner));
    assert!(saved.len() > 10, "only {} checkpoints", saved.len());
    let mut restarts = 0;
    let mut last_restarted = None;
    for checkpoint in &saved {
        let state: EventCount = serde_json::from_slice(&checkpoint.snapshot).expect("snapshot");
        assert_eq!(
            state.events, checkpoint.position,
            "a checkpoint paired a state of {} events with position {}",
            state.events, checkpoint.position
        );
        // A restart from it (from every distinct position, up to a few dozen) counts each
        // event once.
        if last_restarted == Some(checkpoint.position) || restarts >= 40 {
            continue;
        }
        last_restarted = Some(checkpoint.position);
        restarts += 1;
        let restored = ProjectionRunner::start(
            log.clone(),
            Arc::new(RecordingStore {
                restore: Some(checkpoint.clone()),
                ..RecordingStore::default()
            }),
            counting_spec(),
            CheckpointPolicy::default(),
        )
        .await
        .expect("restart");
        assert_eq!(restored.read(|s| s.events), TOTAL);
    }
}

/// Checkpoints hold the projections' state: their directory and files are the owner's alone.
#[cfg(unix)]
#[tokio::test]
async fn checkpoint_files_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("checkpoints");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let store = FileCheckpointStore::open(&dir).expect("store");
    let checkpoint = eventlog::projection::Checkpoint {
        position: 1,
        snapshot: bytes::Bytes::from_static(b"{}"),
    };
    store.save("p", &checkpoint).await.expect("save");
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("p.checkpoint")), 0o600);
}
