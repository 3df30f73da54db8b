//! What a subject costs nats-server in memory: the price a subject per invocation would have
//! (an earlier design), and why invocations are on a subject per user (see
//! `docs/architecture.md`, "At most once").
//!
//! Run: `cargo bench -p eventlog --bench subjects` (about half a minute). Each layout gets a
//! nats-server of its own (started by testkit, file storage) and the same 200,000 appends of
//! an `InvocationRequested`: (a) each on a subject of its own, as the earlier design wrote
//! them; (b) spread over 100 subjects, as 100 users' invocations are now. The dedupe window is 5 s, and the resident memory is read
//! once it has passed, so what remains is the messages' and subjects' own. (a) − (b) per
//! message is the cost of a subject.
use std::time::Duration;

use eventlog::{
    EventLog, ExpectedVersion, Subject,
    jetstream::{JetStreamConfig, JetStreamLog},
};
use futures_util::{StreamExt, stream::FuturesUnordered};
use proto::v1::{Envelope, InvocationRequested, envelope::Event};

const APPENDS: usize = 200_000;
const IN_FLIGHT: usize = 256;
const DUPLICATE_WINDOW: Duration = Duration::from_secs(5);

/// The growth of a fresh nats-server's resident memory, per append, after `APPENDS` appends
/// on `subjects` distinct subjects and the dedupe window.
async fn growth_per_append(subjects: usize) -> u64 {
    let server = testkit::NatsServer::start();
    let client = async_nats::connect(server.url()).await.expect("connect");
    let log = JetStreamLog::connect(
        client,
        JetStreamConfig {
            prefix: "subjects".to_owned(),
            duplicate_window: DUPLICATE_WINDOW,
            ..JetStreamConfig::default()
        },
    )
    .await
    .expect("JetStream");
    let before = server.resident_bytes();
    let mut pending = FuturesUnordered::new();
    for n in 0..APPENDS {
        let subject = Subject::parse(&format!(
            "invocation.alice_example_com.{:032x}",
            (n % subjects) as u128 * 7919
        ))
        .expect("subject");
        let envelope = Envelope {
            event_id: uuid::Uuid::now_v7().to_string(),
            schema_version: proto::SCHEMA_VERSION,
            event: Some(Event::InvocationRequested(InvocationRequested {
                invocation_id: format!("call_{n}"),
                user_id: "alice@example.com".to_owned(),
                exposed_tool_name: "bench__create_issue".to_owned(),
                tool_name: "create_issue".to_owned(),
                started: true,
                ..Default::default()
            })),
            ..Default::default()
        };
        let log = &log;
        pending.push(async move {
            log.append(&subject, ExpectedVersion::Any, &[envelope])
                .await
                .expect("append");
        });
        if pending.len() >= IN_FLIGHT {
            pending.next().await;
        }
    }
    while pending.next().await.is_some() {}
    tokio::time::sleep(DUPLICATE_WINDOW * 2).await;
    server.resident_bytes().saturating_sub(before) / APPENDS as u64
}

#[tokio::main]
async fn main() {
    let own = growth_per_append(APPENDS).await;
    let shared = growth_per_append(100).await;
    println!(
        "nats-server's resident memory after {APPENDS} appends and the dedupe window, per append: \
         (a) a subject each {own} B, (b) 100 subjects {shared} B; a subject costs about {} B",
        own.saturating_sub(shared)
    );
}
