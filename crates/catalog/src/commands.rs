//! The commands that change a configured server: load → decide (in `domain`) → append, through
//! the command path of `service-kit`. Adding a server comes with OAuth discovery and client
//! registration (the `mcp` crate).
use std::sync::Arc;

use domain::{
    ServerId,
    server::{ServerCommand, ServerState, decide},
};
use eventlog::{EventLog, Subject};
use service_kit::{CommandContext, CommandError, EnvelopeBuilder, ReadModels, Written, execute};

use crate::{Catalog, OAuthClientSettings};

/// The catalog service's commands. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ServerCommands {
    pub(crate) log: Arc<dyn EventLog>,
    pub(crate) envelopes: EnvelopeBuilder,
    pub(crate) read_models: ReadModels,
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) outbound: mcp::OutboundClient,
    pub(crate) vault: vault::Vault,
    pub(crate) oauth: OAuthClientSettings,
}

pub(crate) fn subject_of(id: ServerId) -> Result<Subject, CommandError> {
    Ok(Subject::for_aggregate(
        eventlog::AggregateKind::Server,
        &[&id.to_string()],
    )?)
}

impl ServerCommands {
    pub fn new(
        log: Arc<dyn EventLog>,
        envelopes: EnvelopeBuilder,
        read_models: ReadModels,
        catalog: Arc<Catalog>,
        outbound: mcp::OutboundClient,
        vault: vault::Vault,
        oauth: OAuthClientSettings,
    ) -> Self {
        ServerCommands {
            log,
            envelopes,
            read_models,
            catalog,
            outbound,
            vault,
            oauth,
        }
    }

    pub fn oauth(&self) -> &OAuthClientSettings {
        &self.oauth
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    async fn run(
        &self,
        context: &CommandContext,
        id: ServerId,
        command: ServerCommand,
    ) -> Result<Written, CommandError> {
        let directory = &self.read_models.servers;
        execute::<ServerState, _>(
            self.log.as_ref(),
            &self.envelopes,
            &subject_of(id)?,
            context,
            |state| directory.read(|directory| decide(state, id, command.clone(), directory)),
        )
        .await
    }

    pub async fn enable_server(
        &self,
        context: &CommandContext,
        id: ServerId,
    ) -> Result<Written, CommandError> {
        self.run(context, id, ServerCommand::EnableServer).await
    }

    pub async fn disable_server(
        &self,
        context: &CommandContext,
        id: ServerId,
        reason: String,
    ) -> Result<Written, CommandError> {
        self.run(context, id, ServerCommand::DisableServer { reason })
            .await
    }

    /// Deletes the server for everyone (the connection service disconnects every user).
    pub async fn delete_server(
        &self,
        context: &CommandContext,
        id: ServerId,
    ) -> Result<Written, CommandError> {
        self.run(context, id, ServerCommand::DeleteServer).await
    }
}
