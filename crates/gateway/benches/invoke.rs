//! What an invocation through Switchboard adds to a tool call, in one run: against the
//! fixture `rmcp` MCP server over TLS on loopback, (a) a direct `rmcp` client with the same
//! token, (b) Switchboard's invoker on the JSONL log, (c) on JetStream, (d) (c) for a user
//! with 100,000 past invocations. Latency at concurrency 1 (p50, p99) and throughput with 64
//! invocations of one user in flight. The invoker is called in-process (the HTTP layer's own
//! cost is `--bench http`).
//!
//! The machine is shared by the client, the fixture server, Switchboard and nats-server, and
//! the figures of one pass swing with it; so the four are measured in turns, `ROUNDS` times,
//! and each figure is the median of its rounds. Throughput is compared with the direct
//! client's of the same round. The CPU time per invocation (this process and nats-server,
//! whose share is shown too) says what the 64-in-flight part spent. Two floors are measured
//! in the same rounds: (b0) and (c0), an invocation's two appends alone on each store, without
//! the call; and the bench prints the CPU that 0.7× the direct client's throughput leaves
//! Switchboard per invocation (at 64 in flight the two cores are the limit). And (c') is (c)
//! with nats-server's threads on `SCHED_BATCH` (util-linux's `chrt`, set and reset around it
//! in each round), the deployment docs/configuration.md advises where nats-server shares
//! the cores.
//!
//! `NATS_SERVER_BIN=… cargo bench -p gateway --bench invoke`
//! (`INVOKE_BENCH_ONLY=direct|jsonl|jetstream|history` runs one part alone, for a profiler;
//! `INVOKE_BENCH_PHASE=sequential|parallel` one of its two phases; `INVOKE_BENCH_CALLS=N` makes
//! the 64-in-flight phase N invocations long instead of 10,000.)
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use eventlog::{
    EventLog, ExpectedVersion, Subject,
    jetstream::{JetStreamConfig, JetStreamLog},
    jsonl::{JsonlLog, JsonlOptions},
    projection::{CheckpointPolicy, CheckpointStore, FileCheckpointStore},
};
use gateway::{
    AppParts, AppState, Authenticator, GatewaySettings, Metrics, RoleTable,
    auth::{AuthSettings, TokenRequest, VerificationKeys, mint_token},
};
use serde_json::{Value, json};
use service_kit::{CommandContext, EnvelopeBuilder, ReadModels, SystemClock};
use tokio_util::sync::CancellationToken;

/// The allocator the `switchboard` binary runs with (see its `main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECRET: &[u8] = b"bench-secret-bench-secret-bench-secret";
const USER: &str = "alice@example.com";
const SEQUENTIAL: usize = 2_000;
const IN_FLIGHT: usize = 64;
const PARALLEL: usize = 10_000;
const HISTORY: usize = 100_000;

const ROUNDS: usize = 3;

#[derive(Debug, Clone, Copy)]
struct Figures {
    p50: Duration,
    p99: Duration,
    per_second: f64,
    /// CPU time of this process and nats-server per invocation at 64 in flight.
    cpu_per_call: Duration,
    /// The part of it that nats-server spent.
    nats_cpu_per_call: Duration,
}

impl Figures {
    /// The figures on their own, without a comparison.
    fn own(&self) -> String {
        format!(
            "p50 {:>6.3} ms  p99 {:>6.3} ms  {:>6.0}/s at {IN_FLIGHT} in flight, {:>4.0} µs CPU each{}",
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.per_second,
            self.cpu_per_call.as_secs_f64() * 1e6,
            self.nats_share(),
        )
    }

    /// What nats-server's part of the CPU time was, if it had one.
    fn nats_share(&self) -> String {
        if self.nats_cpu_per_call.is_zero() {
            String::new()
        } else {
            format!(
                " ({:.0} µs in nats-server)",
                self.nats_cpu_per_call.as_secs_f64() * 1e6
            )
        }
    }
}

/// CPU time (user and system) of a process so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: &str) -> Duration {
    // Fields 14 and 15, counted after the command name (which may hold spaces), in clock
    // ticks; Linux shows user space 100 ticks a second.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|n| n.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// The median time of appending 400 bytes to a file in `dir` and syncing it.
fn fdatasync_p50(dir: &std::path::Path) -> Duration {
    use std::io::Write as _;
    let path = dir.join("fdatasync-probe");
    let mut file = std::fs::File::create(&path).expect("probe file");
    let mut samples: Vec<Duration> = (0..1_000)
        .map(|_| {
            let begun = Instant::now();
            file.write_all(&[b'x'; 400]).expect("write");
            file.sync_data().expect("sync");
            begun.elapsed()
        })
        .collect();
    samples.sort();
    let _ = std::fs::remove_file(&path);
    samples[samples.len() / 2]
}

/// The shared nats-server's resident memory in bytes (0 if it does not run).
fn nats_server_rss() -> u64 {
    testkit::shared_nats_if_started().map_or(0, testkit::NatsServer::resident_bytes)
}

/// CPU time so far of this process, and of the shared nats-server (zero if it does not run).
fn cpu_now() -> (Duration, Duration) {
    let nats = testkit::shared_nats_if_started()
        .and_then(|server| server.pid())
        .map_or(Duration::ZERO, |pid| cpu_time(&pid.to_string()));
    (cpu_time("self"), nats)
}

/// Puts every thread of the shared nats-server on `SCHED_BATCH` (`batch`), or back on the
/// default policy, with util-linux's `chrt` — as docs/configuration.md advises for a host
/// where nats-server shares the cores. False if that could not be done (no `chrt`, refused).
fn nats_server_batch(batch: bool) -> bool {
    let Some(pid) = testkit::shared_nats_if_started().and_then(|server| server.pid()) else {
        return false;
    };
    let policy = if batch { "--batch" } else { "--other" };
    std::process::Command::new("chrt")
        .args([policy, "--all-tasks", "--pid", "0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn token(user: &str, role: &str) -> String {
    mint_token(
        SECRET,
        &TokenRequest {
            user,
            roles: &[role.to_owned()],
            ttl: Duration::from_secs(3600),
            issuer: None,
            audience: None,
            roles_claim: "roles",
        },
    )
    .expect("token")
}

struct Setup {
    state: AppState,
    url: String,
    client: reqwest::Client,
    browser: reqwest::Client,
    fixture_url: String,
    outbound: mcp::OutboundClient,
    _fixture: testkit::FixtureServer,
    dir: tempfile::TempDir,
}

async fn setup(jetstream: bool) -> Setup {
    let ca = testkit::TestCa::new();
    let (router, handle) = testkit::OAuthFixture::notion().start();
    handle.set_tools(testkit::FixtureTool::standard_set());
    let fixture = testkit::serve_https(router, &ca.issue(&["fixture.test"])).await;
    let fixture_url = format!("{}/mcp", fixture.https_url("fixture.test"));
    let browser = testkit::http_client()
        .tls_certs_only(
            reqwest::Certificate::from_pem_bundle(ca.cert_pem().as_bytes()).expect("CA"),
        )
        .resolve("fixture.test", fixture.address)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("browser");
    let outbound = mcp::OutboundClient::new(
        mcp::OutboundPolicy {
            allow_loopback: true,
            extra_ca_pem: vec![ca.cert_pem().to_owned()],
            request_timeout: Duration::from_secs(10),
            loopback_only_safety_net: true,
            ..mcp::OutboundPolicy::default()
        },
        Arc::new(
            mcp::StaticResolver::new().with("fixture.test", &["127.0.0.1".parse().expect("ip")]),
        ),
    )
    .expect("outbound");
    let dir = tempfile::tempdir().expect("temp dir");
    // The vault where `up` keeps it: on JetStream a KV bucket on the log's connection, beside
    // the JSONL log a directory.
    let (log, checkpoints, secrets): (
        Arc<dyn EventLog>,
        Arc<dyn CheckpointStore>,
        Arc<dyn vault::SecretStore>,
    ) = if jetstream {
        let client = async_nats::connect(testkit::shared_nats().url())
            .await
            .expect("nats");
        let secrets = vault::KvStore::open(
            async_nats::jetstream::new(client.clone()),
            &testkit::unique_name("benchvault"),
        )
        .await
        .expect("vault bucket");
        let log = JetStreamLog::connect(
            client,
            JetStreamConfig {
                prefix: testkit::unique_name("bench"),
                ..JetStreamConfig::default()
            },
        )
        .await
        .expect("JetStream");
        let checkpoints = log.checkpoint_store().await.expect("checkpoints");
        (Arc::new(log), Arc::new(checkpoints), Arc::new(secrets))
    } else {
        (
            Arc::new(
                JsonlLog::open(&dir.path().join("events"), JsonlOptions::default())
                    .await
                    .expect("log"),
            ),
            Arc::new(FileCheckpointStore::open(&dir.path().join("cp")).expect("cp")),
            Arc::new(vault::FileStore::open(dir.path().join("vault")).expect("vault")),
        )
    };
    let read_models = ReadModels::start(
        log.clone(),
        checkpoints.clone(),
        CheckpointPolicy::default(),
    )
    .await
    .expect("read models");
    let envelopes = EnvelopeBuilder::new(Arc::new(SystemClock));
    // The policy reaction is not needed: no definition changes during the run.
    let keys = vault::KeyRing::load_or_generate(&dir.path().join("vault.keys")).expect("keys");
    let vault = vault::Vault::new(secrets, keys);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let state = AppState::new(AppParts {
        log,
        vault,
        read_models,
        envelopes,
        auth: Authenticator::new(AuthSettings {
            keys: VerificationKeys::SharedSecret(SECRET.to_vec()),
            issuer: None,
            audience: None,
            roles_claim: "roles".into(),
            leeway: Duration::from_secs(30),
            roles: RoleTable::defaults(),
        }),
        metrics: Metrics::new(),
        settings: GatewaySettings {
            public_url: url.clone(),
            ..GatewaySettings::default()
        },
        shutdown: CancellationToken::new(),
        catalog: Arc::new(catalog::Catalog::with_urls([(
            "notion",
            fixture_url.clone(),
        )])),
        outbound: outbound.clone(),
        client_metadata_url: None,
        connection_settings: None,
        invoker_settings: None,
    });
    tokio::spawn(gateway::server::serve(
        listener,
        gateway::app(state.clone()),
        None,
        CancellationToken::new(),
        gateway::server::ServeLimits::default(),
    ));
    Setup {
        state,
        url,
        client: testkit::http_client().build().expect("client"),
        browser,
        fixture_url,
        outbound,
        _fixture: fixture,
        dir,
    }
}

impl Setup {
    async fn send(&self, request: reqwest::RequestBuilder) -> Value {
        let response = request.send().await.expect("request");
        let status = response.status();
        let body: Value = response.json().await.expect("JSON");
        assert!(status.is_success(), "{status} {body}");
        body
    }

    /// Adds the server, connects the user through the OAuth flow, allows `create_issue`.
    async fn connect(&self) -> String {
        let admin = token("admin@example.com", "admin");
        let user = token(USER, "analyst");
        let server = self
            .send(
                self.client
                    .post(format!("{}/api/v1/servers", self.url))
                    .bearer_auth(&admin)
                    .json(&json!({"name": "Bench", "template": "notion"})),
            )
            .await;
        let id = server["id"].as_str().expect("id").to_owned();
        let started = self
            .send(
                self.client
                    .post(format!("{}/api/v1/servers/{id}/connection", self.url))
                    .bearer_auth(&user),
            )
            .await;
        let authorize = started["authorization_url"].as_str().expect("url");
        let redirect = self.browser.get(authorize).send().await.expect("authorize");
        let location = redirect.headers()["location"].to_str().expect("location");
        let (status, page, _) = testkit::follow_callback(&self.client, location, "connect").await;
        assert_eq!(status, 200, "{page}");
        self.send(
            self.client
                .put(format!(
                    "{}/api/v1/servers/{id}/tools/create_issue",
                    self.url
                ))
                .bearer_auth(&user)
                .json(&json!({"state": "always_allow"})),
        )
        .await;
        id
    }

    async fn invoke(&self, id: String) {
        let report = self
            .state
            .invoker
            .invoke(
                &CommandContext::service("bench"),
                invoker::InvokeRequest {
                    invocation_id: domain::InvocationId::parse(&id).expect("id"),
                    user: domain::UserId::parse(USER).expect("user"),
                    tool: "bench__create_issue".to_owned(),
                    arguments: serde_json::from_value(json!({"title": "Bench"})).expect("args"),
                    deadline: None,
                    conversation_id: None,
                },
            )
            .await
            .expect("invoke");
        assert_eq!(report.outcome, invoker::Outcome::Completed, "{report:?}");
    }
}

/// How many invocations the 64-in-flight phase makes: `PARALLEL`, or more for a profiler.
fn parallel_calls() -> usize {
    std::env::var("INVOKE_BENCH_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(PARALLEL)
}

async fn measure<F, Fut>(call: F) -> Figures
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let phase = std::env::var("INVOKE_BENCH_PHASE").ok();
    let runs = |name: &str| phase.as_deref().is_none_or(|phase| phase == name);
    for n in 0..100 {
        call(usize::MAX - n).await;
    }
    let mut latencies = Vec::with_capacity(SEQUENTIAL);
    for n in 0..SEQUENTIAL {
        if !runs("sequential") {
            break;
        }
        let begun = Instant::now();
        call(n).await;
        latencies.push(begun.elapsed());
    }
    latencies.sort();
    if latencies.is_empty() {
        latencies.push(Duration::ZERO);
    }
    let (own_before, nats_before) = cpu_now();
    let started = Instant::now();
    let mut workers = Vec::new();
    let per_worker = if runs("parallel") {
        parallel_calls() / IN_FLIGHT
    } else {
        0
    };
    for worker in 0..IN_FLIGHT {
        let call = call.clone();
        workers.push(tokio::spawn(async move {
            for n in 0..per_worker {
                call(SEQUENTIAL + worker * per_worker + n).await;
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    let calls = ((per_worker * IN_FLIGHT) as u32).max(1);
    let elapsed = started.elapsed();
    let (own, nats) = cpu_now();
    Figures {
        p50: latencies[latencies.len() / 2],
        p99: latencies[latencies.len() * 99 / 100],
        per_second: f64::from(calls) / elapsed.as_secs_f64(),
        cpu_per_call: (own.saturating_sub(own_before) + nats.saturating_sub(nats_before)) / calls,
        nats_cpu_per_call: nats.saturating_sub(nats_before) / calls,
    }
}

async fn through_switchboard(setup: Arc<Setup>, run: String) -> Figures {
    measure(move |n| {
        let setup = setup.clone();
        let id = format!("{run}_{n}");
        async move { setup.invoke(id).await }
    })
    .await
}

/// One invocation's two appends as the invoker makes them: its claim (requested, allowed and
/// so started) and its outcome, on the user's subject, each under the event id every writer
/// of it derives.
async fn append_invocation(
    log: &dyn EventLog,
    envelopes: &EnvelopeBuilder,
    user: &domain::UserId,
    id: &str,
) {
    use domain::invocation::{Settles, settling_event_id};
    use proto::v1::envelope::Event;
    let context = CommandContext::service("bench");
    let id = domain::InvocationId::parse(id).expect("id");
    let subject = Subject::parse(&domain::invocation::subject(user)).expect("subject");
    let requested = Event::InvocationRequested(proto::v1::InvocationRequested {
        invocation_id: id.to_string(),
        user_id: USER.to_owned(),
        exposed_tool_name: "bench__create_issue".to_owned(),
        tool_name: "create_issue".to_owned(),
        started: true,
        ..Default::default()
    });
    let completed = Event::InvocationCompleted(proto::v1::InvocationCompleted {
        invocation_id: id.to_string(),
        duration_ms: 1,
        ..Default::default()
    });
    for (event, settles) in [(requested, Settles::Claim), (completed, Settles::Outcome)] {
        let mut envelope = envelopes.wrap(&context, vec![event]);
        envelope[0].write_id = std::mem::replace(
            &mut envelope[0].event_id,
            settling_event_id(user, &id, settles),
        );
        log.append(&subject, ExpectedVersion::Any, &envelope)
            .await
            .expect("append");
    }
}

/// 100,000 past invocations of the user, each requested (and started) and completed, as the
/// invoker records them, appended straight to the log.
async fn write_history(setup: &Setup) {
    let log = setup.state.log.clone();
    let envelopes = EnvelopeBuilder::new(Arc::new(SystemClock));
    let user = domain::UserId::parse(USER).expect("user");
    let mut workers = Vec::new();
    for worker in 0..IN_FLIGHT {
        let (log, envelopes, user) = (log.clone(), envelopes.clone(), user.clone());
        workers.push(tokio::spawn(async move {
            for n in (worker..HISTORY).step_by(IN_FLIGHT) {
                append_invocation(&*log, &envelopes, &user, &format!("past_{n}")).await;
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
}

/// An invocation's two appends alone, without the call: the floor under (b)–(d) that the
/// store sets (the claim must be durable before the call, the outcome before the answer).
async fn appends_alone(setup: Arc<Setup>, run: String) -> Figures {
    let envelopes = EnvelopeBuilder::new(Arc::new(SystemClock));
    let user = domain::UserId::parse(USER).expect("user");
    measure(move |n| {
        let (setup, envelopes, user) = (setup.clone(), envelopes.clone(), user.clone());
        let id = format!("{run}_{n}");
        async move { append_invocation(&*setup.state.log, &envelopes, &user, &id).await }
    })
    .await
}

/// The median of each figure over the rounds.
fn median(rounds: &[Figures]) -> Figures {
    fn mid<T: Copy + PartialOrd>(mut values: Vec<T>) -> T {
        values.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
        values[values.len() / 2]
    }
    Figures {
        p50: mid(rounds.iter().map(|f| f.p50).collect()),
        p99: mid(rounds.iter().map(|f| f.p99).collect()),
        per_second: mid(rounds.iter().map(|f| f.per_second).collect()),
        cpu_per_call: mid(rounds.iter().map(|f| f.cpu_per_call).collect()),
        nats_cpu_per_call: mid(rounds.iter().map(|f| f.nats_cpu_per_call).collect()),
    }
}

fn show(name: &str, rounds: &[Figures], direct_rounds: &[Figures]) {
    let figures = median(rounds);
    let direct = median(direct_rounds);
    // Each round's throughput against the direct client's in the same round.
    let ratios: Vec<f64> = rounds
        .iter()
        .zip(direct_rounds)
        .map(|(f, d)| f.per_second / d.per_second)
        .collect();
    let ratio_text: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    let mut sorted = ratios.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    println!(
        "{name:<34} p50 {:>6.3} ms  p99 {:>6.3} ms  added p50 {:>6.3} ms  p99 {:>6.3} ms  {:>6.0}/s at {IN_FLIGHT} in flight, {:>4.0} µs CPU each{}; vs direct {:.2}× (rounds {})",
        figures.p50.as_secs_f64() * 1e3,
        figures.p99.as_secs_f64() * 1e3,
        (figures.p50.as_secs_f64() - direct.p50.as_secs_f64()) * 1e3,
        (figures.p99.as_secs_f64() - direct.p99.as_secs_f64()) * 1e3,
        figures.per_second,
        figures.cpu_per_call.as_secs_f64() * 1e6,
        figures.nats_share(),
        sorted[sorted.len() / 2],
        ratio_text.join(", "),
    );
}

fn main() {
    let only = std::env::var("INVOKE_BENCH_ONLY").ok();
    let runs = |part: &str| only.as_deref().is_none_or(|only| only == part);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let jsonl = Arc::new(setup(false).await);
        let server = jsonl.connect().await;
        let server_id = domain::ServerId::parse(&server).expect("server id");
        let user = domain::UserId::parse(USER).expect("user");
        let access = jsonl
            .state
            .connections
            .access_token(server_id, &user)
            .await
            .expect("token");
        // (a) the same session kind Switchboard uses, straight to the server.
        let session = Arc::new(
            mcp::McpSession::open(
                &jsonl.outbound,
                &url::Url::parse(&jsonl.fixture_url).expect("url"),
                &access,
            )
            .await
            .expect("session"),
        );
        let direct_call = {
            let session = session.clone();
            move |_| {
                let session = session.clone();
                async move {
                    let arguments =
                        serde_json::from_value(json!({"title": "Bench"})).expect("args");
                    let result = session
                        .call_tool("create_issue", arguments)
                        .await
                        .expect("call");
                    assert_ne!(result.is_error, Some(true));
                }
            }
        };
        let jetstream = if runs("jetstream") {
            let setup = Arc::new(setup(true).await);
            setup.connect().await;
            Some(setup)
        } else {
            None
        };
        let history = if runs("history") {
            let setup = Arc::new(setup(true).await);
            setup.connect().await;
            let rss_before = nats_server_rss();
            let begun = Instant::now();
            write_history(&setup).await;
            let grown = nats_server_rss().saturating_sub(rss_before);
            println!(
                "wrote {HISTORY} past invocations (on the user's subject) in {:.1} s; nats-server's \
                 resident memory grew by {:.1} MiB ({} bytes an invocation)",
                begun.elapsed().as_secs_f64(),
                grown as f64 / f64::from(1 << 20),
                grown / HISTORY as u64,
            );
            Some(setup)
        } else {
            None
        };

        let rounds = if only.is_some() { 1 } else { ROUNDS };
        let (mut direct, mut on_jsonl, mut on_jetstream, mut with_history) =
            (vec![], vec![], vec![], vec![]);
        let mut on_jetstream_batch = vec![];
        let (mut jsonl_appends, mut jetstream_appends) = (vec![], vec![]);
        for round in 0..rounds {
            if runs("direct") {
                direct.push(measure(direct_call.clone()).await);
            }
            if runs("jsonl") {
                on_jsonl.push(through_switchboard(jsonl.clone(), format!("jsonl{round}")).await);
            }
            if let Some(setup) = &jetstream {
                on_jetstream.push(through_switchboard(setup.clone(), format!("js{round}")).await);
                if nats_server_batch(true) {
                    on_jetstream_batch
                        .push(through_switchboard(setup.clone(), format!("jsb{round}")).await);
                    assert!(
                        nats_server_batch(false),
                        "nats-server could not be put back on the default policy"
                    );
                }
            }
            if let Some(setup) = &history {
                with_history
                    .push(through_switchboard(setup.clone(), format!("history{round}")).await);
            }
            if only.is_none() {
                jsonl_appends.push(appends_alone(jsonl.clone(), format!("jsonl_alone{round}")).await);
                if let Some(setup) = &jetstream {
                    jetstream_appends
                        .push(appends_alone(setup.clone(), format!("js_alone{round}")).await);
                }
            }
        }
        if only.is_some() {
            // One part alone: its own figures, nothing to compare with.
            for figures in [
                &direct,
                &on_jsonl,
                &on_jetstream,
                &on_jetstream_batch,
                &with_history,
            ]
                .into_iter()
                .flatten()
            {
                println!("{}", figures.own());
            }
            return;
        }
        // The floor under the JSONL figures: an invocation is two durable appends in a row.
        let disk = fdatasync_p50(jsonl.dir.path());
        println!(
            "the disk: a 400-byte append and fdatasync, p50 {:.3} ms",
            disk.as_secs_f64() * 1e3
        );
        println!("{:<34} {}", "(a) direct rmcp client", median(&direct).own());
        show("(b) Switchboard, JSONL log", &on_jsonl, &direct);
        show("(c) Switchboard, JetStream", &on_jetstream, &direct);
        if on_jetstream_batch.is_empty() {
            println!("(c') skipped: `chrt` could not put nats-server on SCHED_BATCH");
        } else {
            show("(c') (c), nats-server SCHED_BATCH", &on_jetstream_batch, &direct);
        }
        show("(d) (c), 100,000 past invocations", &with_history, &direct);
        println!(
            "{:<34} {}",
            "(b0) JSONL, the two appends alone",
            median(&jsonl_appends).own()
        );
        println!(
            "{:<34} {}",
            "(c0) JetStream, the 2 appends alone",
            median(&jetstream_appends).own()
        );
        // At 64 in flight the two cores are the limit: 0.7× the direct client's throughput
        // leaves Switchboard this much CPU per invocation on top of the direct call's.
        let budget = median(&direct).cpu_per_call.mul_f64(1.0 / 0.7 - 1.0);
        println!(
            "0.7× direct leaves Switchboard {:.0} µs CPU per invocation on top of the direct call's",
            budget.as_secs_f64() * 1e6
        );
    });
}
