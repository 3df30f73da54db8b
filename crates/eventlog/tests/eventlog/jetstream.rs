//! The JetStream adapter: the conformance suite on a real nats-server, and the rules only
//! JetStream has (append-only streams, surviving a server crash, reading what a newer version
//! wrote, checkpoints in KV).
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use eventlog::{
    EventLog, EventLogError, ExpectedVersion, LogKind, UnknownBody,
    jetstream::{AggregateReads, JetStreamConfig, JetStreamLog, KvCheckpointStore},
    projection::{Checkpoint, CheckpointStore},
};
use futures_util::StreamExt;
use proto::{Message as _, v1::Envelope};

use crate::support::{TestLog, event, subject};

/// Guard against a hang; never used to wait for something to happen.
const GUARD: Duration = Duration::from_secs(60);

async fn connect(url: &str, config: JetStreamConfig) -> JetStreamLog {
    let client = async_nats::connect(url)
        .await
        .expect("connect to nats-server");
    JetStreamLog::connect(client, config)
        .await
        .expect("JetStream log")
}

async fn open_jetstream() -> TestLog {
    open_jetstream_with(AggregateReads::Auto).await
}

async fn open_jetstream_with(aggregate_reads: AggregateReads) -> TestLog {
    let prefix = testkit::unique_name("t");
    let config = JetStreamConfig {
        aggregate_reads,
        ..JetStreamConfig::with_prefix(&prefix)
    };
    let log = connect(&testkit::shared_nats().url(), config).await;
    TestLog {
        log: Arc::new(log),
        _guard: Box::new(prefix),
    }
}

// On one server `read_aggregate` uses direct get.
crate::conformance_suite!(open_jetstream());

/// The same rules with aggregates read through ordered consumers, as on replicated streams.
mod ordered_consumer_reads {
    use eventlog::jetstream::AggregateReads;

    crate::conformance_suite!(super::open_jetstream_with(AggregateReads::OrderedConsumer));
}

async fn collect_ids(log: &JetStreamLog, kind: LogKind) -> Vec<(u64, String)> {
    tokio::time::timeout(GUARD, async {
        log.read_from(kind, 0, None)
            .await
            .expect("read_from")
            .map(|e| {
                let e = e.expect("event");
                (e.sequence, e.envelope.event_id)
            })
            .collect::<Vec<_>>()
            .await
    })
    .await
    .expect("replay stalled")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_refuse_delete_and_purge() {
    let prefix = testkit::unique_name("t");
    let log = connect(
        &testkit::shared_nats().url(),
        JetStreamConfig::with_prefix(&prefix),
    )
    .await;
    let s = subject("server.keep");
    let outcome = log
        .append(
            &s,
            ExpectedVersion::NoEvents,
            &[event("keep"), event("keep")],
        )
        .await
        .expect("append");

    let stream = log
        .jetstream()
        .get_stream(log.stream_name(LogKind::Config))
        .await
        .expect("stream");
    assert!(stream.cached_info().config.deny_delete);
    assert!(stream.cached_info().config.deny_purge);
    assert!(
        stream.delete_message(outcome.first_sequence).await.is_err(),
        "deleting an event must be refused"
    );
    assert!(
        stream.purge().await.is_err(),
        "purging the stream must be refused"
    );
    assert!(
        stream.purge().filter(log.nats_subject(&s)).await.is_err(),
        "purging an aggregate must be refused"
    );

    let history = log.read_aggregate(&s).await.expect("read");
    assert_eq!(history.events.len(), 2, "the events remain");
    assert_eq!(history.version, outcome.last_sequence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connect_reuses_the_streams() {
    let prefix = testkit::unique_name("t");
    let url = testkit::shared_nats().url();
    let first = connect(&url, JetStreamConfig::with_prefix(&prefix)).await;
    let s = subject("server.reused");
    let outcome = first
        .append(&s, ExpectedVersion::NoEvents, &[event("reused")])
        .await
        .expect("append");
    let created = first
        .jetstream()
        .get_stream(first.stream_name(LogKind::Config))
        .await
        .expect("stream")
        .cached_info()
        .created;

    let second = connect(&url, JetStreamConfig::with_prefix(&prefix)).await;
    assert_eq!(
        second.stream_name(LogKind::Config),
        first.stream_name(LogKind::Config)
    );
    let history = second.read_aggregate(&s).await.expect("read");
    assert_eq!(history.version, outcome.last_sequence);
    let info = second
        .jetstream()
        .get_stream(second.stream_name(LogKind::Config))
        .await
        .expect("stream");
    assert_eq!(
        info.cached_info().created,
        created,
        "the same stream, not a new one"
    );
    assert_eq!(info.cached_info().state.messages, 1);
}

/// An envelope as a newer Switchboard would write it: an event body in a field this version
/// does not know (999), so prost decodes it with `event == None`.
fn future_envelope_bytes() -> (String, Bytes) {
    let id = uuid::Uuid::now_v7().to_string();
    let envelope = Envelope {
        event_id: id.clone(),
        schema_version: proto::SCHEMA_VERSION + 1,
        ..Default::default()
    };
    let mut bytes = envelope.encode_to_vec();
    // Field 999, wire type 2 (length-delimited): key varint 7994 = 0xba 0x3e.
    bytes.extend_from_slice(&[0xba, 0x3e, 5]);
    bytes.extend_from_slice(b"later");
    (id, Bytes::from(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_an_unknown_type_reads_back_with_its_name_and_bytes() {
    let prefix = testkit::unique_name("t");
    let log = connect(
        &testkit::shared_nats().url(),
        JetStreamConfig::with_prefix(&prefix),
    )
    .await;
    let s = subject("server.future");
    log.append(&s, ExpectedVersion::NoEvents, &[event("future")])
        .await
        .expect("append");

    let (id, bytes) = future_envelope_bytes();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.as_str());
    headers.insert("Sb-Event-Type", "FutureEvent");
    log.jetstream()
        .publish_with_headers(log.nats_subject(&s), headers, bytes.clone())
        .await
        .expect("publish")
        .await
        .expect("ack");

    let history = log.read_aggregate(&s).await.expect("read");
    assert_eq!(history.events.len(), 2);
    let future = &history.events[1];
    assert_eq!(future.event_type, "FutureEvent");
    assert_eq!(future.envelope.event_id, id);
    assert!(future.envelope.event.is_none());
    assert_eq!(future.unknown_body, Some(UnknownBody::Protobuf(bytes)));
    assert_eq!(history.events[0].event_type, "ServerEnabled");
    assert!(history.events[0].unknown_body.is_none());

    // Appending after it works as usual.
    log.append(&s, ExpectedVersion::At(history.version), &[event("future")])
        .await
        .expect("append after an unknown event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_be_decoded_is_reported_and_the_replay_goes_on() {
    let prefix = testkit::unique_name("t");
    let log = connect(
        &testkit::shared_nats().url(),
        JetStreamConfig::with_prefix(&prefix),
    )
    .await;
    let s = subject("server.garbled");
    log.append(&s, ExpectedVersion::Any, &[event("g")])
        .await
        .expect("append");
    log.jetstream()
        .publish(
            log.nats_subject(&s),
            Bytes::from_static(&[0xff, 0xff, 0xff]),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    log.append(&s, ExpectedVersion::Any, &[event("g")])
        .await
        .expect("append");

    let items: Vec<_> = log
        .read_from(LogKind::Config, 0, None)
        .await
        .expect("read_from")
        .collect()
        .await;
    assert_eq!(items.len(), 3);
    assert!(items[0].is_ok());
    match &items[1] {
        Err(EventLogError::Corrupt { location, .. }) => {
            assert!(location.contains("sequence 2"), "{location}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(items[2].as_ref().expect("event").sequence, 3);
    let err = log
        .read_aggregate(&s)
        .await
        .expect_err("a corrupt aggregate");
    assert!(matches!(err, EventLogError::Corrupt { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_round_trip_through_kv() {
    let prefix = testkit::unique_name("t");
    let log = connect(
        &testkit::shared_nats().url(),
        JetStreamConfig::with_prefix(&prefix),
    )
    .await;
    let store = log.checkpoint_store().await.expect("bucket");
    assert_eq!(store.load("servers").await.expect("load"), None);

    let first = Checkpoint {
        position: 41,
        snapshot: Bytes::from_static(b"{\"servers\":[]}"),
    };
    store.save("servers", &first).await.expect("save");
    assert_eq!(store.load("servers").await.expect("load"), Some(first));

    let second = Checkpoint {
        position: u64::MAX - 1,
        snapshot: Bytes::new(),
    };
    store.save("servers", &second).await.expect("save");
    // A second handle on the same bucket sees it.
    let again = KvCheckpointStore::open(log.jetstream(), &log.config().checkpoint_bucket())
        .await
        .expect("bucket again");
    assert_eq!(
        again.load("servers").await.expect("load"),
        Some(second.clone())
    );

    let too_big = Checkpoint {
        position: 50,
        snapshot: Bytes::from(vec![7u8; 2 * 1024 * 1024]),
    };
    let err = store
        .save("servers", &too_big)
        .await
        .expect_err("over max_payload");
    assert!(err.to_string().contains("max_payload"), "{err}");
    assert_eq!(
        store.load("servers").await.expect("load"),
        Some(second),
        "previous kept"
    );

    let err = store.load("no spaces").await.expect_err("invalid key");
    assert!(matches!(err, EventLogError::InvalidEvent { .. }), "{err}");
}

/// What one writer task appended and got acknowledged.
#[derive(Default)]
struct Acked {
    /// event id → sequence the append reported.
    sequences: HashMap<String, u64>,
    /// Appends the adapter reported as duplicates (retries whose first attempt was stored).
    duplicates: usize,
    /// Appends that failed as a whole and were repeated by the writer with the same ids.
    repeated: usize,
}

/// Appends `count` times to subjects of its own: single events with and without an expected
/// version, and batches of two. Repeats an append that fails as unavailable, with the same
/// events and expectation, as a service would.
async fn write(
    log: Arc<JetStreamLog>,
    writer: usize,
    count: usize,
    acked_so_far: Arc<tokio::sync::watch::Sender<usize>>,
) -> Acked {
    let mut acked = Acked::default();
    let mut versions: HashMap<String, u64> = HashMap::new();
    for i in 0..count {
        // A fifth of the appends are batches: atomic batches cost the server a staging store
        // each (about 15 ms on file storage), single events about 0.1 ms.
        let (name, versioned, batch) = match i % 10 {
            0..=3 => (format!("server.w{writer}v{}", i % 2), true, false),
            4 => (format!("server.w{writer}batch"), true, true),
            5 => (format!("server.w{writer}anybatch"), false, true),
            _ => (format!("server.w{writer}any{}", i % 3), false, false),
        };
        let s = subject(&name);
        let events: Vec<Envelope> = (0..if batch { 2 } else { 1 })
            .map(|_| event(&name))
            .collect();
        let expected = if versioned {
            ExpectedVersion::from_loaded(versions.get(&name).copied().unwrap_or(0))
        } else {
            ExpectedVersion::Any
        };
        let mut tries = 0;
        let outcome = loop {
            match log.append(&s, expected, &events).await {
                Ok(outcome) => break outcome,
                Err(EventLogError::Unavailable { reason }) if tries < 5 => {
                    tries += 1;
                    acked.repeated += 1;
                    eprintln!("writer {writer}: repeating an append: {reason}");
                }
                Err(err) => panic!("writer {writer}, append {i} to {name}: {err}"),
            }
        };
        if outcome.duplicate {
            acked.duplicates += 1;
        }
        assert_eq!(
            outcome.last_sequence - outcome.first_sequence + 1,
            events.len() as u64
        );
        versions.insert(name, outcome.last_sequence);
        for (k, e) in events.iter().enumerate() {
            acked
                .sequences
                .insert(e.event_id.clone(), outcome.first_sequence + k as u64);
        }
        acked_so_far.send_modify(|n| *n += 1);
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_a_server_kill_exactly_once() {
    // Many writers, so that several appends are in flight when the server dies.
    const WRITERS: usize = 16;
    const APPENDS_PER_WRITER: usize = 100;
    let server = testkit::NatsServer::start();
    let client = async_nats::connect(server.url()).await.expect("connect");
    let sent = client.statistics();
    let config = JetStreamConfig {
        ack_timeout: Duration::from_secs(1),
        max_append_attempts: 30,
        retry_backoff: Duration::from_millis(20),
        ..JetStreamConfig::with_prefix(testkit::unique_name("t"))
    };
    let log = Arc::new(JetStreamLog::connect(client, config).await.expect("log"));
    // A live subscriber across the crash: it must see every event exactly once, in order.
    let mut live = log
        .subscribe(LogKind::Config, 0, None)
        .await
        .expect("subscribe");
    let (seen_tx, mut seen_rx) = tokio::sync::watch::channel(Vec::<(u64, String)>::new());
    let subscriber = tokio::spawn(async move {
        while let Some(next) = live.next().await {
            let next = next.expect("event from the live subscription");
            seen_tx.send_modify(|seen| seen.push((next.sequence, next.envelope.event_id)));
        }
    });

    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0usize);
    let acked_tx = Arc::new(acked_tx);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(write(log.clone(), w, APPENDS_PER_WRITER, acked_tx.clone())))
        .collect();

    // Lost acknowledgements, forced: once a tenth of the appends were acknowledged, freeze
    // the server while appends are in flight, until the writers have timed out and sent their
    // retries. Resumed, the server stores each original and then sees its retry, whose
    // answer must be the original outcome marked as a duplicate.
    tokio::time::timeout(
        GUARD,
        acked_rx.wait_for(|n| *n >= WRITERS * APPENDS_PER_WRITER / 10),
    )
    .await
    .expect("writers stalled before the pause")
    .expect("watch");
    server.pause();
    let sent_before = sent.out_messages.load(Ordering::Relaxed);
    tokio::time::timeout(GUARD, async {
        // Every writer has one append in flight; 3 messages per writer means retries went out
        // (an attempt sends one message, two for a batch). Polled: the client offers no
        // notification for messages sent.
        while sent.out_messages.load(Ordering::Relaxed) < sent_before + 3 * WRITERS as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the writers sent no retries while the server was frozen");
    server.resume();

    // Kill the server mid-run, once a quarter of the appends were acknowledged.
    tokio::time::timeout(
        GUARD,
        acked_rx.wait_for(|n| *n >= WRITERS * APPENDS_PER_WRITER / 4),
    )
    .await
    .expect("writers stalled before the kill")
    .expect("watch");
    let server = tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.kill();
        server.restart();
        server
    })
    .await
    .expect("restart");

    let mut acked = Acked::default();
    for writer in writers {
        let part = tokio::time::timeout(Duration::from_secs(180), writer)
            .await
            .expect("writer stalled after the restart")
            .expect("writer");
        acked.sequences.extend(part.sequences);
        acked.duplicates += part.duplicates;
        acked.repeated += part.repeated;
    }
    eprintln!(
        "{} events acknowledged; {} appends answered as duplicates, {} repeated by the writer",
        acked.sequences.len(),
        acked.duplicates,
        acked.repeated
    );
    assert!(
        acked.duplicates > 0,
        "the lost-acknowledgement path ran: some retry found its original stored"
    );

    let stored = collect_ids(&log, LogKind::Config).await;
    let mut seen = HashSet::new();
    for (sequence, id) in &stored {
        assert!(
            seen.insert(id.clone()),
            "event {id} stored twice (again at {sequence})"
        );
    }
    for (id, sequence) in &acked.sequences {
        assert!(
            stored.contains(&(*sequence, id.clone())),
            "acknowledged event {id} is not at sequence {sequence}"
        );
    }
    // Nothing was stored that was not acknowledged: every append eventually succeeded.
    assert_eq!(stored.len(), acked.sequences.len());

    let delivered =
        tokio::time::timeout(GUARD, seen_rx.wait_for(|seen| seen.len() >= stored.len()))
            .await
            .expect("subscriber stalled after the restart")
            .expect("subscriber task ended")
            .clone();
    assert_eq!(
        delivered, stored,
        "the subscriber saw every event once, in order"
    );
    subscriber.abort();
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_prefixes_that_name_streams_of_their_own_are_accepted() {
    let url = testkit::shared_nats().url();
    let base = testkit::unique_name("pfx");
    // Each of these would share streams with `base` (or another valid prefix) if the
    // stream-name mapping (upper-casing, dots as `_`) merged them.
    for prefix in [
        base.to_uppercase(),
        format!("{base}.x"),
        format!("{}.{}", &base[..2], &base[2..]),
        String::new(),
        "a".repeat(65),
    ] {
        let client = async_nats::connect(&url).await.expect("connect");
        let err = JetStreamLog::connect(client, JetStreamConfig::with_prefix(&prefix))
            .await
            .expect_err("a prefix that could share streams");
        assert!(
            matches!(err, EventLogError::InvalidSubject { .. }),
            "{prefix}: {err}"
        );
    }
    let log = connect(&url, JetStreamConfig::with_prefix(format!("{base}_x-1"))).await;
    assert_eq!(
        log.stream_name(LogKind::Config),
        format!("{}_X-1_CONFIG", base.to_uppercase())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_that_retrying_cannot_fix_are_not_reported_as_unavailable() {
    let url = testkit::shared_nats().url();
    // Three replicas on a single server: the server refuses the stream.
    let client = async_nats::connect(&url).await.expect("connect");
    let config = JetStreamConfig {
        replicas: 3,
        ..JetStreamConfig::with_prefix(testkit::unique_name("t"))
    };
    let err = JetStreamLog::connect(client, config)
        .await
        .expect_err("three replicas on one server");
    assert!(matches!(err, EventLogError::Refused { .. }), "{err}");

    let client = async_nats::connect(&url).await.expect("connect");
    let config = JetStreamConfig {
        replicas: 0,
        ..JetStreamConfig::with_prefix(testkit::unique_name("t"))
    };
    let err = JetStreamLog::connect(client, config)
        .await
        .expect_err("no replicas");
    assert!(matches!(err, EventLogError::Refused { .. }), "{err}");

    // An auditor's prefix without streams.
    let client = async_nats::connect(&url).await.expect("connect");
    let err = JetStreamLog::connect_existing(
        client,
        JetStreamConfig::with_prefix(testkit::unique_name("t")),
    )
    .await
    .expect_err("no streams under this prefix");
    assert!(matches!(err, EventLogError::Refused { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_resume_within_a_second_of_a_restarted_server_answering() {
    // As many versioned writers as the outside fault runs used.
    const WRITERS: usize = 64;
    let mut server = testkit::NatsServer::start();
    let options = eventlog::jetstream::reconnect_promptly(async_nats::ConnectOptions::new());
    let client = options.connect(server.url()).await.expect("connect");
    let log = Arc::new(
        JetStreamLog::connect(
            client,
            JetStreamConfig::with_prefix(testkit::unique_name("t")),
        )
        .await
        .expect("log"),
    );

    // Each writer appends to its own aggregate at the version it last saw, until told to stop,
    // and records when each acknowledged append started and ended.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0usize);
    let acked_tx = Arc::new(acked_tx);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let log = log.clone();
            let stop = stop.clone();
            let acked_tx = acked_tx.clone();
            tokio::spawn(async move {
                let s = subject(&format!("server.restart{w}"));
                let mut version = 0;
                let mut acked = vec![];
                while !stop.load(Ordering::Relaxed) {
                    let e = event("restart");
                    let started = std::time::Instant::now();
                    let outcome = log
                        .append(
                            &s,
                            ExpectedVersion::from_loaded(version),
                            std::slice::from_ref(&e),
                        )
                        .await
                        .unwrap_or_else(|err| panic!("writer {w}: {err}"));
                    version = outcome.last_sequence;
                    acked.push((started, std::time::Instant::now(), e.event_id, version));
                    acked_tx.send_modify(|n| *n += 1);
                }
                acked
            })
        })
        .collect();

    tokio::time::timeout(GUARD, acked_rx.wait_for(|n| *n >= 2_000))
        .await
        .expect("writers stalled before the kill")
        .expect("watch");
    let (server, answering_again) = tokio::task::spawn_blocking(move || {
        server.kill();
        server.restart();
        // `restart` returns once the server accepts clients again.
        let answering_again = std::time::Instant::now();
        (server, answering_again)
    })
    .await
    .expect("restart");
    let before = *acked_rx.borrow();
    tokio::time::timeout(GUARD, acked_rx.wait_for(|n| *n >= before + 2_000))
        .await
        .expect("writers stalled after the restart")
        .expect("watch");
    stop.store(true, Ordering::Relaxed);

    let mut acked = vec![];
    for writer in writers {
        acked.extend(
            tokio::time::timeout(GUARD, writer)
                .await
                .expect("writer stalled")
                .expect("writer"),
        );
    }
    // The appends that were waiting when the server came back, and the first one after it.
    let waiting_then: Vec<_> = acked
        .iter()
        .filter(|(started, ended, ..)| *started < answering_again && *ended > answering_again)
        .map(|(_, ended, ..)| ended.duration_since(answering_again))
        .collect();
    let slowest = waiting_then.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} appends were waiting when the server answered again; the last was acknowledged \
         {slowest:?} later",
        waiting_then.len()
    );
    assert!(
        !waiting_then.is_empty(),
        "appends were in flight across the restart"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "an append waited {slowest:?} after the server answered again"
    );

    // Every acknowledged event is stored, once, where it was acknowledged.
    let stored = collect_ids(&log, LogKind::Config).await;
    let mut ids = HashSet::new();
    for (sequence, id) in &stored {
        assert!(
            ids.insert(id.clone()),
            "event {id} stored twice (again at {sequence})"
        );
    }
    let stored: HashSet<_> = stored.into_iter().collect();
    for (_, _, id, sequence) in &acked {
        assert!(
            stored.contains(&(*sequence, id.clone())),
            "acknowledged event {id} is not at sequence {sequence}"
        );
    }
    drop(server);
}
