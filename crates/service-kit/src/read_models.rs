//! The read models the API answers from: projections kept current by the projection runner,
//! resumed from checkpoints at start.
//!
//! Every read model here folds a whole log (no subject filter), so its position is a position
//! of that log: readiness and lag compare it with the log's end, and read-your-writes waits for
//! the sequence an append returned whatever its subject.
use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use domain::{ConnectionDirectory, OpenInvocations, ServerDirectory, ToolStates, UserKey};
use eventlog::{
    EventLog, EventLogError, LogKind, RecordedEvent,
    projection::{CheckpointPolicy, CheckpointStore, ProjectionRunner, ProjectionSpec},
};

use serde::{Serialize, de::DeserializeOwned};

use crate::Written;

/// The server list: every server that exists, by id and slug.
pub fn server_directory_spec() -> ProjectionSpec<ServerDirectory> {
    ProjectionSpec {
        // Bump the suffix when the snapshot's shape or its fold changes.
        name: "server_directory_v2",
        log: LogKind::Config,
        filter: None,
        apply: |directory: &mut ServerDirectory, event: &RecordedEvent| {
            directory.apply(&event.envelope)
        },
        rewind: None,
    }
}

/// The tool states: per user and server each tool's effective state, and the exposed names.
pub fn tool_states_spec() -> ProjectionSpec<ToolStates> {
    ProjectionSpec {
        // Bump the suffix when the snapshot's shape or its fold changes (v3: each discovery
        // applies to the settings; v4: an observation of an older discovery is folded in).
        name: "tool_states_v4",
        log: LogKind::Config,
        filter: None,
        apply: |states: &mut ToolStates, event: &RecordedEvent| {
            states.apply(&event.envelope, event.sequence)
        },
        rewind: None,
    }
}

/// Every user's connection to every server, as the API shows it.
pub fn connection_directory_spec() -> ProjectionSpec<ConnectionDirectory> {
    ProjectionSpec {
        name: "connection_directory_v1",
        log: LogKind::Config,
        filter: None,
        apply: |directory: &mut ConnectionDirectory, event: &RecordedEvent| {
            directory.apply(&event.envelope)
        },
        rewind: None,
    }
}

/// The invocations not finished yet: pending approvals, calls in flight. Folds the
/// invocations log (its events carry the user only in the subject after the request).
pub fn open_invocations_spec() -> ProjectionSpec<OpenInvocations> {
    ProjectionSpec {
        name: "open_invocations_v2",
        log: LogKind::Invocations,
        filter: None,
        apply: |open: &mut OpenInvocations, event: &RecordedEvent| {
            let user = event
                .subject
                .as_str()
                .split('.')
                .nth(1)
                .and_then(|key| UserKey::decode(key).ok());
            if let Some(user) = user {
                open.apply(&event.envelope, user.as_str(), event.sequence);
            }
        },
        // The snapshot leaves the claim window's finished invocations out.
        rewind: Some(OpenInvocations::replay_from),
    }
}

/// Where one read model is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionStatus {
    pub name: &'static str,
    pub log: LogKind,
    /// The last log sequence the read model reflects.
    pub position: u64,
}

/// The read models of one Switchboard process.
#[derive(Debug, Clone)]
pub struct ReadModels {
    pub servers: ProjectionRunner<ServerDirectory>,
    pub connections: ProjectionRunner<ConnectionDirectory>,
    /// What each user lets the AI do with each tool; the invocation path reads it per call.
    pub tool_states: ProjectionRunner<ToolStates>,
    /// The invocations without their final outcome yet (pending approvals, running calls).
    pub open_invocations: ProjectionRunner<OpenInvocations>,
    all: Arc<[Arc<dyn ReadModel>]>,
}

/// What the read models are configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadModelSettings {
    /// How long a finished invocation stays known to the invocation path (its id answered
    /// with its outcome, never run again).
    pub claim_window: Duration,
}

impl Default for ReadModelSettings {
    fn default() -> Self {
        ReadModelSettings {
            claim_window: domain::CLAIM_WINDOW,
        }
    }
}

impl ReadModels {
    /// Restores every read model from its checkpoint and catches it up with the logs; returns
    /// once all of them reflect everything written before the call.
    pub async fn start(
        log: Arc<dyn EventLog>,
        checkpoints: Arc<dyn CheckpointStore>,
        policy: CheckpointPolicy,
    ) -> Result<Self, EventLogError> {
        Self::start_with(log, checkpoints, policy, ReadModelSettings::default()).await
    }

    /// [`ReadModels::start`] with settings.
    pub async fn start_with(
        log: Arc<dyn EventLog>,
        checkpoints: Arc<dyn CheckpointStore>,
        policy: CheckpointPolicy,
        settings: ReadModelSettings,
    ) -> Result<Self, EventLogError> {
        let spec = server_directory_spec();
        let servers = ProjectionRunner::start(
            log.clone(),
            checkpoints.clone(),
            spec.clone(),
            policy.clone(),
        )
        .await?;
        let connection_spec = connection_directory_spec();
        let connections = ProjectionRunner::start(
            log.clone(),
            checkpoints.clone(),
            connection_spec.clone(),
            policy.clone(),
        )
        .await?;
        let tools_spec = tool_states_spec();
        let tool_states = ProjectionRunner::start(
            log.clone(),
            checkpoints.clone(),
            tools_spec.clone(),
            policy.clone(),
        )
        .await?;
        let open_spec = open_invocations_spec();
        let open_invocations = ProjectionRunner::start_configured(
            log,
            checkpoints,
            open_spec.clone(),
            policy,
            |open: &mut OpenInvocations| open.set_claim_window(settings.claim_window),
        )
        .await?;
        let all: Vec<Arc<dyn ReadModel>> = vec![
            Model::new(&spec, servers.clone()),
            Model::new(&connection_spec, connections.clone()),
            Model::new(&tools_spec, tool_states.clone()),
            Model::new(&open_spec, open_invocations.clone()),
        ];
        Ok(ReadModels {
            servers,
            connections,
            tool_states,
            open_invocations,
            all: all.into(),
        })
    }

    /// Waits until every read model of the written log reflects the write (read-your-writes),
    /// at most `limit`; returns whether they did. A command that wrote nothing still waits for
    /// the version it decided on: the answer describes that state, which the read models may
    /// not show yet (an event another process appended).
    pub async fn wait_for(&self, written: &Written, limit: Duration) -> bool {
        if written.version == 0 {
            return true;
        }
        self.wait_for_position(written.log, written.version, limit)
            .await
    }

    /// Waits until every read model of `log` has reached `sequence`, at most `limit`.
    pub async fn wait_for_position(&self, log: LogKind, sequence: u64, limit: Duration) -> bool {
        // One after another: the total is the wait for the slowest.
        let all_reached = async {
            for model in self.all.iter().filter(|model| model.log() == log) {
                model.wait_for(sequence).await;
            }
        };
        tokio::time::timeout(limit, all_reached).await.is_ok()
    }

    pub fn statuses(&self) -> Vec<ProjectionStatus> {
        self.all
            .iter()
            .map(|model| ProjectionStatus {
                name: model.name(),
                log: model.log(),
                position: model.position(),
            })
            .collect()
    }

    /// Stops following the logs and saves a final checkpoint of every read model (before the
    /// logs are closed, so that no follower is left saving while the process exits).
    pub async fn shutdown(&self) -> Result<(), EventLogError> {
        for model in self.all.iter() {
            model.shutdown().await?;
        }
        Ok(())
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A read model of any state type, for waiting and reporting.
trait ReadModel: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn log(&self) -> LogKind;
    fn position(&self) -> u64;
    fn wait_for(&self, sequence: u64) -> BoxFuture<'_, ()>;
    fn shutdown(&self) -> BoxFuture<'_, Result<(), EventLogError>>;
}

/// A runner with the name and log of its spec.
struct Model<P> {
    name: &'static str,
    log: LogKind,
    runner: ProjectionRunner<P>,
}

impl<P> std::fmt::Debug for Model<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl<P> Model<P> {
    fn new(spec: &ProjectionSpec<P>, runner: ProjectionRunner<P>) -> Arc<Self> {
        Arc::new(Model {
            name: spec.name,
            log: spec.log,
            runner,
        })
    }
}

impl<P> ReadModel for Model<P>
where
    P: Default + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn name(&self) -> &'static str {
        self.name
    }
    fn log(&self) -> LogKind {
        self.log
    }
    fn position(&self) -> u64 {
        self.runner.position()
    }
    fn wait_for(&self, sequence: u64) -> BoxFuture<'_, ()> {
        Box::pin(self.runner.wait_for(sequence))
    }
    fn shutdown(&self) -> BoxFuture<'_, Result<(), EventLogError>> {
        Box::pin(self.runner.clone().shutdown())
    }
}
