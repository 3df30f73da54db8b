//! The command path over a real event log: load → decide → append with the loaded version,
//! decide again after a conflict (the conflict is made to happen, not hoped for), envelopes,
//! and read-your-writes through the read models.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, SystemTime},
};

use domain::{Aggregate, Event, ServerId, UserId};
use eventlog::{
    EventLog, ExpectedVersion, Subject,
    jsonl::{JsonlLog, JsonlOptions},
    projection::{CheckpointPolicy, FileCheckpointStore},
};
use proto::v1::{Envelope, ServerEnabled, actor};
use service_kit::{
    CommandContext, CommandError, EnvelopeBuilder, MAX_CONFLICT_RETRIES, ManualClock, ReadModels,
    execute,
};

/// How many events the aggregate has: enough state to see which state `decide` was given.
#[derive(Debug, Default)]
struct EventCount(usize);

impl Aggregate for EventCount {
    fn apply(&mut self, _event: &Event) {
        self.0 += 1;
    }
}

fn enabled(server: &str) -> Event {
    Event::ServerEnabled(ServerEnabled {
        server_id: server.to_owned(),
    })
}

async fn open_log(dir: &std::path::Path) -> Arc<JsonlLog> {
    Arc::new(
        JsonlLog::open(&dir.join("events"), JsonlOptions::default())
            .await
            .expect("open log"),
    )
}

fn builder() -> EnvelopeBuilder {
    EnvelopeBuilder::new(Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    )))
}

fn context() -> CommandContext {
    CommandContext::user(UserId::parse("alice@example.com").expect("user"), "req-1")
}

/// Another writer appends to the same aggregate, between this command's load and append.
async fn competing_write(log: &dyn EventLog, subject: &Subject, server: &str) {
    log.append(
        subject,
        ExpectedVersion::Any,
        &[builder().wrap(&context(), vec![enabled(server)]).remove(0)],
    )
    .await
    .expect("competing append");
}

#[tokio::test]
async fn a_command_decided_on_stale_state_is_decided_again_after_a_conflict() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open_log(dir.path()).await;
    let server = ServerId::new().to_string();
    let subject = Subject::parse(&format!("server.{server}")).expect("subject");
    competing_write(log.as_ref(), &subject, &server).await;

    let calls = AtomicU32::new(0);
    let seen_states = std::sync::Mutex::new(Vec::new());
    let (log_for_decide, subject_for_decide, server_for_decide) =
        (log.clone(), subject.clone(), server.clone());
    // The seam: the first decision runs while another writer gets in, so the append that
    // follows it must conflict.
    let written =
        execute::<EventCount, _>(log.as_ref(), &builder(), &subject, &context(), |state| {
            seen_states.lock().expect("lock").push(state.0);
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                let (log, subject, server) = (
                    log_for_decide.clone(),
                    subject_for_decide.clone(),
                    server_for_decide.clone(),
                );
                // `decide` is synchronous; the competing append runs on another thread.
                std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .build()
                        .expect("runtime")
                        .block_on(competing_write(log.as_ref(), &subject, &server))
                })
                .join()
                .expect("competing writer");
            }
            Ok(vec![enabled(&server_for_decide)])
        })
        .await
        .expect("the command goes through on the second try");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "decided twice");
    assert_eq!(
        *seen_states.lock().expect("lock"),
        vec![1, 2],
        "the second decision saw the competing write"
    );
    let history = log.read_aggregate(&subject).await.expect("read");
    assert_eq!(history.events.len(), 3);
    assert_eq!(written.version, history.version);
    assert_eq!(written.events.len(), 1);
}

#[tokio::test]
async fn a_command_that_keeps_conflicting_gives_up_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open_log(dir.path()).await;
    let server = ServerId::new().to_string();
    let subject = Subject::parse(&format!("server.{server}")).expect("subject");
    let calls = AtomicU32::new(0);
    let (log2, subject2, server2) = (log.clone(), subject.clone(), server.clone());
    let error = execute::<EventCount, _>(log.as_ref(), &builder(), &subject, &context(), |_| {
        calls.fetch_add(1, Ordering::SeqCst);
        let (log, subject, server) = (log2.clone(), subject2.clone(), server2.clone());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime")
                .block_on(competing_write(log.as_ref(), &subject, &server))
        })
        .join()
        .expect("competing writer");
        Ok(vec![enabled(&server2)])
    })
    .await
    .expect_err("gives up");
    assert!(
        matches!(error, CommandError::TooManyConflicts { attempts, .. } if attempts == MAX_CONFLICT_RETRIES + 1),
        "{error}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), MAX_CONFLICT_RETRIES + 1);
    let history = log.read_aggregate(&subject).await.expect("read");
    assert_eq!(
        history.events.len() as u32,
        MAX_CONFLICT_RETRIES + 1,
        "only the competing writes"
    );
}

#[tokio::test]
async fn a_refused_or_empty_decision_writes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open_log(dir.path()).await;
    let subject = Subject::parse(&format!("server.{}", ServerId::new())).expect("subject");
    let written = execute::<EventCount, _>(log.as_ref(), &builder(), &subject, &context(), |_| {
        Ok(vec![])
    })
    .await
    .expect("nothing to do is fine");
    assert!(!written.changed_anything());
    let error = execute::<EventCount, _>(log.as_ref(), &builder(), &subject, &context(), |_| {
        Err(domain::DomainError::ServerNotFound)
    })
    .await
    .expect_err("refused");
    assert!(matches!(
        error,
        CommandError::Domain(domain::DomainError::ServerNotFound)
    ));
    assert_eq!(
        log.last_sequence(eventlog::LogKind::Config)
            .await
            .expect("end"),
        0
    );
}

#[test]
fn envelopes_say_who_when_and_why() {
    let clock = Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    ));
    let builder = EnvelopeBuilder::new(clock.clone());
    let user = CommandContext::user(UserId::parse("alice@example.com").expect("user"), "req-42");
    let envelopes = builder.wrap(&user, vec![enabled("a"), enabled("b")]);
    assert_eq!(envelopes.len(), 2);
    for envelope in &envelopes {
        let id = uuid::Uuid::parse_str(&envelope.event_id).expect("UUID");
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(envelope.occurred_at.map(|t| t.seconds), Some(1_800_000_000));
        assert_eq!(envelope.correlation_id, "req-42");
        assert_eq!(envelope.causation_id, "req-42");
        assert_eq!(envelope.schema_version, proto::SCHEMA_VERSION);
        assert_eq!(
            envelope.actor.as_ref().and_then(|a| a.kind.clone()),
            Some(actor::Kind::UserId("alice@example.com".into()))
        );
    }
    assert_ne!(envelopes[0].event_id, envelopes[1].event_id);
    clock.advance(Duration::from_secs(5));
    let reaction = CommandContext::reaction("connection", &envelopes[0]);
    let caused: Vec<Envelope> = builder.wrap(&reaction, vec![enabled("c")]);
    assert_eq!(
        caused[0].correlation_id, "req-42",
        "a reaction keeps the correlation id"
    );
    assert_eq!(
        caused[0].causation_id, envelopes[0].event_id,
        "and names its cause"
    );
    assert_eq!(
        caused[0].occurred_at.map(|t| t.seconds),
        Some(1_800_000_005)
    );
    assert_eq!(
        caused[0].actor.as_ref().and_then(|a| a.kind.clone()),
        Some(actor::Kind::Service("connection".into()))
    );
}

#[tokio::test]
async fn after_wait_for_the_read_models_show_the_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log: Arc<dyn EventLog> = open_log(dir.path()).await;
    let checkpoints =
        Arc::new(FileCheckpointStore::open(&dir.path().join("checkpoints")).expect("checkpoints"));
    let models = ReadModels::start(log.clone(), checkpoints, CheckpointPolicy::default())
        .await
        .expect("read models");
    let id = ServerId::new();
    let subject = Subject::parse(&format!("server.{id}")).expect("subject");
    let written = execute::<EventCount, _>(log.as_ref(), &builder(), &subject, &context(), |_| {
        Ok(vec![Event::ServerAdded(proto::v1::ServerAdded {
            server_id: id.to_string(),
            name: "GitHub".into(),
            slug: "github".into(),
            enabled: true,
            ..Default::default()
        })])
    })
    .await
    .expect("written");
    assert!(
        models.wait_for(&written, Duration::from_secs(10)).await,
        "read models caught up"
    );
    assert_eq!(
        models.servers.read(|d| d.get(id).map(|s| s.name.clone())),
        Some("GitHub".to_owned())
    );
    let status = &models.statuses()[0];
    assert_eq!(status.position, written.version);
}
