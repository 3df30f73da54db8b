//! What an invocation through Switchboard adds to a tool call, in one run: against the
//! fixture `rmcp` MCP server over TLS on loopback, (a) a direct `rmcp` client with the same
//! token, (b) Switchboard's invoker on the JSONL log, (c) on JetStream, (d) (c) for a user
//! with 100,000 past invocations. Latency at concurrency 1 (p50, p99) and throughput with 64
//! invocations of one user in flight. The invoker is called in-process (the HTTP layer's own
//! cost is `--bench http`).
//!
//! `NATS_SERVER_BIN=… cargo bench -p gateway --bench invoke`
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

const SECRET: &[u8] = b"bench-secret-bench-secret-bench-secret";
const USER: &str = "alice@example.com";
const SEQUENTIAL: usize = 2_000;
const IN_FLIGHT: usize = 64;
const PARALLEL: usize = 10_000;
const HISTORY: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Figures {
    p50: Duration,
    p99: Duration,
    per_second: f64,
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
    _dir: tempfile::TempDir,
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
    let (log, checkpoints): (Arc<dyn EventLog>, Arc<dyn CheckpointStore>) = if jetstream {
        let client = async_nats::connect(testkit::shared_nats().url())
            .await
            .expect("nats");
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
        (Arc::new(log), Arc::new(checkpoints))
    } else {
        (
            Arc::new(
                JsonlLog::open(&dir.path().join("events"), JsonlOptions::default())
                    .await
                    .expect("log"),
            ),
            Arc::new(FileCheckpointStore::open(&dir.path().join("cp")).expect("cp")),
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
    let vault = vault::Vault::new(
        Arc::new(vault::FileStore::open(dir.path().join("vault")).expect("vault")),
        keys,
    );
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
        _dir: dir,
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
        let query = location.split_once('?').expect("query").1;
        let callback = self
            .client
            .get(format!("{}/oauth/callback?{query}", self.url))
            .send()
            .await
            .expect("callback");
        assert_eq!(callback.status(), 200);
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
                },
            )
            .await
            .expect("invoke");
        assert_eq!(report.outcome, invoker::Outcome::Completed, "{report:?}");
    }
}

async fn measure<F, Fut>(call: F) -> Figures
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    for n in 0..100 {
        call(usize::MAX - n).await;
    }
    let mut latencies = Vec::with_capacity(SEQUENTIAL);
    for n in 0..SEQUENTIAL {
        let begun = Instant::now();
        call(n).await;
        latencies.push(begun.elapsed());
    }
    latencies.sort();
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..IN_FLIGHT {
        let call = call.clone();
        workers.push(tokio::spawn(async move {
            for n in 0..PARALLEL / IN_FLIGHT {
                call(SEQUENTIAL + worker * PARALLEL + n).await;
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    Figures {
        p50: latencies[latencies.len() / 2],
        p99: latencies[latencies.len() * 99 / 100],
        per_second: (PARALLEL / IN_FLIGHT * IN_FLIGHT) as f64 / started.elapsed().as_secs_f64(),
    }
}

async fn through_switchboard(setup: Arc<Setup>, run: &'static str) -> Figures {
    measure(move |n| {
        let setup = setup.clone();
        async move { setup.invoke(format!("{run}_{n}")).await }
    })
    .await
}

/// 100,000 past invocations of the user, appended straight to the log.
async fn write_history(setup: &Setup) {
    let log = setup.state.log.clone();
    let envelopes = EnvelopeBuilder::new(Arc::new(SystemClock));
    let user = domain::UserId::parse(USER).expect("user");
    let mut workers = Vec::new();
    for worker in 0..IN_FLIGHT {
        let (log, envelopes, user) = (log.clone(), envelopes.clone(), user.clone());
        workers.push(tokio::spawn(async move {
            for n in (worker..HISTORY).step_by(IN_FLIGHT) {
                let id = domain::InvocationId::parse(&format!("past_{n}")).expect("id");
                let subject =
                    Subject::parse(&domain::invocation::subject(&user, &id)).expect("subject");
                let event = proto::v1::envelope::Event::InvocationRequested(
                    proto::v1::InvocationRequested {
                        invocation_id: id.to_string(),
                        user_id: USER.to_owned(),
                        exposed_tool_name: "bench__create_issue".to_owned(),
                        ..Default::default()
                    },
                );
                let wrapped = envelopes.wrap(&CommandContext::service("bench"), vec![event]);
                log.append(&subject, ExpectedVersion::NoEvents, &wrapped)
                    .await
                    .expect("append");
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
}

fn show(name: &str, figures: Figures, direct: Figures) {
    println!(
        "{name:<34} p50 {:>8.3} ms  p99 {:>8.3} ms  added p50 {:>7.3} ms  p99 {:>7.3} ms  {:>8.0}/s at {IN_FLIGHT} in flight ({:.2}× direct)",
        figures.p50.as_secs_f64() * 1e3,
        figures.p99.as_secs_f64() * 1e3,
        (figures.p50.as_secs_f64() - direct.p50.as_secs_f64()) * 1e3,
        (figures.p99.as_secs_f64() - direct.p99.as_secs_f64()) * 1e3,
        figures.per_second,
        figures.per_second / direct.per_second,
    );
}

fn main() {
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
        let direct = measure({
            let session = session.clone();
            move |_| {
                let session = session.clone();
                async move {
                    let arguments = serde_json::from_value(json!({"title": "Bench"})).expect("args");
                    let result = session.call_tool("create_issue", arguments).await.expect("call");
                    assert_ne!(result.is_error, Some(true));
                }
            }
        })
        .await;
        let on_jsonl = through_switchboard(jsonl.clone(), "jsonl").await;

        let jetstream = Arc::new(setup(true).await);
        jetstream.connect().await;
        let on_jetstream = through_switchboard(jetstream.clone(), "js").await;
        let begun = Instant::now();
        write_history(&jetstream).await;
        eprintln!("wrote {HISTORY} past invocations in {:.1} s", begun.elapsed().as_secs_f64());
        let with_history = through_switchboard(jetstream.clone(), "js_history").await;

        println!(
            "(a) direct rmcp client             p50 {:>8.3} ms  p99 {:>8.3} ms  {:>8.0}/s at {IN_FLIGHT} in flight",
            direct.p50.as_secs_f64() * 1e3,
            direct.p99.as_secs_f64() * 1e3,
            direct.per_second
        );
        show("(b) Switchboard, JSONL log", on_jsonl, direct);
        show("(c) Switchboard, JetStream", on_jetstream, direct);
        show("(d) (c), 100,000 past invocations", with_history, direct);
    });
}
