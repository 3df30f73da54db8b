//! Propagation of a tool setting between two `switchboard up` processes on one JetStream: a
//! change acknowledged by process A (its PUT answered), until process B's tool-state
//! projection answers with the new state through B's GET route. p50 and p99 over 10,000
//! changes (target: p99 ≤ 20 ms), spread over 100 users × 10 tools, as many users changing
//! settings would (one user toggling one tool 10,000 times would mostly measure the command
//! path reading an ever longer policy aggregate).
//!
//! `cargo bench -p switchboard --bench tool_propagation` (needs `scripts/install-nats-server.sh`)
use std::{
    io::BufRead,
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use eventlog::{EventLog, ExpectedVersion, Subject};
use proto::v1::{self as pb, Envelope, envelope::Event};

const CHANGES: usize = 10_000;
const TOOLS: usize = 10;
const USERS: usize = 100;
const SECRET: &str = "propagation-bench-secret-0123456789";
/// Give up on one change after this long (a broken follower fails the bench, not hangs it).
const GIVE_UP: Duration = Duration::from_secs(10);

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

fn user(u: usize) -> String {
    format!("user{u}@example.com")
}

/// A server and `USERS` users connected to it with `TOOLS` tools.
async fn seed(log: &dyn EventLog, server: &str) {
    let append = |subject: String, events: Vec<Event>| async move {
        let subject = Subject::parse(&subject).expect("subject");
        let envelopes: Vec<Envelope> = events.into_iter().map(envelope).collect();
        log.append(&subject, ExpectedVersion::Any, &envelopes)
            .await
            .expect("append");
    };
    append(
        format!("server.{server}"),
        vec![Event::ServerAdded(pb::ServerAdded {
            server_id: server.into(),
            name: "Tracker".into(),
            slug: "tracker".into(),
            url: "https://mcp.example.com/mcp".into(),
            enabled: true,
            ..Default::default()
        })],
    )
    .await;
    let tools: Vec<pb::ToolDefinition> = (0..TOOLS)
        .map(|t| {
            let mut definition = pb::ToolDefinition {
                name: format!("tool_{t}"),
                description: format!("Tool number {t}"),
                ..Default::default()
            };
            definition.definition_hash = domain::tool_definition_hash(&definition);
            definition
        })
        .collect();
    for u in 0..USERS {
        let user = user(u);
        let key = domain::UserId::parse(&user).expect("user").key();
        append(
            format!("connection.{server}.{}", key.as_str()),
            vec![
                Event::ConnectionStarted(pb::ConnectionStarted {
                    server_id: server.into(),
                    user_id: user.clone(),
                    ..Default::default()
                }),
                Event::ConnectionEstablished(pb::ConnectionEstablished {
                    server_id: server.into(),
                    user_id: user.clone(),
                    token_fingerprint: "0123456789abcdef".into(),
                    ..Default::default()
                }),
                Event::ToolsDiscovered(pb::ToolsDiscovered {
                    server_id: server.into(),
                    user_id: user.clone(),
                    tools: tools.clone(),
                    ..Default::default()
                }),
            ],
        )
        .await;
    }
}

/// Starts `up` on JetStream; returns the process and its URL once it listens (its read
/// models have caught up by then). Its log lines are drained by a thread so it never blocks
/// on a full pipe.
fn start_up(dir: &Path, nats: &str, prefix: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--data-dir")
        .arg(dir)
        .args(["--nats", nats, "--nats-prefix", prefix, "up"])
        .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_LOG_FORMAT", "text")
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .env("NO_COLOR", "1")
        .env_remove("SWITCHBOARD_VAULT_KEYS")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start up");
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut url = None;
    for line in lines.by_ref() {
        let line = line.expect("log line");
        if let Some(rest) = line.split("listening on ").nth(1) {
            url = rest.split_whitespace().next().map(str::to_owned);
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (child, url.expect("up logged its URL"))
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    testkit::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let nats = testkit::NatsServer::start();
    let prefix = "benchprop".to_owned();
    let server = uuid::Uuid::now_v7().to_string();
    runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let log = eventlog::jetstream::JetStreamLog::connect(
            client,
            eventlog::jetstream::JetStreamConfig {
                prefix: prefix.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("log");
        let log: Arc<dyn EventLog> = Arc::new(log);
        seed(log.as_ref(), &server).await;
    });
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (a, url_a) = start_up(dir_a.path(), &nats.url(), &prefix);
    let (b, url_b) = start_up(dir_b.path(), &nats.url(), &prefix);
    let roles = vec!["analyst".to_owned()];
    let tokens: Vec<String> = (0..USERS)
        .map(|u| {
            gateway::auth::mint_token(
                SECRET.as_bytes(),
                &gateway::auth::TokenRequest {
                    user: &user(u),
                    roles: &roles,
                    ttl: Duration::from_secs(3600),
                    issuer: None,
                    audience: None,
                    roles_claim: "roles",
                },
            )
            .expect("token")
        })
        .collect();

    let (mut propagation, mut acknowledgement) = (Vec::new(), Vec::new());
    let mut polls = 0u64;
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .expect("client");
        let list = format!("{url_b}/api/v1/servers/{server}/tools");
        // Current state per user and tool, as both processes should show it.
        let mut states = vec!["blocked"; USERS * TOOLS];
        for i in 0..CHANGES {
            let (u, t) = (i % USERS, (i / USERS) % TOOLS);
            let token = &tokens[u];
            let new_state = if states[u * TOOLS + t] == "always_allow" {
                "needs_approval"
            } else {
                "always_allow"
            };
            let tool = format!("tool_{t}");
            let sent = Instant::now();
            let answer = client
                .put(format!("{url_a}/api/v1/servers/{server}/tools/{tool}"))
                .bearer_auth(token)
                .json(&serde_json::json!({"state": new_state}))
                .send()
                .await
                .expect("PUT");
            assert_eq!(answer.status(), 200, "{:?}", answer.text().await);
            let acknowledged = Instant::now();
            acknowledgement.push(acknowledged - sent);
            states[u * TOOLS + t] = new_state;
            // Ask B until its projection answers with the new state.
            loop {
                polls += 1;
                let body: serde_json::Value = client
                    .get(&list)
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("GET")
                    .json()
                    .await
                    .expect("JSON");
                let shown = body["tools"]
                    .as_array()
                    .and_then(|tools| tools.iter().find(|item| item["name"] == tool.as_str()))
                    .and_then(|item| item["state"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                if shown == new_state {
                    break;
                }
                assert!(
                    acknowledged.elapsed() < GIVE_UP,
                    "B never showed change {i} ({tool} -> {new_state})"
                );
            }
            propagation.push(acknowledged.elapsed());
            if (i + 1) % 1_000 == 0 {
                eprintln!("{} changes", i + 1);
            }
        }
    });
    stop(a);
    stop(b);
    propagation.sort();
    acknowledgement.sort();
    println!(
        "propagation over {CHANGES} changes (A's PUT answered -> B's GET shows it): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 <= 20 ms); {:.2} GETs per change",
        millis(percentile(&propagation, 0.5)),
        millis(percentile(&propagation, 0.99)),
        millis(percentile(&propagation, 1.0)),
        polls as f64 / CHANGES as f64
    );
    println!(
        "A's PUT, sent -> answered (read-your-writes included): p50 {:.2} ms, p99 {:.2} ms",
        millis(percentile(&acknowledgement, 0.5)),
        millis(percentile(&acknowledgement, 0.99))
    );
}
