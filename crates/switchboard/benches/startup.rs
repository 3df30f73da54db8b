//! `switchboard up` from start to ready (`/readyz` answers 200) with 100,000 configuration
//! events and 100,000 invocation events (50,000 invocations, all within the claim window) in
//! the logs: from a checkpoint and from none, against empty logs in the same run; on the
//! embedded default and on JetStream (a nats-server started by the testkit). From a
//! checkpoint, the open invocations fold the claim window's invocation events again (their
//! snapshot leaves the finished invocations out), so that line includes that fold.
//!
//! `cargo bench -p switchboard --bench startup` (JetStream needs `scripts/install-nats-server.sh`)
use std::{
    io::BufRead,
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use eventlog::{
    EventLog, ExpectedVersion, Subject,
    jsonl::{JsonlLog, JsonlOptions},
};
use proto::v1::{Envelope, ServerAdded, ServerUpdated, ToolPermissionSet, envelope::Event};

const EVENTS: usize = 100_000;
const INVOCATIONS: usize = 50_000;
const SERVERS: usize = 1_000;
const ROUNDS: usize = 5;

fn envelope(event: Event) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::now_v7().to_string(),
        occurred_at: Some(domain::time::to_timestamp(std::time::SystemTime::now())),
        actor: Some(proto::v1::Actor {
            kind: Some(proto::v1::actor::Kind::UserId("alice@example.com".into())),
        }),
        correlation_id: uuid::Uuid::now_v7().to_string(),
        causation_id: String::new(),
        schema_version: proto::SCHEMA_VERSION,
        write_id: String::new(),
        event: Some(event),
    }
}

/// 1,000 servers added, 9,000 server edits and 90,000 tool permission changes: the shape of a
/// configuration log where users mostly change tool settings.
async fn write_events(log: Arc<dyn EventLog>) {
    let servers: Vec<String> = (0..SERVERS)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    for (i, id) in servers.iter().enumerate() {
        let subject = Subject::parse(&format!("server.{id}")).expect("subject");
        let added = Event::ServerAdded(ServerAdded {
            server_id: id.clone(),
            name: format!("Server {i}"),
            slug: format!("server_{i}"),
            description: "Issue tracker of the platform team".into(),
            url: format!("https://mcp{i}.example.com/mcp"),
            enabled: true,
            ..Default::default()
        });
        log.append(&subject, ExpectedVersion::Any, &[envelope(added)])
            .await
            .expect("append");
    }
    let servers = Arc::new(servers);
    let writers = 64;
    let per_writer = (EVENTS - SERVERS) / writers + 1;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (log, servers) = (log.clone(), servers.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let n = w * per_writer + i;
                if n + SERVERS >= EVENTS {
                    break;
                }
                let server = &servers[n % SERVERS];
                let (subject, event) = if n.is_multiple_of(10) {
                    (
                        format!("server.{server}"),
                        Event::ServerUpdated(ServerUpdated {
                            server_id: server.clone(),
                            description: Some(format!("Edited {n}")),
                            ..Default::default()
                        }),
                    )
                } else {
                    (
                        format!("policy.user{}_40example_2Ecom.{server}", n % 500),
                        Event::ToolPermissionSet(ToolPermissionSet {
                            server_id: server.clone(),
                            tool_name: format!("tool_{}", n % 40),
                            definition_hash: "9f2c4e1b7a3d5f60".repeat(4),
                            ..Default::default()
                        }),
                    )
                };
                let subject = Subject::parse(&subject).expect("subject");
                log.append(&subject, ExpectedVersion::Any, &[envelope(event)])
                    .await
                    .expect("append");
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    assert_eq!(
        log.last_sequence(eventlog::LogKind::Config)
            .await
            .expect("end"),
        EVENTS as u64
    );
}

/// 50,000 invocations of 500 users, each requested (allowed, so started) and completed, as
/// the invoker records them: 100,000 invocation events, all within the claim window.
async fn write_invocations(log: Arc<dyn EventLog>) {
    let writers = 64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for n in (w..INVOCATIONS).step_by(writers) {
                let user = format!("user{}@example.com", n % 500);
                let user_id = domain::UserId::parse(&user).expect("user");
                let id = domain::InvocationId::parse(&format!("call_{n}")).expect("id");
                let subject =
                    Subject::parse(&domain::invocation::subject(&user_id)).expect("subject");
                let requested = Event::InvocationRequested(proto::v1::InvocationRequested {
                    invocation_id: id.to_string(),
                    user_id: user.clone(),
                    server_id: uuid::Uuid::now_v7().to_string(),
                    tool_name: "create_issue".into(),
                    exposed_tool_name: "jira__create_issue".into(),
                    started: true,
                    ..Default::default()
                });
                let completed = Event::InvocationCompleted(proto::v1::InvocationCompleted {
                    invocation_id: id.to_string(),
                    duration_ms: 12,
                    ..Default::default()
                });
                for event in [requested, completed] {
                    log.append(&subject, ExpectedVersion::Any, &[envelope(event)])
                        .await
                        .expect("append");
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
}

/// Where `up` keeps its state in one measurement.
struct Target<'a> {
    dir: &'a Path,
    /// `(url, prefix)` on JetStream.
    nats: Option<(String, String)>,
}

/// Starts `up`, waits for `/readyz` to answer 200; returns the process and the time it took.
fn start_until_ready(target: &Target<'_>) -> (Child, Duration) {
    let begun = Instant::now();
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command.arg("--data-dir").arg(target.dir);
    if let Some((url, prefix)) = &target.nats {
        command.args(["--nats", url, "--nats-prefix", prefix]);
    }
    let mut child = command
        .arg("up")
        .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        .env_remove("SWITCHBOARD_VAULT_KEYS")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start up");
    let stderr = child.stderr.take().expect("stderr");
    let mut url = None;
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line.expect("log line");
        if let Some(rest) = line.split("listening on ").nth(1) {
            url = rest.split_whitespace().next().map(str::to_owned);
            break;
        }
    }
    let url = url.expect("up logged its URL");
    // The API only listens once the read models have caught up; /readyz confirms it.
    let address = url.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&address).expect("connect");
    use std::io::{Read, Write};
    stream
        .write_all(
            format!("GET /readyz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    (child, begun.elapsed())
}

fn stop(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "{exit:?}");
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn measure(name: &str, empty: Target<'_>, full: Target<'_>, forget_checkpoint: &dyn Fn()) {
    // First starts create the key file and JWT secret; not measured.
    for target in [&empty, &full] {
        stop(start_until_ready(target).0);
    }
    let (mut baseline, mut from_none, mut from_checkpoint) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (child, took) = start_until_ready(&empty);
        baseline.push(took);
        stop(child);
        forget_checkpoint();
        let (child, took) = start_until_ready(&full);
        from_none.push(took);
        stop(child);
        let (child, took) = start_until_ready(&full);
        from_checkpoint.push(took);
        stop(child);
    }
    let (baseline, from_none, from_checkpoint) =
        (median(baseline), median(from_none), median(from_checkpoint));
    println!("{name}: start to ready, median of {ROUNDS}:");
    println!(
        "  empty log                      {:>8.1} ms",
        baseline.as_secs_f64() * 1e3
    );
    println!(
        "  full logs, no checkpoint       {:>8.1} ms  ({:.1}x empty)",
        from_none.as_secs_f64() * 1e3,
        from_none.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "  full logs, checkpoint          {:>8.1} ms  ({:.1}x empty)",
        from_checkpoint.as_secs_f64() * 1e3,
        from_checkpoint.as_secs_f64() / baseline.as_secs_f64()
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    // Embedded default.
    let empty = tempfile::tempdir().expect("temp dir");
    let full = tempfile::tempdir().expect("temp dir");
    let begun = Instant::now();
    runtime.block_on(async {
        let log: Arc<dyn EventLog> = Arc::new(
            JsonlLog::open(&full.path().join("events"), JsonlOptions::default())
                .await
                .expect("open log"),
        );
        write_events(log.clone()).await;
        write_invocations(log).await;
    });
    println!(
        "wrote {EVENTS} configuration events and {} invocation events in {:.2} s",
        INVOCATIONS * 2,
        begun.elapsed().as_secs_f64()
    );
    let bytes = std::fs::metadata(full.path().join("events/config.jsonl")).map_or(0, |m| m.len());
    println!("config log: {:.1} MiB", bytes as f64 / (1024.0 * 1024.0));
    let checkpoints = full.path().join("checkpoints");
    measure(
        "embedded default",
        Target {
            dir: empty.path(),
            nats: None,
        },
        Target {
            dir: full.path(),
            nats: None,
        },
        &|| {
            let _ = std::fs::remove_dir_all(&checkpoints);
        },
    );

    // JetStream.
    let nats = testkit::NatsServer::start();
    let (empty_prefix, full_prefix) = ("benchempty".to_owned(), "benchfull".to_owned());
    let client = runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let config = eventlog::jetstream::JetStreamConfig {
            prefix: full_prefix.clone(),
            ..Default::default()
        };
        let log: Arc<dyn EventLog> = Arc::new(
            eventlog::jetstream::JetStreamLog::connect(client.clone(), config)
                .await
                .expect("log"),
        );
        let begun = Instant::now();
        write_events(log.clone()).await;
        write_invocations(log).await;
        println!(
            "wrote {EVENTS} configuration events and {} invocation events to JetStream in {:.2} s",
            INVOCATIONS * 2,
            begun.elapsed().as_secs_f64()
        );
        client
    });
    let bucket = format!("{}_checkpoints", full_prefix.to_uppercase());
    let (empty_dir, full_dir) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    measure(
        "JetStream",
        Target {
            dir: empty_dir.path(),
            nats: Some((nats.url(), empty_prefix)),
        },
        Target {
            dir: full_dir.path(),
            nats: Some((nats.url(), full_prefix)),
        },
        &|| {
            runtime.block_on(async {
                let js = async_nats::jetstream::new(client.clone());
                if let Ok(store) = js.get_key_value(&bucket).await {
                    for name in [
                        "server_directory_v2",
                        "tool_states_v4",
                        "connection_directory_v1",
                        "open_invocations_v2",
                        policy::REACTION_NAME,
                    ] {
                        let _ = store.purge(name).await;
                    }
                }
            });
        },
    );
}
