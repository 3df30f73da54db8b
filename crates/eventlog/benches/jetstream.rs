//! JetStream adapter throughput against the raw async-nats ceiling, measured in the same run on
//! the same nats-server (started by testkit, file storage, 300-byte events).
//!
//! Run: `cargo bench -p eventlog --bench jetstream` (about half a minute).
//! - (a) raw pipelined JetStream publish, plain and with the adapter's headers (a fresh
//!   `Nats-Msg-Id` each, so the server's dedupe bookkeeping is in the baseline): the ceilings
//!   for (b);
//! - (b) adapter appends: pipelined (a window of appends in flight, `ExpectedVersion::Any`), and
//!   per-aggregate expected-version appends from 64 writers (with its raw equivalent);
//! - (c) raw ordered-consumer replay, of a header-less stream and of the adapter's own stream
//!   (same messages as (d)): the ceilings for (d);
//! - (d) adapter `read_from` replay;
//! - latencies, one operation at a time: append (single event, atomic batch), `read_aggregate`
//!   by direct get and by ordered consumer.
//!
//! A 2-core machine shared with other work is noisy, so each throughput is measured in
//! [`ROUNDS`] rounds (raw and adapter interleaved) and reported as best and median.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::push::OrderedConfig, stream};
use bytes::Bytes;
use eventlog::{
    EventLog, ExpectedVersion, LogKind, Subject,
    jetstream::{AggregateReads, JetStreamConfig, JetStreamLog},
};
use futures_util::{StreamExt, stream::FuturesUnordered};
use proto::{
    Message as _,
    v1::{Envelope, ServerDisabled, envelope::Event},
};

const EVENT_SIZE: usize = 300;
const ROUNDS: usize = 3;
/// Messages per round for each pipelined publish measurement.
const MESSAGES: usize = 100_000;
const WINDOW: usize = 2048;
const SUBJECTS: usize = 256;
const VERSIONED_WRITERS: usize = 64;
const VERSIONED_APPENDS_PER_WRITER: usize = 400;
const LATENCY_SAMPLES: usize = 1000;

/// A `ServerDisabled` envelope whose protobuf encoding is exactly [`EVENT_SIZE`] bytes.
fn event(server_id: &str) -> Envelope {
    let mut envelope = Envelope {
        event_id: uuid::Uuid::now_v7().to_string(),
        occurred_at: Some(proto::Timestamp {
            seconds: 1_764_000_000,
            nanos: 0,
        }),
        actor: None,
        correlation_id: uuid::Uuid::now_v7().to_string(),
        causation_id: String::new(),
        schema_version: proto::SCHEMA_VERSION,
        write_id: String::new(),
        event: Some(Event::ServerDisabled(ServerDisabled {
            server_id: server_id.to_owned(),
            reason: String::new(),
        })),
    };
    // Pad the reason until the encoding is exactly EVENT_SIZE (length prefixes grow with it).
    let mut reason_len = EVENT_SIZE.saturating_sub(envelope.encoded_len());
    loop {
        if let Some(Event::ServerDisabled(body)) = envelope.event.as_mut() {
            body.reason = "r".repeat(reason_len);
        }
        match envelope.encoded_len() {
            n if n > EVENT_SIZE && reason_len > 0 => reason_len -= 1,
            _ => return envelope,
        }
    }
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p) as usize]
}

/// (a) Raw JetStream publishes of 300-byte payloads with `window` acknowledgements pending;
/// with `headers`, each carries the headers the adapter sets (a fresh `Nats-Msg-Id`, so the
/// server's dedupe bookkeeping is included).
async fn raw_publish(js: &jetstream::Context, prefix: &str, count: usize, headers: bool) -> f64 {
    let payload = Bytes::from(vec![b'x'; EVENT_SIZE]);
    let ids: Vec<String> = (0..if headers { count } else { 0 })
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for i in 0..count {
        let subject = format!("{prefix}.s{}", i % SUBJECTS);
        let ack = if let Some(id) = ids.get(i) {
            let mut map = async_nats::HeaderMap::new();
            map.insert("Nats-Msg-Id", id.as_str());
            map.insert("Sb-Event-Type", "ServerDisabled");
            js.publish_with_headers(subject, map, payload.clone()).await
        } else {
            js.publish(subject, payload.clone()).await
        }
        .expect("publish");
        pending.push(ack.into_future());
        if pending.len() >= WINDOW {
            pending.next().await.expect("pending").expect("ack");
        }
    }
    while let Some(ack) = pending.next().await {
        ack.expect("ack");
    }
    rate(count, started.elapsed())
}

/// (b) baseline: 64 tasks, each publishing to its own subject with
/// `Nats-Expected-Last-Subject-Sequence` and `Nats-Msg-Id`, one at a time.
async fn raw_versioned(js: &jetstream::Context, round: usize) -> f64 {
    let payload = Bytes::from(vec![b'x'; EVENT_SIZE]);
    let started = Instant::now();
    let writers: Vec<_> = (0..VERSIONED_WRITERS)
        .map(|w| {
            let js = js.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut version = 0u64;
                for _ in 0..VERSIONED_APPENDS_PER_WRITER {
                    let mut map = async_nats::HeaderMap::new();
                    map.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string().as_str());
                    map.insert(
                        "Nats-Expected-Last-Subject-Sequence",
                        version.to_string().as_str(),
                    );
                    version = js
                        .publish_with_headers(format!("raw.r{round}w{w}"), map, payload.clone())
                        .await
                        .expect("publish")
                        .await
                        .expect("ack")
                        .sequence;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    rate(
        VERSIONED_WRITERS * VERSIONED_APPENDS_PER_WRITER,
        started.elapsed(),
    )
}

/// (c) Raw ordered push consumer over a whole stream.
async fn raw_replay(
    js: &jetstream::Context,
    client: &async_nats::Client,
    name: &str,
) -> (usize, f64) {
    let started = Instant::now();
    let stream = js.get_stream(name).await.expect("stream");
    let count = stream.cached_info().state.messages as usize;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_subject: client.new_inbox(),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut seen = 0;
    while seen < count {
        let message = messages.next().await.expect("ended").expect("message");
        std::hint::black_box(&message.payload);
        seen += 1;
    }
    (count, rate(count, started.elapsed()))
}

/// (b) Adapter appends of single events with `ExpectedVersion::Any`, `window` in flight.
async fn adapter_append(log: &JetStreamLog, events: &[Envelope], subjects: &[Subject]) -> f64 {
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for (i, event) in events.iter().enumerate() {
        pending.push(log.append(
            &subjects[i % subjects.len()],
            ExpectedVersion::Any,
            std::slice::from_ref(event),
        ));
        if pending.len() >= WINDOW {
            pending.next().await.expect("pending").expect("append");
        }
    }
    while let Some(outcome) = pending.next().await {
        outcome.expect("append");
    }
    rate(events.len(), started.elapsed())
}

/// (b) 64 writers, each appending to its own aggregate with the version it last saw.
async fn adapter_versioned(log: Arc<JetStreamLog>, round: usize) -> f64 {
    let started = Instant::now();
    let writers: Vec<_> = (0..VERSIONED_WRITERS)
        .map(|w| {
            let log = log.clone();
            tokio::spawn(async move {
                let s = Subject::parse(&format!("server.r{round}w{w}")).expect("subject");
                let events: Vec<_> = (0..VERSIONED_APPENDS_PER_WRITER)
                    .map(|_| event("writer"))
                    .collect();
                let mut version = 0;
                for e in &events {
                    version = log
                        .append(
                            &s,
                            ExpectedVersion::from_loaded(version),
                            std::slice::from_ref(e),
                        )
                        .await
                        .expect("versioned append")
                        .last_sequence;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    rate(
        VERSIONED_WRITERS * VERSIONED_APPENDS_PER_WRITER,
        started.elapsed(),
    )
}

/// (d) Adapter replay of the whole config log.
async fn adapter_replay(log: &JetStreamLog) -> (usize, f64) {
    let started = Instant::now();
    let mut events = log
        .read_from(LogKind::Config, 0, None)
        .await
        .expect("read_from");
    let mut count = 0;
    while let Some(event) = events.next().await {
        std::hint::black_box(&event.expect("event").envelope);
        count += 1;
    }
    (count, rate(count, started.elapsed()))
}

/// p50 and p99 of `samples`.
fn p50_p99(mut samples: Vec<Duration>) -> String {
    format!(
        "p50 {:>7.1} µs  p99 {:>7.1} µs",
        percentile(&mut samples, 0.5).as_secs_f64() * 1e6,
        percentile(&mut samples, 0.99).as_secs_f64() * 1e6
    )
}

/// One expected-version append at a time.
async fn append_latency(log: &JetStreamLog, batch: usize) -> String {
    let s = Subject::parse(&format!("server.latency{batch}")).expect("subject");
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    let mut version = 0;
    for _ in 0..if batch == 1 {
        LATENCY_SAMPLES
    } else {
        LATENCY_SAMPLES / 10
    } {
        let events: Vec<_> = (0..batch).map(|_| event("latency")).collect();
        let started = Instant::now();
        version = log
            .append(&s, ExpectedVersion::from_loaded(version), &events)
            .await
            .expect("append")
            .last_sequence;
        samples.push(started.elapsed());
    }
    p50_p99(samples)
}

/// `read_aggregate` of a 10-event aggregate, one at a time.
async fn read_latency(log: &JetStreamLog, small: &Subject) -> String {
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for _ in 0..LATENCY_SAMPLES {
        let started = Instant::now();
        let history = log.read_aggregate(small).await.expect("read");
        assert_eq!(history.events.len(), 10);
        samples.push(started.elapsed());
    }
    p50_p99(samples)
}

/// Best and median of one measurement's rounds.
#[derive(Default)]
struct Rounds(Vec<f64>);

impl Rounds {
    fn add(&mut self, rate: f64) {
        self.0.push(rate);
    }

    fn best(&self) -> f64 {
        self.0.iter().copied().fold(0.0, f64::max)
    }

    fn median(&self) -> f64 {
        let mut sorted = self.0.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied().unwrap_or_default()
    }

    fn line(&self, label: &str, unit: &str) -> String {
        format!(
            "{label:<52} best {:>8.0} {unit}/s  median {:>8.0}",
            self.best(),
            self.median()
        )
    }
}

fn ratio(adapter: &Rounds, raw: &Rounds) -> String {
    format!(
        "{:.0}% (best/best), {:.0}% (median/median)",
        100.0 * adapter.best() / raw.best(),
        100.0 * adapter.median() / raw.median()
    )
}

#[tokio::main]
async fn main() {
    let server = testkit::NatsServer::start();
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    for (name, subject) in [("RAW", "raw.>"), ("RAWH", "rawh.>")] {
        js.create_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec![subject.to_owned()],
            storage: stream::StorageType::File,
            deny_delete: true,
            deny_purge: true,
            ..Default::default()
        })
        .await
        .expect("raw stream");
    }
    let log = Arc::new(
        JetStreamLog::connect(client.clone(), JetStreamConfig::with_prefix("bench"))
            .await
            .expect("log"),
    );
    println!(
        "JetStream, {EVENT_SIZE}-byte events, nats-server {} (file storage), {} CPUs, {ROUNDS} rounds",
        client.server_info().version,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let subjects: Vec<Subject> = (0..SUBJECTS)
        .map(|i| Subject::parse(&format!("server.bench{i}")).expect("subject"))
        .collect();
    let mut raw_pub = Rounds::default();
    let mut raw_pub_headers = Rounds::default();
    let mut append = Rounds::default();
    let mut raw_versioned_rounds = Rounds::default();
    let mut versioned = Rounds::default();
    for round in 0..ROUNDS {
        let events: Vec<Envelope> = (0..MESSAGES).map(|_| event("bench")).collect();
        assert_eq!(events[0].encoded_len(), EVENT_SIZE);
        raw_pub.add(raw_publish(&js, "raw", MESSAGES, false).await);
        raw_pub_headers.add(raw_publish(&js, "rawh", MESSAGES, true).await);
        append.add(adapter_append(&log, &events, &subjects).await);
        raw_versioned_rounds.add(raw_versioned(&js, round).await);
        versioned.add(adapter_versioned(log.clone(), round).await);
    }
    println!(
        "{}",
        raw_pub.line(&format!("(a) raw publish, {WINDOW} in flight"), "msgs")
    );
    println!(
        "{}",
        raw_pub_headers.line("(a) raw publish, adapter's headers + msg id", "msgs")
    );
    println!(
        "{}",
        append.line(
            &format!("(b) adapter append, {WINDOW} in flight, Any"),
            "events"
        )
    );
    println!(
        "    = {} of raw with headers, {} of plain raw; target 100k/s",
        ratio(&append, &raw_pub_headers),
        ratio(&append, &raw_pub)
    );
    println!(
        "{}",
        raw_versioned_rounds.line(
            &format!("(a) raw expected-sequence publish, {VERSIONED_WRITERS} writers"),
            "msgs"
        )
    );
    println!(
        "{}",
        versioned.line(
            &format!("(b) adapter expected-version append, {VERSIONED_WRITERS} writers"),
            "events"
        )
    );
    println!("    = {} of raw", ratio(&versioned, &raw_versioned_rounds));

    let mut raw_read = Rounds::default();
    let mut raw_config_read = Rounds::default();
    let mut replay = Rounds::default();
    let (mut raw_count, mut config_count, mut count) = (0, 0, 0);
    for _ in 0..ROUNDS {
        let (n, rate) = raw_replay(&js, &client, "RAW").await;
        raw_read.add(rate);
        raw_count = n;
        let (n, rate) = raw_replay(&js, &client, &log.stream_name(LogKind::Config)).await;
        raw_config_read.add(rate);
        config_count = n;
        let (n, rate) = adapter_replay(&log).await;
        replay.add(rate);
        count = n;
    }
    println!(
        "{}",
        raw_read.line(
            &format!("(c) raw ordered replay, no headers ({raw_count})"),
            "msgs"
        )
    );
    println!(
        "{}",
        raw_config_read.line(
            &format!("(c) raw ordered replay, adapter's stream ({config_count})"),
            "msgs"
        )
    );
    println!(
        "{}",
        replay.line(&format!("(d) adapter read_from replay ({count})"), "events")
    );
    println!(
        "    = {} of raw on the same stream, {} of raw without headers; target 300k/s",
        ratio(&replay, &raw_config_read),
        ratio(&replay, &raw_read)
    );

    println!(
        "one expected-version append of 1 event:             {}",
        append_latency(&log, 1).await
    );
    println!(
        "one expected-version append of 3 (atomic batch):    {}",
        append_latency(&log, 3).await
    );
    let small = Subject::parse("server.small").expect("subject");
    let batch: Vec<_> = (0..10).map(|_| event("small")).collect();
    log.append(&small, ExpectedVersion::NoEvents, &batch)
        .await
        .expect("batch");
    println!(
        "read_aggregate of 10 events, direct get:            {}",
        read_latency(&log, &small).await
    );
    let by_consumer = JetStreamLog::connect(
        client.clone(),
        JetStreamConfig {
            aggregate_reads: AggregateReads::OrderedConsumer,
            ..JetStreamConfig::with_prefix("bench")
        },
    )
    .await
    .expect("log");
    println!(
        "read_aggregate of 10 events, ordered consumer:      {}",
        read_latency(&by_consumer, &small).await
    );
    drop(server);
}
