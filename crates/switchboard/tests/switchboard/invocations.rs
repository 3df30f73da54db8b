//! At most once across a crash: `up` on JetStream is killed with SIGKILL while it runs 2,000
//! invocations of one user against the fixture MCP server, and started again; every
//! invocation id then ends with exactly one final outcome, and no id reached the server twice.
use super::token;
use std::{
    collections::HashMap,
    io::BufRead,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures_util::StreamExt;
use serde_json::{Value, json};

const INVOCATIONS: usize = 2_000;
const IN_FLIGHT: usize = 64;
const KILL_AFTER: usize = 500;
const USER: &str = "alice@example.com";

type Lines = std::io::Lines<std::io::BufReader<std::process::ChildStderr>>;

/// `up` on JetStream with the settings file; returns it, its log and its URL.
fn start(dir: &std::path::Path, config: &std::path::Path) -> (std::process::Child, Lines, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--data-dir")
        .arg(dir)
        .arg("up")
        .env_remove("SWITCHBOARD_VAULT_KEYS")
        .env_remove("SWITCHBOARD_NATS_URL")
        .env("SWITCHBOARD_CONFIG", config)
        .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start switchboard up");
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let (_, url) = super::read_listening_url(&mut lines);
    // Keep reading the log, so that `up` never blocks on a full pipe.
    (child, lines, url)
}

fn drain(lines: Lines) {
    std::thread::spawn(move || for _ in lines {});
}

async fn ok(response: reqwest::Response) -> Value {
    let status = response.status();
    let body: Value = response.json().await.expect("JSON");
    assert!(status.is_success(), "{status} {body}");
    body
}

fn body_of(n: usize) -> Value {
    let id = format!("kill_{n}");
    json!({"invocation_id": id, "tool": "crash_test__create_issue", "arguments": {"title": id}})
}

/// `up` on JetStream, under a prefix of its own and with `more_config` in its settings
/// file, with alice connected to the fixture MCP
/// server through the OAuth flow and `create_issue` always allowed.
struct Running {
    up: std::process::Child,
    /// `up`'s log, to read or [`drain`].
    lines: Lines,
    url: String,
    alice: String,
    client: reqwest::Client,
    handle: testkit::FixtureHandle,
    prefix: String,
    data: std::path::PathBuf,
    config: std::path::PathBuf,
    _fixture: testkit::FixtureServer,
    _dir: tempfile::TempDir,
}

async fn running(name: &str, more_config: &str) -> Running {
    let ca = testkit::TestCa::new();
    let (router, handle) = testkit::OAuthFixture::default().start();
    let fixture = testkit::serve_https(router, &ca.issue(&["localhost"])).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).expect("CA file");
    let prefix = testkit::unique_name(name);
    let config = dir.path().join("switchboard.toml");
    std::fs::write(
        &config,
        format!(
            "[nats]\nurl = \"{}\"\nprefix = \"{prefix}\"\n\n[outbound]\nallow_loopback = true\nextra_ca_file = \"{}\"\n\n{more_config}",
            testkit::shared_nats().url(),
            ca_file.display()
        ),
    )
    .expect("config");
    let data = dir.path().join("data");
    let (up, lines, url) = start(&data, &config);
    let admin = token(&data, "admin@example.com", "admin");
    let alice = token(&data, USER, "analyst");
    let client = testkit::http_client()
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()
        .expect("client");
    let browser = testkit::http_client()
        .tls_certs_only(
            reqwest::Certificate::from_pem_bundle(ca.cert_pem().as_bytes()).expect("CA"),
        )
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("browser");

    // A custom server at the fixture, alice connected through the OAuth flow, create_issue
    // always allowed.
    let server = ok(client
        .post(format!("{url}/api/v1/servers"))
        .bearer_auth(&admin)
        .json(&json!({"name": "Crash test", "url": format!("{}/mcp", fixture.https_url("localhost"))}))
        .send()
        .await
        .expect("add"))
    .await;
    let server_id = server["id"].as_str().expect("id").to_owned();
    let started = ok(client
        .post(format!("{url}/api/v1/servers/{server_id}/connection"))
        .bearer_auth(&alice)
        .send()
        .await
        .expect("connect"))
    .await;
    let redirect = browser
        .get(
            started["authorization_url"]
                .as_str()
                .expect("authorization URL"),
        )
        .send()
        .await
        .expect("authorize");
    let location = redirect.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let (status, page, _) = testkit::follow_callback(&client, &location, "connect").await;
    assert_eq!(status, 200, "{page}");
    ok(client
        .put(format!(
            "{url}/api/v1/servers/{server_id}/tools/create_issue"
        ))
        .bearer_auth(&alice)
        .json(&json!({"state": "always_allow"}))
        .send()
        .await
        .expect("allow"))
    .await;

    Running {
        up,
        lines,
        url,
        alice,
        client,
        handle,
        prefix,
        data,
        config,
        _fixture: fixture,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_invocation_ends_once_and_reaches_the_server_at_most_once_across_a_kill() {
    let it = running("kill", "[invocations]\nmax_deadline_ms = 2000\n").await;
    let (mut up, url, alice, client) = (it.up, it.url, it.alice, it.client);
    let (handle, prefix, data, config) = (it.handle, it.prefix, it.data, it.config);
    drain(it.lines);

    // 2,000 invocations, 64 at a time; SIGKILL once 500 have answered.
    let answered = Arc::new(AtomicUsize::new(0));
    let reached = Arc::new(tokio::sync::Notify::new());
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (client, url, alice) = (client.clone(), url.clone(), alice.clone());
        let (answered, reached, next) = (answered.clone(), reached.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= INVOCATIONS {
                    return;
                }
                let sent = client
                    .post(format!("{url}/api/v1/invocations"))
                    .bearer_auth(&alice)
                    .json(&body_of(n))
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status().is_success() => {
                        if answered.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AFTER {
                            reached.notify_one();
                        }
                    }
                    // The process is gone: the rest is sent to its successor.
                    _ => return,
                }
            }
        }));
    }
    reached.notified().await;
    up.kill().expect("SIGKILL");
    let _ = up.wait();
    for worker in workers {
        worker.await.expect("worker");
    }
    let before = answered.load(Ordering::SeqCst);
    assert!((KILL_AFTER..INVOCATIONS).contains(&before), "{before}");

    // Started again on the same store: every id is sent again (a retry for those that
    // answered or were in flight), then looked up until its outcome is final.
    let (mut up, lines, url) = start(&data, &config);
    drain(lines);
    let outcomes: Vec<(usize, Value)> = futures_util::stream::iter(0..INVOCATIONS)
        .map(|n| {
            let (client, url, alice) = (client.clone(), url.clone(), alice.clone());
            async move {
                let mut outcome = ok(client
                    .post(format!("{url}/api/v1/invocations"))
                    .bearer_auth(&alice)
                    .json(&body_of(n))
                    .send()
                    .await
                    .expect("invoke"))
                .await;
                while outcome["outcome"] == "running" {
                    outcome = ok(client
                        .get(format!("{url}/api/v1/invocations/kill_{n}?wait=30"))
                        .bearer_auth(&alice)
                        .send()
                        .await
                        .expect("status"))
                    .await;
                }
                (n, outcome)
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    up.kill().expect("stop");
    let _ = up.wait();

    let mut by_outcome: HashMap<String, usize> = HashMap::new();
    for (n, outcome) in &outcomes {
        let kind = outcome["outcome"].as_str().unwrap_or_default().to_owned();
        assert!(
            kind == "completed" || (kind == "failed" && outcome["reason"] == "interrupted"),
            "kill_{n}: {outcome}"
        );
        *by_outcome.entry(kind).or_default() += 1;
    }
    assert_eq!(outcomes.len(), INVOCATIONS);

    // No id reached the server twice; every completed one reached it once.
    let mut calls: HashMap<String, usize> = HashMap::new();
    for arguments in handle.tool_call_arguments("create_issue") {
        *calls
            .entry(arguments["title"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    for (id, count) in &calls {
        assert_eq!(*count, 1, "{id} reached the server {count} times");
    }
    for (n, outcome) in &outcomes {
        if outcome["outcome"] == "completed" {
            assert_eq!(calls.get(&format!("kill_{n}")), Some(&1), "kill_{n}");
        }
    }

    // Exactly one terminal event per invocation in the stream.
    let nats = async_nats::connect(testkit::shared_nats().url())
        .await
        .expect("connect");
    let log = eventlog::jetstream::JetStreamLog::connect_existing(
        nats,
        eventlog::jetstream::JetStreamConfig::with_prefix(&prefix),
    )
    .await
    .expect("log");
    let mut terminal: HashMap<String, usize> = HashMap::new();
    let mut stream = eventlog::EventLog::read_from(&log, eventlog::LogKind::Invocations, 0, None)
        .await
        .expect("read");
    while let Some(event) = stream.next().await {
        use proto::v1::envelope::Event as E;
        let event = event.expect("event");
        let id = match &event.envelope.event {
            Some(E::InvocationCompleted(e)) => &e.invocation_id,
            Some(E::InvocationFailed(e)) => &e.invocation_id,
            Some(E::InvocationRejected(e)) => &e.invocation_id,
            _ => continue,
        };
        *terminal.entry(id.clone()).or_default() += 1;
    }
    assert_eq!(terminal.len(), INVOCATIONS, "{by_outcome:?}");
    assert!(terminal.values().all(|count| *count == 1));
    eprintln!("outcomes after the kill: {by_outcome:?}; answered before it: {before}");
}

/// A stop (SIGTERM) lets the orchestrator's NATS requests in flight finish before the log
/// closes: new ones find no responder here (the queue group's other members take them), the
/// one whose call is under way is answered and recorded, and then the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_answers_the_orchestrator_requests_in_flight_and_takes_no_new_ones() {
    let it = running("stop", "").await;
    let (mut up, mut lines) = (it.up, it.lines);
    let nats = async_nats::ConnectOptions::new()
        .request_timeout(Some(std::time::Duration::from_secs(60)))
        .connect(testkit::shared_nats().url())
        .await
        .expect("connect");
    let subject = format!("{}.invoke", it.prefix);
    let invoke = |id: &str| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        let body = json!({"invocationId": id, "userId": USER, "tool": "crash_test__create_issue", "arguments": {"title": id}});
        let (nats, subject) = (nats.clone(), subject.clone());
        async move {
            nats.request_with_headers(subject, headers, body.to_string().into())
                .await
        }
    };
    // The call in flight waits at the token endpoint: its access token has expired.
    it.handle.expire_access_tokens();
    let gate = it.handle.pause_token_endpoint();
    let in_flight = tokio::spawn(invoke("call_in_flight"));
    gate.arrived(1).await;

    let term = std::process::Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(term.success());
    let (stopping, lines) = tokio::task::spawn_blocking(move || {
        let seen = super::read_until(&mut lines, "stopped taking orchestrator requests");
        (seen, lines)
    })
    .await
    .expect("read the log");
    let stopping = stopping.lines().last().unwrap_or_default().to_owned();
    assert!(stopping.contains("in_flight=1"), "{stopping}");
    let refused = invoke("call_too_late")
        .await
        .expect_err("nobody takes a request any more");
    assert_eq!(
        refused.kind(),
        async_nats::RequestErrorKind::NoResponders,
        "{refused}"
    );

    gate.release();
    let reply = in_flight.await.expect("task").expect("the reply");
    let reply: Value = serde_json::from_slice(&reply.payload).expect("JSON");
    assert_eq!(reply["outcome"], "completed", "{reply}");
    let rest = tokio::task::spawn_blocking(move || {
        lines
            .map(|line| line.expect("read stderr"))
            .collect::<Vec<_>>()
    })
    .await
    .expect("read the log");
    let status = up.wait().expect("wait");
    assert!(status.success(), "{status}: {rest:?}");
    assert!(
        rest.iter().all(|line| !line.contains("cut off")),
        "{rest:?}"
    );
    let calls = it.handle.tool_call_arguments("create_issue");
    assert_eq!(calls, [json!({"title": "call_in_flight"})]);

    // Recorded before the log closed.
    let log = eventlog::jetstream::JetStreamLog::connect_existing(
        nats,
        eventlog::jetstream::JetStreamConfig::with_prefix(&it.prefix),
    )
    .await
    .expect("log");
    let mut outcomes = Vec::new();
    let mut stream = eventlog::EventLog::read_from(&log, eventlog::LogKind::Invocations, 0, None)
        .await
        .expect("read");
    while let Some(event) = stream.next().await {
        use proto::v1::envelope::Event as E;
        match event.expect("event").envelope.event {
            Some(E::InvocationCompleted(e)) => outcomes.push(("completed", e.invocation_id)),
            Some(E::InvocationFailed(e)) => outcomes.push(("failed", e.invocation_id)),
            _ => {}
        }
    }
    assert_eq!(outcomes, [("completed", "call_in_flight".to_owned())]);
}
