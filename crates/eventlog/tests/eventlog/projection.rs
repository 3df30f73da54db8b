//! The projection runner: catches up, follows live, checkpoints, resumes without replaying
//! from zero, and folds "as of position N".
use std::{collections::BTreeMap, sync::Arc};

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
    runner.wait_for(last).await;
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
    runner.wait_for(last).await;
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
    runner.wait_for(last).await;
    assert_eq!(runner.read(|s| s.counts.get("server.b").copied()), Some(2));
}
