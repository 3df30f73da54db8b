//! A running API on a fresh store, tokens for it, and helpers to append events and read
//! server-sent events.
use std::{any::Any, sync::Arc, time::Duration};

use eventlog::{
    EventLog, ExpectedVersion, Subject,
    jetstream::{JetStreamConfig, JetStreamLog},
    jsonl::{JsonlLog, JsonlOptions},
    projection::{CheckpointPolicy, CheckpointStore, FileCheckpointStore},
};
use futures_util::StreamExt;
use gateway::{
    AppParts, AppState, Authenticator, GatewaySettings, Metrics, RoleTable,
    auth::{AuthSettings, TokenRequest, VerificationKeys, mint_token},
};
use proto::v1::{Envelope, envelope::Event};
use service_kit::{EnvelopeBuilder, ReadModels, SystemClock};
use tokio_util::sync::CancellationToken;

pub const SECRET: &[u8] = b"test-secret-test-secret-test-secret";

/// How a test app differs from the default.
#[derive(Default)]
pub struct Options {
    pub settings: GatewaySettings,
    pub limits: gateway::server::ServeLimits,
    pub catalog: catalog::Catalog,
    /// Default: no resolvable names and the loopback-only safety net on.
    pub outbound: Option<mcp::OutboundClient>,
    /// Default: the invoker's defaults.
    pub invoker: Option<invoker::InvokerSettings>,
    /// The clock of the events and the services (default: the system's).
    pub clock: Option<Arc<dyn service_kit::Clock>>,
    /// The issuer tokens must name (`auth.issuer`; default: none).
    pub issuer: Option<String>,
    /// The audience tokens must name (`auth.audience`; default: none, not checked).
    pub audience: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Jsonl,
    JetStream,
}

pub const STORES: [Store; 2] = [Store::Jsonl, Store::JetStream];

pub struct TestApp {
    pub url: String,
    pub vault: vault::Vault,
    pub read_models: ReadModels,
    pub client: reqwest::Client,
    pub log: Arc<dyn EventLog>,
    pub envelopes: EnvelopeBuilder,
    /// The policy service's reaction to discovered tools, as `up` runs it.
    pub reaction: policy::DefinitionChanges,
    pub shutdown: CancellationToken,
    pub server: Option<tokio::task::JoinHandle<()>>,
    pub state: AppState,
    /// The vault's KV bucket on JetStream (`None`: a file store in `dir`).
    pub vault_bucket: Option<String>,
    /// Where the JSONL log, checkpoints and vault files are (for the leaked-secret scans).
    pub dir: std::path::PathBuf,
    /// Makes the vault's store fail writes on demand.
    pub vault_faults: Arc<FailingWrites>,
    _guard: Box<dyn Any + Send>,
}

impl TestApp {
    pub async fn start(store: Store) -> TestApp {
        Self::start_with(store, GatewaySettings::default()).await
    }

    pub async fn start_with(store: Store, settings: GatewaySettings) -> TestApp {
        Self::start_with_options(
            store,
            Options {
                settings,
                ..Options::default()
            },
        )
        .await
    }

    pub async fn start_with_options(store: Store, options: Options) -> TestApp {
        let settings = options.settings.clone();
        let dir = tempfile::tempdir().expect("temp dir");
        // On JetStream the vault is a KV bucket of its own, as in a deployment.
        let vault_bucket = match store {
            Store::Jsonl => None,
            Store::JetStream => Some(testkit::unique_name("gwvault")),
        };
        let (log, checkpoints): (Arc<dyn EventLog>, Arc<dyn CheckpointStore>) = match store {
            Store::Jsonl => (
                Arc::new(
                    JsonlLog::open(&dir.path().join("events"), JsonlOptions::default())
                        .await
                        .expect("open JSONL log"),
                ),
                Arc::new(
                    FileCheckpointStore::open(&dir.path().join("checkpoints"))
                        .expect("checkpoints"),
                ),
            ),
            Store::JetStream => {
                let client = async_nats::connect(testkit::shared_nats().url())
                    .await
                    .expect("connect to nats");
                let log = JetStreamLog::connect(
                    client,
                    JetStreamConfig {
                        prefix: testkit::unique_name("gw"),
                        ..JetStreamConfig::default()
                    },
                )
                .await
                .expect("open JetStream log");
                let checkpoints = log.checkpoint_store().await.expect("checkpoint bucket");
                (Arc::new(log), Arc::new(checkpoints))
            }
        };
        let keys = vault::KeyRing::load_or_generate(&dir.path().join("vault.keys")).expect("keys");
        let vault_faults = Arc::new(FailingWrites::new(
            open_vault_store(dir.path(), vault_bucket.as_deref()).await,
        ));
        let vault = vault::Vault::new(vault_faults.clone(), keys);
        let metrics = Metrics::new();
        let log = metrics.metered(log);
        let read_models = ReadModels::start(
            log.clone(),
            checkpoints.clone(),
            CheckpointPolicy::default(),
        )
        .await
        .expect("read models");
        let envelopes =
            EnvelopeBuilder::new(options.clock.unwrap_or_else(|| Arc::new(SystemClock)));
        let reaction =
            policy::DefinitionChanges::start(log.clone(), checkpoints, envelopes.clone())
                .await
                .expect("policy reaction");
        let custom = vec!["read_audit_log".to_owned()];
        let roles = RoleTable::with_custom([("auditor", custom.as_slice())]).expect("roles");
        let auth = Authenticator::new(AuthSettings {
            keys: VerificationKeys::SharedSecret(SECRET.to_vec()),
            issuer: options.issuer,
            audience: options.audience,
            roles_claim: "roles".into(),
            leeway: Duration::from_secs(5),
            roles,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let shutdown = CancellationToken::new();
        let state = AppState::new(AppParts {
            log: log.clone(),
            vault: vault.clone(),
            read_models: read_models.clone(),
            envelopes: envelopes.clone(),
            auth,
            metrics,
            settings: GatewaySettings {
                public_url: url.clone(),
                ..settings
            },
            shutdown: shutdown.clone(),
            catalog: Arc::new(options.catalog),
            outbound: options.outbound.unwrap_or_else(|| {
                mcp::OutboundClient::new(
                    mcp::OutboundPolicy {
                        loopback_only_safety_net: true,
                        ..mcp::OutboundPolicy::default()
                    },
                    Arc::new(mcp::StaticResolver::new()),
                )
                .expect("outbound client")
            }),
            client_metadata_url: None,
            connection_settings: None,
            invoker_settings: options.invoker,
        });
        // The invoker's sweeper, as `up` runs it (expired approvals, stalled invocations).
        tokio::spawn({
            let invoker = state.invoker.clone();
            let shutdown = shutdown.clone();
            async move { invoker.run_sweeper(shutdown).await }
        });
        // Whose usable tools change, as `up` watches them.
        let watch = invoker::ToolListWatch::start(&state.invoker)
            .await
            .expect("tool-list watch");
        tokio::spawn(watch.run(shutdown.clone()));
        let server = tokio::spawn(gateway::server::serve(
            listener,
            gateway::app(state.clone()),
            None,
            shutdown.clone(),
            options.limits,
        ));
        TestApp {
            url,
            vault,
            vault_faults,
            read_models,
            client: testkit::http_client().build().expect("client"),
            log,
            envelopes,
            reaction,
            shutdown,
            server: Some(server),
            state,
            vault_bucket,
            dir: dir.path().to_owned(),
            _guard: Box::new(dir),
        }
    }

    pub fn token(&self, user: &str, roles: &[&str]) -> String {
        token_for(user, roles, SECRET)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("request")
    }

    /// Adds a server by appending its `ServerAdded` (as an admin's add would) and waits until
    /// the read models show it; returns its id.
    pub async fn seed_server(&self, name: &str) -> String {
        let id = domain::ServerId::new().to_string();
        let slug = domain::ServerName::parse(name)
            .expect("name")
            .slug()
            .as_str()
            .to_owned();
        let position = self
            .append(
                &format!("server.{id}"),
                Event::ServerAdded(proto::v1::ServerAdded {
                    server_id: id.clone(),
                    name: name.to_owned(),
                    slug,
                    description: "Issues of the platform team".into(),
                    url: "https://mcp.example.com/mcp".into(),
                    catalog_entry_id: String::new(),
                    oauth: None,
                    enabled: true,
                }),
            )
            .await;
        assert!(
            self.read_models
                .wait_for_position(eventlog::LogKind::Config, position, Duration::from_secs(10))
                .await,
            "the read models never showed the seeded server"
        );
        id
    }

    /// Runs one connection command for `user` on `server` through the domain's connection
    /// rules (the connection service's part), then waits until the policy reaction and the
    /// read models have seen everything stored.
    pub async fn connection(
        &self,
        user: &str,
        server: &str,
        command: domain::connection::ConnectionCommand,
    ) {
        let user = domain::UserId::parse(user).expect("user");
        let server = domain::ServerId::parse(server).expect("server");
        let id = domain::connection::ConnectionId {
            server_id: server,
            user_id: user.clone(),
        };
        let subject = Subject::parse(&id.subject()).expect("subject");
        let now = std::time::SystemTime::now();
        service_kit::execute::<domain::connection::ConnectionState, _>(
            self.log.as_ref(),
            &self.envelopes,
            &subject,
            &service_kit::CommandContext::reaction("connection", &Envelope::default()),
            |state| domain::connection::decide(state, &id, command.clone(), now),
        )
        .await
        .expect("connection command");
        self.settle().await;
    }

    /// `user` connects to `server`, which offers them `tools`.
    pub async fn connect(&self, user: &str, server: &str, tools: &[proto::v1::ToolDefinition]) {
        use domain::connection::ConnectionCommand;
        self.connection(
            user,
            server,
            ConnectionCommand::StartConnection {
                flow: "flow".to_owned(),
                requested_scopes: vec![],
                authorization_expires_at: std::time::SystemTime::now() + Duration::from_secs(600),
            },
        )
        .await;
        self.connection(
            user,
            server,
            ConnectionCommand::CompleteAuthorization {
                flow: "flow".to_owned(),
                granted_scopes: vec![],
                access_token_expires_at: None,
                token_fingerprint: domain::TokenFingerprint::of(&format!("token of {user}")),
                has_refresh_token: false,
            },
        )
        .await;
        self.discover(user, server, tools).await;
    }

    /// The server's tool list for `user` is now `tools`.
    pub async fn discover(&self, user: &str, server: &str, tools: &[proto::v1::ToolDefinition]) {
        self.connection(
            user,
            server,
            domain::connection::ConnectionCommand::RecordDiscoveredTools {
                tools: tools.to_vec(),
            },
        )
        .await;
    }

    /// Waits until the policy reaction has handled everything stored and the read models show
    /// what it wrote.
    pub async fn settle(&self) {
        let end = self
            .log
            .last_sequence(eventlog::LogKind::Config)
            .await
            .expect("end");
        tokio::time::timeout(Duration::from_secs(10), self.reaction.wait_for(end))
            .await
            .expect("the policy reaction caught up");
        let end = self
            .log
            .last_sequence(eventlog::LogKind::Config)
            .await
            .expect("end");
        assert!(
            self.read_models
                .wait_for_position(eventlog::LogKind::Config, end, Duration::from_secs(10))
                .await,
            "the read models caught up"
        );
    }

    /// A server with an OAuth client at a (never contacted) authorization server: enough to
    /// start connecting, which builds the authorization URL without a request.
    pub async fn seed_registered_server(&self, name: &str) -> String {
        let id = self.seed_server(name).await;
        let position = self
            .append(
                &format!("server.{id}"),
                Event::ServerClientRegistered(proto::v1::ServerClientRegistered {
                    server_id: id.clone(),
                    registration_mode: proto::v1::RegistrationMode::Dynamic as i32,
                    client_id: "seeded-client".into(),
                    authorization_server: Some(proto::v1::AuthorizationServerMetadata {
                        issuer: "https://auth.example.com".into(),
                        authorization_endpoint: "https://auth.example.com/authorize".into(),
                        token_endpoint: "https://auth.example.com/token".into(),
                        code_challenge_methods_supported: vec!["S256".into()],
                        ..Default::default()
                    }),
                    resource: "https://mcp.example.com/mcp".into(),
                    token_endpoint_auth_method: "none".into(),
                    ..Default::default()
                }),
            )
            .await;
        assert!(
            self.read_models
                .wait_for_position(eventlog::LogKind::Config, position, Duration::from_secs(10))
                .await
        );
        id
    }

    /// Appends one event to `subject`; returns its log position.
    pub async fn append(&self, subject: &str, event: Event) -> u64 {
        let subject = Subject::parse(subject).expect("subject");
        self.log
            .append(&subject, ExpectedVersion::Any, &[envelope(event)])
            .await
            .expect("append")
            .last_sequence
    }
}

/// The vault's store: a JetStream KV bucket (over a NATS connection of its own, as another
/// process would have), or the file store in `dir`.
pub async fn open_vault_store(
    dir: &std::path::Path,
    bucket: Option<&str>,
) -> Arc<dyn vault::SecretStore> {
    match bucket {
        Some(bucket) => {
            let client = async_nats::connect(testkit::shared_nats().url())
                .await
                .expect("connect to nats");
            Arc::new(
                vault::KvStore::open(async_nats::jetstream::new(client), bucket)
                    .await
                    .expect("vault bucket"),
            )
        }
        None => Arc::new(vault::FileStore::open(dir.join("vault")).expect("vault")),
    }
}

/// A vault store that fails the next writes of entries under a prefix, as the store itself
/// fails them (a full disk, NATS away), before they reach it: a deliberately broken store
/// over the real one.
#[derive(Debug)]
pub struct FailingWrites {
    store: Arc<dyn vault::SecretStore>,
    /// The entries' prefix, how many more of their writes fail, and whether they fail only
    /// after they were stored (an answer lost on its way back).
    failing: std::sync::Mutex<(String, usize, bool)>,
    failed: std::sync::atomic::AtomicUsize,
    /// The next write of entries with this prefix waits for the test (a slow store).
    held: std::sync::Mutex<Option<(String, Arc<HeldWrite>)>>,
}

/// A write the store holds: `reached` when it arrives, then it waits for `release`.
#[derive(Debug, Default)]
pub struct HeldWrite {
    pub reached: tokio::sync::Notify,
    pub release: tokio::sync::Notify,
}

impl FailingWrites {
    fn new(store: Arc<dyn vault::SecretStore>) -> Self {
        FailingWrites {
            store,
            failing: std::sync::Mutex::new((String::new(), 0, false)),
            failed: std::sync::atomic::AtomicUsize::new(0),
            held: std::sync::Mutex::new(None),
        }
    }

    /// The next write of an entry whose name starts with `prefix` waits until the test
    /// releases it (then goes through).
    pub fn hold_next_write(&self, prefix: &str) -> Arc<HeldWrite> {
        let held = Arc::new(HeldWrite::default());
        *self.held.lock().expect("lock") = Some((prefix.to_owned(), held.clone()));
        held
    }

    /// The next `count` writes of entries whose name starts with `prefix` fail.
    pub fn fail_next_writes(&self, prefix: &str, count: usize) {
        *self.failing.lock().expect("lock") = (prefix.to_owned(), count, false);
    }

    /// The next `count` writes of entries whose name starts with `prefix` are stored, but
    /// reported as failed.
    pub fn lose_next_answers(&self, prefix: &str, count: usize) {
        *self.failing.lock().expect("lock") = (prefix.to_owned(), count, true);
    }

    /// How many writes failed so far.
    pub fn failed(&self) -> usize {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Writes through `write`, unless this write is to fail.
    async fn write<T>(
        &self,
        name: &vault::SecretName,
        write: impl Future<Output = Result<T, vault::StoreError>>,
    ) -> Result<T, vault::StoreError> {
        let held = {
            let mut held = self.held.lock().expect("lock");
            match held.as_ref() {
                Some((prefix, _)) if name.as_str().starts_with(prefix.as_str()) => held.take(),
                _ => None,
            }
        };
        if let Some((_, held)) = held {
            held.reached.notify_one();
            held.release.notified().await;
        }
        let after_storing = {
            let mut failing = self.failing.lock().expect("lock");
            if failing.1 == 0 || !name.as_str().starts_with(failing.0.as_str()) {
                None
            } else {
                failing.1 -= 1;
                Some(failing.2)
            }
        };
        let Some(after_storing) = after_storing else {
            return write.await;
        };
        if after_storing {
            write.await?;
        }
        self.failed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err(vault::StoreError::Backend {
            operation: "writing the entry",
            source: "the test's store fails this write".into(),
        })
    }
}

#[async_trait::async_trait]
impl vault::SecretStore for FailingWrites {
    async fn get(
        &self,
        name: &vault::SecretName,
    ) -> Result<Option<vault::StoredValue>, vault::StoreError> {
        self.store.get(name).await
    }

    async fn put(
        &self,
        name: &vault::SecretName,
        value: bytes::Bytes,
    ) -> Result<vault::Revision, vault::StoreError> {
        self.write(name, self.store.put(name, value)).await
    }

    async fn create(
        &self,
        name: &vault::SecretName,
        value: bytes::Bytes,
        ttl: Option<Duration>,
    ) -> Result<vault::Revision, vault::StoreError> {
        self.write(name, self.store.create(name, value, ttl)).await
    }

    async fn update(
        &self,
        name: &vault::SecretName,
        value: bytes::Bytes,
        expected: vault::Revision,
        ttl: Option<Duration>,
    ) -> Result<vault::Revision, vault::StoreError> {
        self.write(name, self.store.update(name, value, expected, ttl))
            .await
    }

    async fn delete(
        &self,
        name: &vault::SecretName,
        expected: Option<vault::Revision>,
    ) -> Result<(), vault::StoreError> {
        self.store.delete(name, expected).await
    }

    async fn names(&self) -> Result<Vec<vault::SecretName>, vault::StoreError> {
        self.store.names().await
    }

    async fn unreadable(&self) -> Result<Vec<String>, vault::StoreError> {
        self.store.unreadable().await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An OAuth/MCP fixture over HTTPS at `fixture.test` (mapped to loopback by the app's
/// resolver), and an app whose outbound client trusts it. `private.test` resolves to a private
/// address; the loopback-only safety net is on.
pub struct WithFixture {
    pub app: TestApp,
    pub fixture_url: String,
    /// The fixture's levers and counters.
    pub handle: testkit::FixtureHandle,
    /// A browser of sorts: trusts the test CA, resolves the fixture's names, follows no
    /// redirects.
    pub browser: reqwest::Client,
    /// The app's outbound client (what it remembers of servers included).
    pub outbound: mcp::OutboundClient,
    _server: testkit::FixtureServer,
}

pub async fn app_with_fixture(store: Store, fixture: testkit::OAuthFixture) -> WithFixture {
    app_with_fixture_for(store, fixture, "notion").await
}

/// Like [`app_with_fixture`], with the catalog's `template` pointed at the fixture.
pub async fn app_with_fixture_for(
    store: Store,
    fixture: testkit::OAuthFixture,
    template: &str,
) -> WithFixture {
    app_with_fixture_and(store, fixture, template, None).await
}

/// Like [`app_with_fixture_for`], with the invoker's settings.
pub async fn app_with_fixture_and(
    store: Store,
    fixture: testkit::OAuthFixture,
    template: &str,
    invoker: Option<invoker::InvokerSettings>,
) -> WithFixture {
    app_with_fixture_clocked(store, fixture, template, invoker, None).await
}

/// [`app_with_fixture_and`] with the app on `clock`.
pub async fn app_with_fixture_clocked(
    store: Store,
    fixture: testkit::OAuthFixture,
    template: &str,
    invoker: Option<invoker::InvokerSettings>,
    clock: Option<Arc<dyn service_kit::Clock>>,
) -> WithFixture {
    let ca = testkit::TestCa::new();
    let (router, handle) = fixture.start();
    let server =
        testkit::serve_https(router, &ca.issue(&["fixture.test", "alt.fixture.test"])).await;
    let browser = testkit::http_client()
        .tls_certs_only(
            reqwest::Certificate::from_pem_bundle(ca.cert_pem().as_bytes()).expect("CA"),
        )
        .resolve("fixture.test", server.address)
        .resolve("alt.fixture.test", server.address)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("browser");
    let fixture_url = format!("{}/mcp", server.https_url("fixture.test"));
    let resolver = mcp::StaticResolver::new()
        .with("fixture.test", &["127.0.0.1".parse().expect("address")])
        .with("alt.fixture.test", &["127.0.0.1".parse().expect("address")])
        .with("private.test", &["10.11.12.13".parse().expect("address")]);
    let outbound = mcp::OutboundClient::new(
        mcp::OutboundPolicy {
            allow_loopback: true,
            extra_ca_pem: vec![ca.cert_pem().to_owned()],
            request_timeout: Duration::from_secs(5),
            loopback_only_safety_net: true,
            ..mcp::OutboundPolicy::default()
        },
        Arc::new(resolver),
    )
    .expect("outbound client");
    let app = TestApp::start_with_options(
        store,
        Options {
            catalog: catalog::Catalog::with_urls([(template, fixture_url.clone())]),
            outbound: Some(outbound.clone()),
            invoker,
            clock,
            ..Options::default()
        },
    )
    .await;
    WithFixture {
        app,
        fixture_url,
        handle,
        browser,
        outbound,
        _server: server,
    }
}

pub fn token_for(user: &str, roles: &[&str], secret: &[u8]) -> String {
    let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
    mint_token(
        secret,
        &TokenRequest {
            user,
            roles: &roles,
            ttl: Duration::from_secs(600),
            issuer: None,
            audience: None,
            roles_claim: "roles",
        },
    )
    .expect("token")
}

/// A token that expired an hour ago (well past the leeway).
pub fn expired_token(user: &str, roles: &[&str]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims =
        serde_json::json!({"sub": user, "roles": roles, "exp": now - 3600, "iat": now - 7200});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .expect("token")
}

pub fn envelope(event: Event) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::now_v7().to_string(),
        occurred_at: Some(domain::time::to_timestamp(std::time::SystemTime::now())),
        actor: None,
        correlation_id: String::new(),
        causation_id: String::new(),
        schema_version: proto::SCHEMA_VERSION,
        write_id: String::new(),
        event: Some(event),
    }
}

pub fn server_enabled(server_id: &str) -> Event {
    Event::ServerEnabled(proto::v1::ServerEnabled {
        server_id: server_id.to_owned(),
    })
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: String,
    pub event: String,
    pub data: serde_json::Value,
}

/// Reads server-sent events from a response, one at a time.
pub struct SseReader {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200, "stream refused");
        SseReader {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        }
    }

    /// The next event (comments skipped), or `None` when the stream ends. Fails the test
    /// after 10 s without one.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent {
                    id: String::new(),
                    event: String::new(),
                    data: serde_json::Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("id:") {
                        event.id = value.trim().to_owned();
                    } else if let Some(value) = line.strip_prefix("event:") {
                        event.event = value.trim().to_owned();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                event.data = serde_json::from_str(&data).expect("event data is JSON");
                return Some(event);
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.body.next())
                .await
                .expect("no server-sent event within 10 s");
            match chunk {
                Some(Ok(bytes)) => self
                    .buffer
                    .push_str(std::str::from_utf8(&bytes).expect("UTF-8")),
                Some(Err(_)) | None => return None,
            }
        }
    }
}

/// A tool definition as a server reports it, with its definition hash.
pub fn tool(name: &str, description: &str, read_only: Option<bool>) -> proto::v1::ToolDefinition {
    let mut definition = proto::v1::ToolDefinition {
        name: name.into(),
        title: format!("{name} title"),
        description: description.into(),
        input_schema_json: r#"{"type":"object"}"#.into(),
        annotations: read_only.map(|hint| proto::v1::ToolAnnotations {
            read_only_hint: Some(hint),
            ..Default::default()
        }),
        ..Default::default()
    };
    definition.definition_hash = domain::tool_definition_hash(&definition);
    definition
}
