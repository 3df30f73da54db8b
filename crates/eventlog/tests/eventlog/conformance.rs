//! The behaviour every `EventLog` adapter must have. Each function is one rule; the
//! `conformance_suite!` macro instantiates all of them for an adapter.
use std::{collections::HashSet, sync::Arc, time::Duration};

use eventlog::{EventLog, EventLogError, ExpectedVersion, LogKind, SubjectFilter};
use futures_util::StreamExt;
use proto::v1::{Actor, Envelope, ServerAdded, ServerEnabled, actor, envelope::Event};

use crate::support::{event, subject};

/// Generous guard so a broken adapter fails the test instead of hanging CI; never used to
/// wait for something to happen.
const GUARD: Duration = Duration::from_secs(30);

pub async fn appended_events_read_back_in_order_with_their_version(log: Arc<dyn EventLog>) {
    let s = subject("server.s1");
    let first = log
        .append(&s, ExpectedVersion::NoEvents, &[event("s1")])
        .await
        .expect("first append");
    assert!(!first.duplicate);
    assert_eq!(first.first_sequence, first.last_sequence);
    let batch = [event("s1"), event("s1"), event("s1")];
    let second = log
        .append(&s, ExpectedVersion::At(first.last_sequence), &batch)
        .await
        .expect("batch append");
    assert_eq!(
        second.last_sequence - second.first_sequence,
        2,
        "a batch is contiguous"
    );

    let history = log.read_aggregate(&s).await.expect("read");
    assert_eq!(history.version, second.last_sequence);
    assert_eq!(history.events.len(), 4);
    let ids: Vec<_> = history
        .events
        .iter()
        .map(|e| e.envelope.event_id.clone())
        .collect();
    let mut expected = vec![];
    expected.push(ids[0].clone());
    expected.extend(batch.iter().map(|e| e.event_id.clone()));
    assert_eq!(ids, expected);
    for e in &history.events {
        assert_eq!(e.subject, s);
        assert_eq!(e.event_type, "ServerEnabled");
        assert_eq!(e.log, LogKind::Config);
        assert!(e.unknown_body.is_none());
    }
}

/// An envelope with every field set, unlike `support::event`.
fn full_envelope(server_id: &str) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::now_v7().to_string(),
        occurred_at: Some(proto::Timestamp {
            seconds: 1_764_000_123,
            nanos: 456_789_012,
        }),
        actor: Some(Actor {
            kind: Some(actor::Kind::UserId("alice@example.com".to_owned())),
        }),
        correlation_id: uuid::Uuid::now_v7().to_string(),
        causation_id: uuid::Uuid::now_v7().to_string(),
        schema_version: proto::SCHEMA_VERSION,
        write_id: uuid::Uuid::now_v7().to_string(),
        event: Some(Event::ServerAdded(ServerAdded {
            server_id: server_id.to_owned(),
            name: "Production \"GitHub\" — ünïcode".to_owned(),
            slug: "production_github".to_owned(),
            description: "line one\nline two\t{\"json\": true}".to_owned(),
            url: "https://mcp.example.com/mcp?x=1&y=2".to_owned(),
            catalog_entry_id: "github".to_owned(),
            oauth: None,
            enabled: true,
        })),
    }
}

pub async fn a_stored_event_reads_back_equal_to_what_was_appended(log: Arc<dyn EventLog>) {
    let s = subject("server.full");
    let single = full_envelope("full");
    let mut by_service = full_envelope("full");
    by_service.actor = Some(Actor {
        kind: Some(actor::Kind::Service("connection".to_owned())),
    });
    by_service.event = Some(Event::ServerEnabled(ServerEnabled {
        server_id: "full".to_owned(),
    }));
    let batch = [by_service, full_envelope("full")];
    log.append(&s, ExpectedVersion::NoEvents, std::slice::from_ref(&single))
        .await
        .expect("append");
    let outcome = log
        .append(&s, ExpectedVersion::Any, &batch)
        .await
        .expect("append a batch");
    let appended = [single.clone(), batch[0].clone(), batch[1].clone()];

    let history = log.read_aggregate(&s).await.expect("read");
    let envelopes: Vec<Envelope> = history.events.iter().map(|e| e.envelope.clone()).collect();
    assert_eq!(envelopes, appended, "read_aggregate");
    let event_types: Vec<&str> = history.events.iter().map(|e| &*e.event_type).collect();
    assert_eq!(event_types, ["ServerAdded", "ServerEnabled", "ServerAdded"]);

    let replayed: Vec<Envelope> = log
        .read_from(LogKind::Config, 0, None)
        .await
        .expect("read_from")
        .map(|r| r.expect("event").envelope)
        .collect()
        .await;
    assert_eq!(replayed, appended, "read_from");

    let mut live = log
        .subscribe(LogKind::Config, 0, None)
        .await
        .expect("subscribe");
    let mut delivered = vec![];
    while delivered.len() < appended.len() {
        let next = tokio::time::timeout(GUARD, live.next())
            .await
            .expect("subscriber stalled")
            .expect("stream ended")
            .expect("event");
        delivered.push(next.envelope);
    }
    assert_eq!(delivered, appended, "subscribe");
    assert_eq!(outcome.last_sequence, 3);

    for (sequence, expected) in (1..).zip(&appended) {
        let read = log
            .read_event(LogKind::Config, sequence)
            .await
            .expect("read_event")
            .expect("an event at that sequence");
        assert_eq!((read.sequence, &read.envelope), (sequence, expected));
    }
    assert!(
        log.read_event(LogKind::Config, 4)
            .await
            .expect("read_event past the end")
            .is_none()
    );
}

/// The claim an invocation's exclusive events rest on: writers that each append their own
/// event under one shared event id, with no expected version, store exactly one of them; every
/// writer learns where it is, and reading it there tells each whether it is its own.
pub async fn competing_writers_of_one_event_id_store_one_and_each_learns_whose(
    log: Arc<dyn EventLog>,
) {
    let s = subject("invocation.u_alice");
    let shared_id = uuid::Uuid::now_v7().to_string();
    let start = Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = vec![];
    for writer in 0..8 {
        let (log, s, start) = (log.clone(), s.clone(), start.clone());
        let mut envelope = full_envelope(&format!("writer{writer}"));
        envelope.event_id = shared_id.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let outcome = log
                .append(&s, ExpectedVersion::Any, std::slice::from_ref(&envelope))
                .await
                .expect("append");
            (envelope, outcome)
        }));
    }
    let mut stored_at = std::collections::BTreeSet::new();
    let mut own = 0;
    for task in tasks {
        let (envelope, outcome) = task.await.expect("task");
        stored_at.insert(outcome.last_sequence);
        let stored = log
            .read_event(LogKind::Invocations, outcome.last_sequence)
            .await
            .expect("read_event")
            .expect("the stored event");
        assert_eq!(stored.envelope.event_id, shared_id);
        if stored.envelope.write_id == envelope.write_id {
            assert!(!outcome.duplicate);
            own += 1;
        } else {
            assert!(outcome.duplicate);
        }
    }
    assert_eq!(stored_at.len(), 1, "every writer learns the one sequence");
    assert_eq!(own, 1, "exactly one writer finds its own event");
    assert_eq!(log.read_aggregate(&s).await.expect("read").events.len(), 1);
}

/// One rule for both adapters: an envelope without an event body is refused (no event type
/// could be recorded for it, and no reader could fold it). Only events of a type this version
/// does not know read back without a body.
pub async fn an_envelope_without_a_body_is_refused(log: Arc<dyn EventLog>) {
    let s = subject("server.nobody");
    let mut empty = event("nobody");
    empty.event = None;
    let err = log
        .append(&s, ExpectedVersion::Any, std::slice::from_ref(&empty))
        .await
        .expect_err("an envelope without a body");
    assert!(matches!(err, EventLogError::InvalidEvent { .. }), "{err}");
    let err = log
        .append(&s, ExpectedVersion::Any, &[event("nobody"), empty])
        .await
        .expect_err("a batch with an envelope without a body");
    assert!(matches!(err, EventLogError::InvalidEvent { .. }), "{err}");
    assert_eq!(log.read_aggregate(&s).await.expect("read").version, 0);
    assert_eq!(log.last_sequence(LogKind::Config).await.expect("last"), 0);
}

pub async fn a_single_event_retried_at_its_expected_version_after_a_lost_ack_is_a_duplicate(
    log: Arc<dyn EventLog>,
) {
    let s = subject("server.retry1");
    let v = log
        .append(&s, ExpectedVersion::NoEvents, &[event("retry1")])
        .await
        .expect("append")
        .last_sequence;
    let e = event("retry1");
    let original = log
        .append(&s, ExpectedVersion::At(v), std::slice::from_ref(&e))
        .await
        .expect("append at the version");
    // The acknowledgement was lost; the writer retries exactly what it sent.
    let retried = log
        .append(&s, ExpectedVersion::At(v), std::slice::from_ref(&e))
        .await
        .expect("the retry is not a conflict");
    assert!(retried.duplicate);
    assert_eq!(
        (retried.first_sequence, retried.last_sequence),
        (original.first_sequence, original.last_sequence)
    );
    // A different event at the same stale version is a conflict.
    let err = log
        .append(&s, ExpectedVersion::At(v), &[event("retry1")])
        .await
        .expect_err("stale version");
    assert!(err.is_conflict(), "{err}");
    assert_eq!(log.read_aggregate(&s).await.expect("read").events.len(), 2);
}

pub async fn a_retry_after_another_writer_appended_is_still_a_duplicate(log: Arc<dyn EventLog>) {
    let s = subject("server.retry2");
    let v = log
        .append(&s, ExpectedVersion::NoEvents, &[event("retry2")])
        .await
        .expect("append")
        .last_sequence;
    let single = event("retry2");
    let batch = [event("retry2"), event("retry2")];
    let single_outcome = log
        .append(&s, ExpectedVersion::At(v), std::slice::from_ref(&single))
        .await
        .expect("append one");
    let batch_outcome = log
        .append(
            &s,
            ExpectedVersion::At(single_outcome.last_sequence),
            &batch,
        )
        .await
        .expect("append a batch");
    // Another writer appends to the same aggregate before the retries arrive, so the retried
    // events are no longer the aggregate's latest.
    let other = log
        .append(
            &s,
            ExpectedVersion::At(batch_outcome.last_sequence),
            &[event("retry2")],
        )
        .await
        .expect("another writer");

    let retried = log
        .append(&s, ExpectedVersion::At(v), std::slice::from_ref(&single))
        .await
        .expect("retry of the single event");
    assert!(retried.duplicate);
    assert_eq!(retried.first_sequence, single_outcome.first_sequence);
    let retried = log
        .append(
            &s,
            ExpectedVersion::At(single_outcome.last_sequence),
            &batch,
        )
        .await
        .expect("retry of the batch");
    assert!(retried.duplicate);
    assert_eq!(
        (retried.first_sequence, retried.last_sequence),
        (batch_outcome.first_sequence, batch_outcome.last_sequence)
    );
    let history = log.read_aggregate(&s).await.expect("read");
    assert_eq!(history.events.len(), 5);
    assert_eq!(history.version, other.last_sequence);
}

pub async fn an_append_repeating_only_some_stored_event_ids_is_refused(log: Arc<dyn EventLog>) {
    let s = subject("server.partial");
    let stored = event("partial");
    let v = log
        .append(&s, ExpectedVersion::NoEvents, std::slice::from_ref(&stored))
        .await
        .expect("append")
        .last_sequence;
    for expected in [ExpectedVersion::Any, ExpectedVersion::At(v)] {
        let err = log
            .append(&s, expected, &[stored.clone(), event("partial")])
            .await
            .expect_err("a batch mixing a stored and a new event id");
        assert!(
            matches!(err, EventLogError::InvalidEvent { .. }),
            "{expected:?}: {err}"
        );
        let err = log
            .append(&s, expected, &[event("partial"), stored.clone()])
            .await
            .expect_err("a batch ending in a stored event id");
        assert!(
            matches!(err, EventLogError::InvalidEvent { .. }),
            "{expected:?}: {err}"
        );
    }
    let history = log.read_aggregate(&s).await.expect("read");
    assert_eq!(history.events.len(), 1, "nothing of the refused batches");
    assert_eq!(log.last_sequence(LogKind::Config).await.expect("last"), v);
}

pub async fn an_unknown_aggregate_has_no_events_and_version_zero(log: Arc<dyn EventLog>) {
    let history = log
        .read_aggregate(&subject("server.nobody"))
        .await
        .expect("read");
    assert_eq!(history.version, 0);
    assert!(history.events.is_empty());
}

pub async fn conflicting_expected_version_is_refused_and_writes_nothing(log: Arc<dyn EventLog>) {
    let s = subject("server.s2");
    let v1 = log
        .append(&s, ExpectedVersion::NoEvents, &[event("s2")])
        .await
        .expect("append")
        .last_sequence;

    let err = log
        .append(&s, ExpectedVersion::NoEvents, &[event("s2")])
        .await
        .expect_err("NoEvents on an existing aggregate");
    assert!(err.is_conflict(), "{err}");

    let err = log
        .append(&s, ExpectedVersion::At(v1 + 7), &[event("s2"), event("s2")])
        .await
        .expect_err("wrong version");
    match err {
        EventLogError::Conflict { actual, .. } => assert_eq!(actual, Some(v1)),
        other => panic!("expected Conflict, got {other}"),
    }

    let history = log.read_aggregate(&s).await.expect("read");
    assert_eq!(
        history.events.len(),
        1,
        "nothing written by refused appends"
    );
    assert_eq!(history.version, v1);
    assert_eq!(log.last_sequence(LogKind::Config).await.expect("last"), v1);
}

pub async fn concurrent_writers_at_the_same_version_have_exactly_one_winner(
    log: Arc<dyn EventLog>,
) {
    let s = subject("server.race");
    let v = log
        .append(&s, ExpectedVersion::NoEvents, &[event("race")])
        .await
        .expect("append")
        .last_sequence;
    let mut tasks = vec![];
    for _ in 0..8 {
        let log = log.clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            log.append(&s, ExpectedVersion::At(v), &[event("race")])
                .await
        }));
    }
    let mut won = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => won += 1,
            Err(e) => assert!(e.is_conflict(), "{e}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(log.read_aggregate(&s).await.expect("read").events.len(), 2);
}

pub async fn a_retried_append_with_the_same_event_ids_is_stored_once(log: Arc<dyn EventLog>) {
    let s = subject("server.s3");
    let batch = [event("s3"), event("s3")];
    let original = log
        .append(&s, ExpectedVersion::NoEvents, &batch)
        .await
        .expect("append");
    // The retry a writer makes after a lost acknowledgement: same ids, same (now stale)
    // expected version. It must be recognised as a duplicate, not a conflict.
    let retried = log
        .append(&s, ExpectedVersion::NoEvents, &batch)
        .await
        .expect("retry is not an error");
    assert!(retried.duplicate);
    assert_eq!(retried.first_sequence, original.first_sequence);
    assert_eq!(retried.last_sequence, original.last_sequence);
    let single = log
        .append(&s, ExpectedVersion::Any, &batch[..1])
        .await
        .expect("retry of a single event");
    assert!(single.duplicate);
    assert_eq!(single.first_sequence, original.first_sequence);

    let history = log.read_aggregate(&s).await.expect("read");
    assert_eq!(history.events.len(), 2);
    assert_eq!(
        log.last_sequence(LogKind::Config).await.expect("last"),
        original.last_sequence
    );
}

pub async fn replay_returns_every_event_in_log_order_with_its_sequence(log: Arc<dyn EventLog>) {
    let mut appended = vec![];
    for i in 0..30 {
        let s = subject(&format!("server.r{}", i % 4));
        let e = event("r");
        let outcome = log
            .append(&s, ExpectedVersion::Any, std::slice::from_ref(&e))
            .await
            .expect("append");
        appended.push((outcome.first_sequence, s, e.event_id));
    }
    // An invocation event goes to the other log and must not show up here.
    let inv = log
        .append(
            &subject("invocation.u_alice"),
            ExpectedVersion::Any,
            &[event("x")],
        )
        .await
        .expect("append invocation");
    assert_eq!(inv.first_sequence, 1, "each log has its own sequence");

    let replayed: Vec<_> = log
        .read_from(LogKind::Config, 0, None)
        .await
        .expect("read_from")
        .map(|r| r.expect("event"))
        .collect()
        .await;
    let got: Vec<_> = replayed
        .iter()
        .map(|e| (e.sequence, e.subject.clone(), e.envelope.event_id.clone()))
        .collect();
    assert_eq!(got, appended);

    let tail: Vec<_> = log
        .read_from(LogKind::Config, 11, None)
        .await
        .expect("read_from mid")
        .map(|r| r.expect("event").sequence)
        .collect()
        .await;
    assert_eq!(tail, (11..=30).collect::<Vec<_>>());

    let filter = SubjectFilter::parse("server.r1").expect("filter");
    let filtered: Vec<_> = log
        .read_from(LogKind::Config, 0, Some(&filter))
        .await
        .expect("filtered")
        .map(|r| r.expect("event").subject.to_string())
        .collect()
        .await;
    assert_eq!(
        filtered.len(),
        appended
            .iter()
            .filter(|a| a.1.as_str() == "server.r1")
            .count()
    );
    assert!(filtered.iter().all(|s| s == "server.r1"));

    let invocations: Vec<_> = log
        .read_from(LogKind::Invocations, 0, None)
        .await
        .expect("invocations")
        .map(|r| r.expect("event"))
        .collect()
        .await;
    assert_eq!(invocations.len(), 1);
    assert_eq!(invocations[0].log, LogKind::Invocations);
    assert_eq!(
        log.last_sequence(LogKind::Invocations).await.expect("last"),
        1
    );
}

pub async fn a_subscriber_started_mid_stream_sees_every_later_event_exactly_once(
    log: Arc<dyn EventLog>,
) {
    for _ in 0..50 {
        log.append(
            &subject("server.live"),
            ExpectedVersion::Any,
            &[event("live")],
        )
        .await
        .expect("append");
    }
    let mut live = log
        .subscribe(LogKind::Config, 26, None)
        .await
        .expect("subscribe");
    let writer = {
        let log = log.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                let s = subject(&format!("server.live{}", i % 3));
                log.append(&s, ExpectedVersion::Any, &[event("live")])
                    .await
                    .expect("append while subscribed");
            }
        })
    };
    let mut seen = vec![];
    let mut ids = HashSet::new();
    while seen.len() < 75 {
        let next = tokio::time::timeout(GUARD, live.next())
            .await
            .expect("subscriber stalled")
            .expect("stream ended")
            .expect("event");
        assert!(
            ids.insert(next.envelope.event_id.clone()),
            "an event seen twice"
        );
        seen.push(next.sequence);
    }
    writer.await.expect("writer");
    assert_eq!(seen, (26..=100).collect::<Vec<_>>());

    // Nothing more arrives until something is appended, and then exactly that.
    let more = log
        .append(
            &subject("server.live"),
            ExpectedVersion::Any,
            &[event("live")],
        )
        .await
        .expect("append");
    let next = tokio::time::timeout(GUARD, live.next())
        .await
        .expect("subscriber stalled")
        .expect("stream ended")
        .expect("event");
    assert_eq!(next.sequence, more.first_sequence);
}

pub async fn a_filtered_subscription_sees_only_matching_subjects(log: Arc<dyn EventLog>) {
    let filter = SubjectFilter::parse("connection.*.u_bob").expect("filter");
    let mut live = log
        .subscribe(LogKind::Config, 0, Some(&filter))
        .await
        .expect("subscribe");
    log.append(
        &subject("connection.s1.u_alice"),
        ExpectedVersion::Any,
        &[event("a")],
    )
    .await
    .expect("append");
    let bob = log
        .append(
            &subject("connection.s1.u_bob"),
            ExpectedVersion::Any,
            &[event("b")],
        )
        .await
        .expect("append");
    let next = tokio::time::timeout(GUARD, live.next())
        .await
        .expect("subscriber stalled")
        .expect("stream ended")
        .expect("event");
    assert_eq!(next.sequence, bob.first_sequence);
    assert_eq!(next.subject.as_str(), "connection.s1.u_bob");
}

pub async fn events_that_are_not_valid_are_refused(log: Arc<dyn EventLog>) {
    let mut bad = event("s");
    bad.event_id = "not-a-uuid".to_owned();
    let err = log
        .append(&subject("server.bad"), ExpectedVersion::Any, &[bad])
        .await
        .expect_err("event id must be a UUID");
    assert!(matches!(err, EventLogError::InvalidEvent { .. }), "{err}");
    let err = log
        .append(&subject("server.bad"), ExpectedVersion::Any, &[])
        .await
        .expect_err("empty append");
    assert!(matches!(err, EventLogError::InvalidEvent { .. }), "{err}");
    assert_eq!(
        log.read_aggregate(&subject("server.bad"))
            .await
            .expect("read")
            .version,
        0
    );
}

pub async fn the_longest_user_key_fits_in_a_subject(log: Arc<dyn EventLog>) {
    // A 256-character user id of 4-byte characters, every byte escaped (domain::UserKey).
    let s = subject(&format!("invocation.{}", "_F0_9F_98_80".repeat(256)));
    let outcome = log
        .append(&s, ExpectedVersion::NoEvents, &[event("long")])
        .await
        .expect("append under the longest subject");
    let history = log.read_aggregate(&s).await.expect("read");
    assert_eq!(history.version, outcome.last_sequence);
    assert_eq!(history.events[0].subject, s);
}

/// Instantiates every conformance rule as a `#[tokio::test]` for one adapter. `$open` is an
/// async expression yielding a fresh `support::TestLog`.
#[macro_export]
macro_rules! conformance_suite {
    ($open:expr) => {
        $crate::conformance_suite!(@tests $open;
            appended_events_read_back_in_order_with_their_version,
            an_unknown_aggregate_has_no_events_and_version_zero,
            conflicting_expected_version_is_refused_and_writes_nothing,
            concurrent_writers_at_the_same_version_have_exactly_one_winner,
            a_retried_append_with_the_same_event_ids_is_stored_once,
            replay_returns_every_event_in_log_order_with_its_sequence,
            a_subscriber_started_mid_stream_sees_every_later_event_exactly_once,
            a_filtered_subscription_sees_only_matching_subjects,
            events_that_are_not_valid_are_refused,
            the_longest_user_key_fits_in_a_subject,
            a_stored_event_reads_back_equal_to_what_was_appended,
            an_envelope_without_a_body_is_refused,
            a_single_event_retried_at_its_expected_version_after_a_lost_ack_is_a_duplicate,
            a_retry_after_another_writer_appended_is_still_a_duplicate,
            an_append_repeating_only_some_stored_event_ids_is_refused,
            competing_writers_of_one_event_id_store_one_and_each_learns_whose,
        );
    };
    (@tests $open:expr; $($rule:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $rule() {
                let test_log: $crate::support::TestLog = $open.await;
                $crate::conformance::$rule(test_log.log.clone()).await;
            }
        )*
    };
}
