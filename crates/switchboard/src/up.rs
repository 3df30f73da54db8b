//! `switchboard up`: opens the stores, starts the read models and serves the HTTP API until
//! Ctrl-C or SIGTERM; then stops accepting, lets in-flight requests finish (bounded; the
//! orchestrator's NATS requests too), hands the results it holds over, ends
//! live-update streams, saves checkpoints and closes the logs. SIGHUP reloads the vault's
//! master keys and re-encrypts every entry under the current one while the process keeps
//! serving (how `vault rotate` reaches a running embedded instance, whose vault directory only
//! this process may open).
use std::{sync::Arc, time::Duration};

use anyhow::Context;
use eventlog::projection::CheckpointPolicy;
use gateway::{
    AppParts, AppState, Authenticator, GatewaySettings, Metrics, RoleTable,
    auth::{AuthSettings, VerificationKeys},
};
use service_kit::{EnvelopeBuilder, ReadModels, SystemClock};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use vault::{KeyRing, Vault};

use crate::{
    cli::UpArgs,
    configuration::{Settings, StoreOptions},
    token::{SharedSecret, shared_secret},
};

/// `up`'s own flags win over the file and the environment.
pub fn apply_flags(settings: &mut Settings, args: &UpArgs) {
    if let Some(listen) = &args.listen {
        settings.listen.clone_from(listen);
    }
    if let Some(url) = &args.public_url {
        settings.public_url = Some(url.clone());
    }
    if let Some(cert) = &args.tls_cert {
        settings.tls.cert_file = Some(cert.clone());
    }
    if let Some(key) = &args.tls_key {
        settings.tls.key_file = Some(key.clone());
    }
}

/// How tokens are verified, from the settings; the shared secret too when there is one (so
/// `up` can say how to mint a token with it).
fn authenticator(settings: &Settings) -> anyhow::Result<(Authenticator, Option<SharedSecret>)> {
    let secret = shared_secret(settings, true)?;
    let keys = match (&secret, &settings.auth.jwks_file) {
        (Some(secret), _) => VerificationKeys::SharedSecret(secret.bytes.clone()),
        (None, Some(file)) => {
            VerificationKeys::from_jwks_file(file).map_err(|e| anyhow::anyhow!(e))?
        }
        (None, None) => anyhow::bail!("no way to verify tokens is configured"),
    };
    let roles = RoleTable::with_custom(
        settings
            .roles
            .iter()
            .map(|(name, role)| (name.as_str(), role.permissions.as_slice())),
    )
    .map_err(|e| anyhow::anyhow!("roles: {e}"))?;
    let auth = Authenticator::new(AuthSettings {
        keys,
        issuer: settings.auth.issuer.clone(),
        audience: settings.auth.audience.clone(),
        roles_claim: settings.auth.roles_claim.clone(),
        leeway: Duration::from_secs(settings.auth.leeway_secs),
        roles,
    });
    Ok((auth, secret))
}

pub async fn run(settings: Settings, demo: bool) -> anyhow::Result<()> {
    // Listen for signals before anything else: a SIGTERM that arrives while starting must
    // shut down gracefully, not kill the process with its default action.
    let signals = Signals::listen()?;
    let store = settings.store();
    let (auth, secret) = authenticator(&settings)?;
    let read_model_settings = settings.invocations.read_model_settings()?;
    let tls = match (&settings.tls.cert_file, &settings.tls.key_file) {
        (Some(cert), Some(key)) => Some(gateway::server::tls_acceptor(cert, key)?),
        (None, None) => None,
        _ => anyhow::bail!("tls.cert_file and tls.key_file go together"),
    };
    // One connection for both stores on JetStream.
    let nats = store.connect_nats().await?;
    let stores = store.open_stores(nats.as_ref()).await?;
    let metrics = Metrics::new();
    let log = metrics.metered(stores.log.clone());
    let vault = crate::vault_cmd::open_vault(&store, nats.as_ref(), true).await?;
    // The demo servers come first: the outbound guard and the catalog are built with their
    // addresses.
    let demo = if demo {
        Some(crate::demo_cmd::start(&settings).await?)
    } else {
        None
    };
    let read_models = ReadModels::start_with(
        log.clone(),
        stores.checkpoints.clone(),
        CheckpointPolicy::default(),
        read_model_settings,
    )
    .await
    .context("starting the read models")?;
    let envelopes = EnvelopeBuilder::new(Arc::new(SystemClock));
    // Every `up` runs the reaction: two processes reacting to one event record its change once
    // (the second decision finds nothing to do), so no leader is needed.
    let policy_reaction = policy::DefinitionChanges::start(
        log.clone(),
        stores.checkpoints.clone(),
        envelopes.clone(),
    )
    .await
    .context("starting the policy reaction")?;

    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let local = listener
        .local_addr()
        .context("reading the listen address")?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let public_url = settings.public_url.clone().unwrap_or_else(|| {
        if local.ip().is_unspecified() {
            // Every server added now registers `<public URL>/oauth/callback/…` with its provider.
            tracing::warn!(
                "listening on {local} without a public URL: OAuth redirects would name \
                 {scheme}://{local}, which no browser can reach; set --public-url \
                 (SWITCHBOARD_PUBLIC_URL) to the address users reach Switchboard at"
            );
        }
        format!("{scheme}://{local}")
    });
    let shutdown = CancellationToken::new();
    let outbound = mcp::OutboundClient::new(
        mcp::OutboundPolicy {
            allow_loopback: settings.outbound.allow_loopback,
            extra_ca_file: settings.outbound.extra_ca_file.clone(),
            allowed_exceptions: demo
                .as_ref()
                .map(|demo| demo.addresses().to_vec())
                .unwrap_or_default(),
            ..mcp::OutboundPolicy::default()
        },
        Arc::new(mcp::SystemResolver),
    )
    .context("setting up the outbound HTTP client")?;
    let state = AppState::new(AppParts {
        log: log.clone(),
        vault: vault.clone(),
        read_models: read_models.clone(),
        envelopes,
        auth,
        metrics: metrics.clone(),
        settings: GatewaySettings {
            public_url: public_url.clone(),
            body_limit: settings.http.body_limit,
            stream_buffer: settings.http.stream_buffer,
            console_url: settings.console.url.clone(),
            mcp_approval_prompts: settings.invocations.mcp_approval_prompts,
            ..GatewaySettings::default()
        },
        shutdown: shutdown.clone(),
        catalog: Arc::new(match &demo {
            Some(demo) => catalog::Catalog::with_demo(demo.mcp_url().to_owned()),
            None => catalog::Catalog::standard(),
        }),
        outbound,
        client_metadata_url: settings.oauth.client_metadata_url.clone(),
        connection_settings: None,
        invoker_settings: Some(settings.invocations.invoker_settings()),
    });
    // The connection service's own work: a deleted server's users disconnected (from its
    // checkpoint, so a restart finishes a cascade), health probes, the `state` sweep.
    let connections = state.connections.clone();
    let reaction = {
        let (connections, checkpoints, shutdown) = (
            connections.clone(),
            stores.checkpoints.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            if let Err(error) = connections
                .run_server_deleted_reaction(checkpoints, shutdown, None)
                .await
            {
                tracing::error!(
                    code = error.code(),
                    "the server-deleted reaction stopped: {error}"
                );
            }
        })
    };
    let monitor = {
        let (connections, shutdown) = (connections.clone(), shutdown.clone());
        tokio::spawn(async move { connections.run_health_monitor(shutdown).await })
    };
    // The invoker's sweeper: approvals nobody answered in time, invocations a stopped
    // process left behind.
    let sweeper = {
        let (invoker, shutdown) = (state.invoker.clone(), shutdown.clone());
        tokio::spawn(async move { invoker.run_sweeper(shutdown).await })
    };
    // Whose usable tools change: announced on NATS, streamed over HTTP.
    let tool_list_watch = {
        let watch = invoker::ToolListWatch::start(&state.invoker)
            .await
            .map_err(|e| anyhow::anyhow!("watching the users' tool lists: {e}"))?;
        let shutdown = shutdown.clone();
        tokio::spawn(async move { watch.run(shutdown).await })
    };
    // Kept to hand its results over when the process stops.
    let invoker = state.invoker.clone();
    // Cancelled once the HTTP server has let its requests finish: until then an approval
    // given over HTTP may finish an invocation whose outcome goes out on NATS.
    let http_stopped = CancellationToken::new();
    // On JetStream the orchestrator's protocol is also served on NATS, in a queue group.
    let orchestrator = match &nats {
        Some(client) => {
            let service = invoker::nats::NatsService::start(
                state.invoker.clone(),
                client,
                store.nats_prefix(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("starting the NATS invoker service: {e}"))?;
            let stop = invoker::nats::Stop {
                taking_requests: shutdown.clone(),
                others_done: http_stopped.clone(),
                grace: settings.shutdown_grace(),
            };
            Some(tokio::spawn(async move { service.run(stop).await }))
        }
        None => None,
    };
    let listeners = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { connections.run_tool_list_listeners(shutdown).await })
    };
    let demo_state = demo.as_ref().map(|_| state.clone());
    let server = tokio::spawn(gateway::server::serve(
        listener,
        gateway::app(state),
        tls,
        shutdown.clone(),
        gateway::server::ServeLimits {
            grace: settings.shutdown_grace(),
            ..gateway::server::ServeLimits::default()
        },
    ));

    // Added before "stores open" is logged, so whoever waits for that line finds the demo
    // server in the list.
    if let (Some(demo), Some(state)) = (&demo, &demo_state) {
        crate::demo_cmd::add_server_once(state, demo).await;
        // A closed standard output loses the hints, never the running instance.
        if let Err(error) =
            crate::demo_cmd::print_next_steps(&settings, secret.as_ref(), &public_url, demo)
        {
            tracing::warn!("the demo's next steps were not printed: {error:#}");
        }
    }
    drop(demo_state);

    match store.nats_display() {
        Some(url) => {
            tracing::info!(%url, prefix = %store.nats_prefix(), "switchboard is up on JetStream")
        }
        None => {
            tracing::info!(data_dir = %store.data_dir.display(), "switchboard is up on the embedded default")
        }
    }
    let positions: Vec<String> = read_models
        .statuses()
        .iter()
        .map(|s| format!("{}@{}:{}", s.name, s.log, s.position))
        .collect();
    tracing::info!(
        pid = std::process::id(),
        read_models = %positions.join(", "),
        "stores open; Ctrl-C or SIGTERM stops, SIGHUP reloads the vault keys and re-encrypts"
    );
    if let Some(SharedSecret {
        generated: Some(path),
        ..
    }) = &secret
    {
        tracing::warn!(
            secret_file = %path.display(),
            "generated a JWT signing secret for this data directory; mint a token with \
             `switchboard --data-dir {} token --user you@example.com --role admin`",
            store.data_dir.display()
        );
    }
    tracing::info!(listen = %local, public_url = %public_url, "listening on {scheme}://{local}");

    signals.wait(&store, &vault).await?;

    tracing::info!("shutting down: no new requests; letting in-flight ones finish");
    shutdown.cancel();
    invoker.stop_waiting();
    if let Err(error) = server.await {
        tracing::error!(%error, "the HTTP server task failed");
    }
    http_stopped.cancel();
    let _ = tokio::join!(reaction, monitor, listeners, sweeper, tool_list_watch);
    if let Some(orchestrator) = orchestrator {
        let _ = orchestrator.await;
    }
    let (started, answered) = metrics.request_counts();
    tracing::info!(
        started,
        answered,
        "HTTP server stopped: requests started {started}, answered {answered}"
    );
    // Requests have stopped: the results only this process holds go to the vault, for
    // look-ups after the restart or on another process.
    invoker.hand_over_results(RESULT_HANDOVER_LIMIT).await;
    drop(invoker);
    policy_reaction.shutdown().await;
    if let Err(error) = read_models.shutdown().await {
        tracing::warn!(%error, "checkpoints not saved; the next start replays a little more");
    }
    if let Some(jsonl) = &stores.jsonl {
        jsonl.close().await;
    }
    if let Some(client) = nats {
        let _ = client.flush().await;
    }
    if let Some(demo) = demo {
        demo.stop().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The longest a stop waits for the results it holds to reach the vault.
const RESULT_HANDOVER_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> anyhow::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("listening for Ctrl-C")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            hangup: signal(SignalKind::hangup()).context("listening for SIGHUP")?,
        })
    }

    /// Returns on Ctrl-C or SIGTERM; SIGHUP reloads the vault keys meanwhile.
    async fn wait(mut self, store: &StoreOptions, vault: &Vault) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                _ = self.interrupt.recv() => return Ok(()),
                _ = self.terminate.recv() => return Ok(()),
                _ = self.hangup.recv() => reload_keys_and_rotate(store, vault).await,
            }
        }
    }
}

/// Loads the master keys again and re-encrypts every entry not sealed under the current key.
/// A failure is logged and leaves the running vault on the keys it had.
async fn reload_keys_and_rotate(store: &StoreOptions, vault: &Vault) {
    let keys = match KeyRing::load_from_env_or_file(&store.key_file()) {
        Ok(keys) => keys,
        Err(error) => {
            tracing::error!(%error, "vault keys not reloaded; still using the previous keys");
            return;
        }
    };
    vault.set_keyring(keys);
    match vault.rotate().await {
        Ok(report) if report.is_complete() => tracing::info!(
            current_key = %report.current_key,
            reencrypted = report.reencrypted,
            already_current = report.already_current,
            "vault keys reloaded; every entry re-encrypted under the current key"
        ),
        Ok(report) => {
            for problem in &report.problems {
                tracing::error!(entry = %problem.name, error = %problem.error, "vault entry not re-encrypted");
            }
        }
        Err(error) => tracing::error!(%error, "vault re-encryption failed"),
    }
}
