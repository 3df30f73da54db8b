//! The tool-state projection at the size the invocation path must handle: 10,000 users, each
//! connected to 10 servers offering 10 tools, every tool set — 1,000,000 tool settings.
//!
//! - resident memory of the projection (RSS from /proc/self/statm before and after folding the
//!   events, generated one at a time so that nothing else stays resident);
//! - the state look-up (`state_of(user, server, tool)`) for random keys: median and p99 of
//!   batches, bare and through the projection runner's read lock;
//! - rebuild from the log (a JSONL log holding the same events) and from a checkpoint, in
//!   events per second.
//!
//! `cargo bench -p policy --bench tool_states` (targets: ≤ 1 µs median, ≤ 256 MiB)
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use domain::{ServerId, ToolState, ToolStates, UserId};
use eventlog::{
    EventLog, ExpectedVersion, LogKind, Subject,
    jsonl::{JsonlLog, JsonlOptions},
    projection::{CheckpointPolicy, FileCheckpointStore, ProjectionRunner},
};
use proto::v1::{self as pb, Envelope, envelope::Event};

const USERS: usize = 10_000;
const SERVERS: usize = 10;
const TOOLS: usize = 10;
const LOOKUPS_PER_BATCH: usize = 1_000;
const BATCHES: usize = 1_000;

fn envelope(event: Event) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::now_v7().to_string(),
        occurred_at: Some(domain::time::to_timestamp(std::time::SystemTime::now())),
        actor: Some(pb::Actor {
            kind: Some(pb::actor::Kind::Service("bench".into())),
        }),
        correlation_id: String::new(),
        causation_id: String::new(),
        schema_version: proto::SCHEMA_VERSION,
        write_id: String::new(),
        event: Some(event),
    }
}

fn user_id(u: usize) -> String {
    format!("user{u}@example.com")
}

fn server_ids() -> Vec<ServerId> {
    (0..SERVERS).map(|_| ServerId::new()).collect()
}

fn tools(server: usize) -> Vec<pb::ToolDefinition> {
    (0..TOOLS)
        .map(|t| {
            let mut definition = pb::ToolDefinition {
                name: format!("tool_{t}"),
                title: format!("Tool {t} of server {server}"),
                description: format!(
                    "Does thing number {t} in the tracker of server {server}; returns JSON."
                ),
                input_schema_json: r#"{"type":"object","properties":{"id":{"type":"string"}}}"#
                    .into(),
                annotations: Some(pb::ToolAnnotations {
                    read_only_hint: Some(t % 2 == 0),
                    ..Default::default()
                }),
                ..Default::default()
            };
            definition.definition_hash = domain::tool_definition_hash(&definition);
            definition
        })
        .collect()
}

/// Every event of the scenario, by aggregate: `(subject, events)` batches, produced lazily.
fn batches(servers: &[ServerId]) -> impl Iterator<Item = (String, Vec<Event>)> + '_ {
    let definitions: Vec<Vec<pb::ToolDefinition>> = (0..SERVERS).map(tools).collect();
    let added = servers.iter().enumerate().map(|(i, id)| {
        (
            format!("server.{id}"),
            vec![Event::ServerAdded(pb::ServerAdded {
                server_id: id.to_string(),
                name: format!("Tracker {i}"),
                slug: format!("tracker_{i}"),
                url: format!("https://mcp{i}.example.com/mcp"),
                enabled: true,
                ..Default::default()
            })],
        )
    });
    let per_user = (0..USERS).flat_map(move |u| {
        let user = user_id(u);
        let key = UserId::parse(&user).expect("user").key();
        let definitions = definitions.clone();
        servers.iter().enumerate().flat_map(move |(s, server)| {
            let connection = vec![
                Event::ConnectionStarted(pb::ConnectionStarted {
                    server_id: server.to_string(),
                    user_id: user.clone(),
                    ..Default::default()
                }),
                Event::ConnectionEstablished(pb::ConnectionEstablished {
                    server_id: server.to_string(),
                    user_id: user.clone(),
                    token_fingerprint: "0123456789abcdef".into(),
                    ..Default::default()
                }),
                Event::ToolsDiscovered(pb::ToolsDiscovered {
                    server_id: server.to_string(),
                    user_id: user.clone(),
                    tools: definitions[s].clone(),
                    added: definitions[s].iter().map(|t| t.name.clone()).collect(),
                    ..Default::default()
                }),
            ];
            let settings = definitions[s]
                .iter()
                .enumerate()
                .map(|(t, tool)| {
                    let state = [ToolState::AlwaysAllow, ToolState::NeedsApproval][t % 2];
                    Event::ToolPermissionSet(pb::ToolPermissionSet {
                        user_id: user.clone(),
                        server_id: server.to_string(),
                        tool_name: tool.name.clone(),
                        state: state.to_proto() as i32,
                        definition_hash: tool.definition_hash.clone(),
                        previous_state: pb::ToolState::Blocked as i32,
                        previous_definition_hash: String::new(),
                        decided_at_position: 0,
                    })
                })
                .collect();
            [
                (format!("connection.{server}.{}", key.as_str()), connection),
                (format!("policy.{}.{server}", key.as_str()), settings),
            ]
        })
    });
    added.chain(per_user)
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

/// Random (user, server, tool) keys, made before timing (a look-up allocates nothing).
fn keys(servers: &[ServerId]) -> Vec<(UserId, ServerId, String)> {
    // xorshift: deterministic, no dependency.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..LOOKUPS_PER_BATCH * 10)
        .map(|_| {
            let u = next() as usize % USERS;
            let s = next() as usize % SERVERS;
            let t = next() as usize % TOOLS;
            (
                UserId::parse(&user_id(u)).expect("user"),
                servers[s],
                format!("tool_{t}"),
            )
        })
        .collect()
}

/// Per-look-up time of each batch of `LOOKUPS_PER_BATCH` look-ups; returns (median, p99).
fn time_lookups(
    keys: &[(UserId, ServerId, String)],
    lookup: impl Fn(&UserId, ServerId, &str) -> Option<ToolState>,
) -> (Duration, Duration) {
    let mut per_lookup = Vec::with_capacity(BATCHES);
    let mut found = 0usize;
    for b in 0..BATCHES {
        let start = (b * LOOKUPS_PER_BATCH) % keys.len();
        let batch = &keys[start..start + LOOKUPS_PER_BATCH];
        let begun = Instant::now();
        for (user, server, tool) in batch {
            if std::hint::black_box(lookup(user, *server, tool)).is_some() {
                found += 1;
            }
        }
        per_lookup.push(begun.elapsed() / LOOKUPS_PER_BATCH as u32);
    }
    assert_eq!(found, BATCHES * LOOKUPS_PER_BATCH, "every key is a tool");
    per_lookup.sort();
    (
        per_lookup[per_lookup.len() / 2],
        per_lookup[per_lookup.len() * 99 / 100],
    )
}

fn main() {
    let servers = server_ids();

    // 1. Resident memory and look-ups, folding events generated one at a time.
    let before = resident_bytes();
    let begun = Instant::now();
    let mut states = ToolStates::default();
    let mut events = 0u64;
    for (_, batch) in batches(&servers) {
        for event in batch {
            events += 1;
            states.apply_event(&event, events);
        }
    }
    let fold = begun.elapsed();
    let after = resident_bytes();
    let settings = states.slot_count();
    assert_eq!(settings, USERS * SERVERS * TOOLS);
    println!(
        "folded {events} events into {settings} tool settings ({USERS} users x {SERVERS} servers x {TOOLS} tools) in {:.2} s ({:.0} events/s)",
        fold.as_secs_f64(),
        events as f64 / fold.as_secs_f64()
    );
    println!(
        "projection resident memory: {:.1} MiB (RSS {:.1} -> {:.1} MiB; target <= 256 MiB)",
        (after.saturating_sub(before)) as f64 / (1024.0 * 1024.0),
        before as f64 / (1024.0 * 1024.0),
        after as f64 / (1024.0 * 1024.0)
    );
    let keys = keys(&servers);
    let (median, p99) = time_lookups(&keys, |user, server, tool| {
        states.state_of(user, server, tool)
    });
    println!(
        "state_of look-up, bare: median {} ns, p99 {} ns per look-up (batches of {LOOKUPS_PER_BATCH}; target median <= 1000 ns)",
        median.as_nanos(),
        p99.as_nanos()
    );
    drop(states);

    // 2. Rebuild from a JSONL log holding the same events, then from a checkpoint.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    runtime.block_on(async {
        let log: Arc<dyn EventLog> = Arc::new(
            JsonlLog::open(&dir.path().join("events"), JsonlOptions::default())
                .await
                .expect("open log"),
        );
        let begun = Instant::now();
        // 64 writers, each appending whole aggregates.
        let (sender, receiver) = tokio::sync::mpsc::channel::<(String, Vec<Event>)>(1024);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        let mut writers = Vec::new();
        for _ in 0..64 {
            let (log, receiver) = (log.clone(), receiver.clone());
            writers.push(tokio::spawn(async move {
                loop {
                    let Some((subject, events)) = receiver.lock().await.recv().await else {
                        return;
                    };
                    let subject = Subject::parse(&subject).expect("subject");
                    let envelopes: Vec<Envelope> = events.into_iter().map(envelope).collect();
                    log.append(&subject, ExpectedVersion::Any, &envelopes)
                        .await
                        .expect("append");
                }
            }));
        }
        // Servers first: the writers may reorder aggregates, and a server's slug should be
        // known before its tools (as in a real log).
        let mut all = batches(&servers);
        for batch in all.by_ref().take(SERVERS) {
            let subject = Subject::parse(&batch.0).expect("subject");
            let envelopes: Vec<Envelope> = batch.1.into_iter().map(envelope).collect();
            log.append(&subject, ExpectedVersion::Any, &envelopes)
                .await
                .expect("append");
        }
        for batch in all {
            sender.send(batch).await.expect("writer alive");
        }
        drop(sender);
        for writer in writers {
            writer.await.expect("writer");
        }
        let end = log.last_sequence(LogKind::Config).await.expect("end");
        assert_eq!(end, events);
        println!(
            "wrote {end} events to a JSONL log in {:.2} s ({:.1} MiB)",
            begun.elapsed().as_secs_f64(),
            std::fs::metadata(dir.path().join("events/config.jsonl")).map_or(0, |m| m.len()) as f64
                / (1024.0 * 1024.0)
        );

        let checkpoints = Arc::new(
            FileCheckpointStore::open(&dir.path().join("checkpoints")).expect("checkpoints"),
        );
        let spec = service_kit::tool_states_spec();
        let begun = Instant::now();
        let runner = ProjectionRunner::start(
            log.clone(),
            checkpoints.clone(),
            spec.clone(),
            CheckpointPolicy::default(),
        )
        .await
        .expect("rebuild");
        let from_log = begun.elapsed();
        println!(
            "rebuild from the log: {end} events in {:.2} s = {:.0} events/s",
            from_log.as_secs_f64(),
            end as f64 / from_log.as_secs_f64()
        );
        assert_eq!(runner.read(ToolStates::slot_count), USERS * SERVERS * TOOLS);
        let (median, p99) = time_lookups(&keys, |user, server, tool| {
            runner.read(|states| states.state_of(user, server, tool))
        });
        println!(
            "state_of look-up through the runner's read lock: median {} ns, p99 {} ns",
            median.as_nanos(),
            p99.as_nanos()
        );
        let begun = Instant::now();
        runner.save_checkpoint().await.expect("checkpoint");
        let saved = begun.elapsed();
        let size = std::fs::metadata(dir.path().join("checkpoints/tool_states_v4.checkpoint"))
            .map_or(0, |m| m.len());
        println!(
            "checkpoint: {:.1} MiB written in {:.2} s",
            size as f64 / (1024.0 * 1024.0),
            saved.as_secs_f64()
        );
        runner.shutdown().await.expect("shutdown");

        let begun = Instant::now();
        let restored =
            ProjectionRunner::start(log.clone(), checkpoints, spec, CheckpointPolicy::default())
                .await
                .expect("restore");
        let from_checkpoint = begun.elapsed();
        assert_eq!(restored.position(), end);
        assert_eq!(
            restored.read(ToolStates::slot_count),
            USERS * SERVERS * TOOLS
        );
        println!(
            "rebuild from the checkpoint: the state of {end} events in {:.2} s = {:.0} events/s",
            from_checkpoint.as_secs_f64(),
            end as f64 / from_checkpoint.as_secs_f64()
        );
    });
}
