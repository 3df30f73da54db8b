//! JetStream adapter throughput against the raw async-nats ceiling, measured in the same run on
//! the same nats-server (started by testkit, file storage).
//!
//! Run: `cargo bench -p eventlog --bench jetstream`. Figures for 300-byte events:
//! (a) raw pipelined JetStream publish — the ceiling for (b);
//! (b) adapter appends, pipelined (a window of appends in flight, `ExpectedVersion::Any`), and
//!     per-aggregate expected-version appends from 64 writers;
//! (c) raw ordered-consumer replay — the ceiling for (d);
//! (d) adapter `read_from` replay.
//! Plus the latency of one acknowledged append and of `read_aggregate`, one at a time.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::push::OrderedConfig, stream};
use bytes::Bytes;
use eventlog::{
    EventLog, ExpectedVersion, LogKind, Subject,
    jetstream::{JetStreamConfig, JetStreamLog},
};
use futures_util::{StreamExt, stream::FuturesUnordered};
use proto::{
    Message as _,
    v1::{Envelope, ServerDisabled, envelope::Event},
};

const EVENT_SIZE: usize = 300;
const RAW_MESSAGES: usize = 200_000;
const ADAPTER_EVENTS: usize = 200_000;
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

/// (a) Raw JetStream publishes of 300-byte payloads with `window` acknowledgements pending.
async fn raw_publish(js: &jetstream::Context, count: usize, window: usize) -> f64 {
    let payload = Bytes::from(vec![b'x'; EVENT_SIZE]);
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for i in 0..count {
        let ack = js
            .publish(format!("raw.s{}", i % SUBJECTS), payload.clone())
            .await
            .expect("publish");
        pending.push(ack.into_future());
        if pending.len() >= window {
            pending.next().await.expect("pending").expect("ack");
        }
    }
    while let Some(ack) = pending.next().await {
        ack.expect("ack");
    }
    rate(count, started.elapsed())
}

/// (c) Raw ordered push consumer over the whole stream.
async fn raw_replay(js: &jetstream::Context, client: &async_nats::Client, count: usize) -> f64 {
    let started = Instant::now();
    let stream = js.get_stream("RAW").await.expect("stream");
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
    rate(count, started.elapsed())
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
async fn adapter_versioned(log: Arc<JetStreamLog>) -> f64 {
    let started = Instant::now();
    let writers: Vec<_> = (0..VERSIONED_WRITERS)
        .map(|w| {
            let log = log.clone();
            tokio::spawn(async move {
                let s = Subject::parse(&format!("server.writer{w}")).expect("subject");
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

async fn latencies(log: &JetStreamLog) -> (Duration, Duration, Duration, Duration) {
    let s = Subject::parse("server.latency").expect("subject");
    let mut appends = Vec::with_capacity(LATENCY_SAMPLES);
    let mut version = 0;
    for _ in 0..LATENCY_SAMPLES {
        let e = event("latency");
        let started = Instant::now();
        version = log
            .append(&s, ExpectedVersion::from_loaded(version), &[e])
            .await
            .expect("append")
            .last_sequence;
        appends.push(started.elapsed());
    }
    let small = Subject::parse("server.small").expect("subject");
    let batch: Vec<_> = (0..10).map(|_| event("small")).collect();
    log.append(&small, ExpectedVersion::NoEvents, &batch)
        .await
        .expect("batch");
    let mut reads = Vec::with_capacity(LATENCY_SAMPLES);
    for _ in 0..LATENCY_SAMPLES {
        let started = Instant::now();
        let history = log.read_aggregate(&small).await.expect("read");
        assert_eq!(history.events.len(), 10);
        reads.push(started.elapsed());
    }
    (
        percentile(&mut appends, 0.5),
        percentile(&mut appends, 0.99),
        percentile(&mut reads, 0.5),
        percentile(&mut reads, 0.99),
    )
}

#[tokio::main]
async fn main() {
    let server = testkit::NatsServer::start();
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "RAW".to_owned(),
        subjects: vec!["raw.>".to_owned()],
        storage: stream::StorageType::File,
        deny_delete: true,
        deny_purge: true,
        ..Default::default()
    })
    .await
    .expect("raw stream");
    let log = Arc::new(
        JetStreamLog::connect(client.clone(), JetStreamConfig::with_prefix("bench"))
            .await
            .expect("log"),
    );
    println!(
        "JetStream, {EVENT_SIZE}-byte events, nats-server {} (file storage), {} CPUs",
        client.server_info().version,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let subjects: Vec<Subject> = (0..SUBJECTS)
        .map(|i| Subject::parse(&format!("server.bench{i}")).expect("subject"))
        .collect();
    let events: Vec<Envelope> = (0..ADAPTER_EVENTS).map(|_| event("bench")).collect();
    assert_eq!(events[0].encoded_len(), EVENT_SIZE);

    let raw_pub = raw_publish(&js, RAW_MESSAGES, WINDOW).await;
    println!("(a) raw pipelined publish, window {WINDOW}:      {raw_pub:>10.0} msgs/s");
    let append = adapter_append(&log, &events, &subjects).await;
    println!(
        "(b) adapter append, {WINDOW} in flight, Any:    {append:>10.0} events/s  ({:.0}% of raw; target 100k)",
        100.0 * append / raw_pub
    );
    let versioned = adapter_versioned(log.clone()).await;
    println!(
        "(b) adapter append, {VERSIONED_WRITERS} writers, expected version: {versioned:>10.0} events/s  ({:.0}% of raw)",
        100.0 * versioned / raw_pub
    );
    let raw_read = raw_replay(&js, &client, RAW_MESSAGES).await;
    println!("(c) raw ordered-consumer replay:             {raw_read:>10.0} msgs/s");
    let (count, replay) = adapter_replay(&log).await;
    println!(
        "(d) adapter read_from replay ({count} events): {replay:>10.0} events/s  ({:.0}% of raw; target 300k)",
        100.0 * replay / raw_read
    );
    let (append_p50, append_p99, read_p50, read_p99) = latencies(&log).await;
    println!(
        "one acknowledged expected-version append:   p50 {:>7.1} µs  p99 {:>7.1} µs",
        append_p50.as_secs_f64() * 1e6,
        append_p99.as_secs_f64() * 1e6
    );
    println!(
        "read_aggregate of 10 events:                p50 {:>7.1} µs  p99 {:>7.1} µs",
        read_p50.as_secs_f64() * 1e6,
        read_p99.as_secs_f64() * 1e6
    );
    drop(server);
}
