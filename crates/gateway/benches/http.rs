//! The HTTP layer's cost: sign-in (HS256 JWT), the permission check, request ids, metrics and
//! JSON on a trivial authenticated GET (`/api/v1/me`), against a bare axum handler returning
//! the same JSON on the same server stack, in the same run. 64 requests in flight over
//! loopback; p50, p99 and throughput for each, three rounds alternating.
//!
//! `cargo bench -p gateway --bench http`
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Router, routing::get};
use eventlog::{
    jsonl::{JsonlLog, JsonlOptions},
    projection::{CheckpointPolicy, FileCheckpointStore},
};
use gateway::{
    AppParts, AppState, Authenticator, GatewaySettings, Metrics, RoleTable,
    auth::{AuthSettings, TokenRequest, VerificationKeys, mint_token},
};
use service_kit::{EnvelopeBuilder, ReadModels, SystemClock};
use tokio_util::sync::CancellationToken;

const IN_FLIGHT: usize = 64;
const REQUESTS: usize = 40_000;
const SECRET: &[u8] = b"bench-secret-bench-secret-bench-secret";

struct Figures {
    p50: Duration,
    p99: Duration,
    per_second: f64,
}

async fn load(url: String, token: Option<String>) -> Figures {
    let client = testkit::http_client()
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()
        .expect("client");
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(REQUESTS / IN_FLIGHT);
            for _ in 0..REQUESTS / IN_FLIGHT {
                let begun = Instant::now();
                let mut request = client.get(&url);
                if let Some(token) = &token {
                    request = request.bearer_auth(token);
                }
                let response = request.send().await.expect("request");
                assert_eq!(response.status(), 200);
                let _ = response.bytes().await.expect("body");
                latencies.push(begun.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::with_capacity(REQUESTS);
    for worker in workers {
        latencies.extend(worker.await.expect("worker"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Figures {
        p50: latencies[latencies.len() / 2],
        p99: latencies[latencies.len() * 99 / 100],
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
    }
}

async fn serve(app: Router) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let shutdown = CancellationToken::new();
    tokio::spawn(gateway::server::serve(
        listener,
        app,
        None,
        shutdown.clone(),
        gateway::server::ServeLimits::default(),
    ));
    (url, shutdown)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let log: Arc<dyn eventlog::EventLog> = Arc::new(
            JsonlLog::open(&dir.path().join("events"), JsonlOptions::default())
                .await
                .expect("log"),
        );
        let checkpoints = Arc::new(FileCheckpointStore::open(&dir.path().join("cp")).expect("cp"));
        let read_models = ReadModels::start(log.clone(), checkpoints, CheckpointPolicy::default())
            .await
            .expect("read models");
        let keys = vault::KeyRing::load_or_generate(&dir.path().join("vault.keys")).expect("keys");
        let vault = vault::Vault::new(
            Arc::new(vault::FileStore::open(dir.path().join("vault")).expect("vault")),
            keys,
        );
        let state = AppState::new(AppParts {
            log,
            vault,
            read_models,
            envelopes: EnvelopeBuilder::new(Arc::new(SystemClock)),
            auth: Authenticator::new(AuthSettings {
                keys: VerificationKeys::SharedSecret(SECRET.to_vec()),
                issuer: None,
                audience: None,
                roles_claim: "roles".into(),
                leeway: Duration::from_secs(30),
                roles: RoleTable::defaults(),
            }),
            metrics: Metrics::new(),
            settings: GatewaySettings::default(),
            shutdown: CancellationToken::new(),
            catalog: Arc::new(catalog::Catalog::standard()),
            outbound: mcp::OutboundClient::new(
                mcp::OutboundPolicy::default(),
                Arc::new(mcp::SystemResolver),
            )
            .expect("outbound client"),
            client_metadata_url: None,
            connection_settings: None,
            invoker_settings: None,
        });
        let token = mint_token(
            SECRET,
            &TokenRequest {
                user: "alice@example.com",
                roles: &["analyst".to_owned()],
                ttl: Duration::from_secs(3600),
                issuer: None,
                audience: None,
                roles_claim: "roles",
            },
        )
        .expect("token");
        // Sign-in alone, without HTTP.
        let header = format!("Bearer {token}");
        for _ in 0..2 {
            let begun = Instant::now();
            const CHECKS: u32 = 100_000;
            for _ in 0..CHECKS {
                let caller = state.auth.authenticate(Some(&header)).expect("valid");
                std::hint::black_box(caller);
            }
            println!(
                "sign-in (token check) alone: {:.2} µs per request",
                begun.elapsed().as_secs_f64() * 1e6 / f64::from(CHECKS)
            );
        }
        let (full_url, _full) = serve(gateway::app(state)).await;
        let bare = Router::new().route(
            "/bare",
            get(|| async {
                axum::Json(serde_json::json!({
                    "user": "alice@example.com",
                    "roles": ["analyst"],
                    "permissions": ["view_and_connect"],
                }))
            }),
        );
        let (bare_url, _bare) = serve(bare).await;
        // Warm both up (connections, allocator, caches).
        load(format!("{bare_url}/bare"), None).await;
        load(format!("{full_url}/api/v1/me"), Some(token.clone())).await;
        println!("{IN_FLIGHT} in flight, {REQUESTS} requests per round");
        println!(
            "{:<8} {:<34} {:>9} {:>9} {:>11}",
            "round", "route", "p50 µs", "p99 µs", "req/s"
        );
        for round in 1..=3 {
            let bare = load(format!("{bare_url}/bare"), None).await;
            let full = load(format!("{full_url}/api/v1/me"), Some(token.clone())).await;
            for (name, figures) in [
                ("bare axum handler", &bare),
                ("GET /api/v1/me (JWT, permission)", &full),
            ] {
                println!(
                    "{round:<8} {name:<34} {:>9} {:>9} {:>11.0}",
                    figures.p50.as_micros(),
                    figures.p99.as_micros(),
                    figures.per_second
                );
            }
            println!(
                "{round:<8} {:<34} {:>9} {:>9} {:>10.2}x",
                "added by the API layer",
                full.p50.as_micros() as i128 - bare.p50.as_micros() as i128,
                full.p99.as_micros() as i128 - bare.p99.as_micros() as i128,
                bare.per_second / full.per_second
            );
        }
    });
}
