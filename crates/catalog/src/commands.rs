//! The commands that change a configured server: load → decide (in `domain`) → append, through
//! the command path of `service-kit`. Adding a server comes with OAuth discovery and client
//! registration (the `mcp` crate).
use std::sync::Arc;

use domain::{
    ServerId, ServerName, Slug,
    server::{ServerCommand, ServerState, decide},
    server_name::{NameClaim, NameClaimCommand},
};
use eventlog::{AggregateKind, EventLog, Subject};
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

/// The claim on a server name: `server.name.<slug>` (a server id is never `name`).
pub(crate) fn name_subject(slug: &Slug) -> Result<Subject, CommandError> {
    Ok(Subject::for_aggregate(
        AggregateKind::Server,
        &["name", slug.as_str()],
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

    /// Deletes the server for everyone (the connection service disconnects every user), and
    /// gives its name up.
    pub async fn delete_server(
        &self,
        context: &CommandContext,
        id: ServerId,
    ) -> Result<Written, CommandError> {
        let slug = self.current_slug(id);
        let written = self.run(context, id, ServerCommand::DeleteServer).await?;
        if let Some(slug) = slug {
            self.release_name(context, id, &slug).await;
        }
        Ok(written)
    }

    /// The slug the directory shows for `id`.
    pub(crate) fn current_slug(&self, id: ServerId) -> Option<Slug> {
        self.read_models
            .servers
            .read(|d| d.get(id).and_then(|server| Slug::parse(&server.slug)))
    }

    /// Claims `name` for server `id` before it takes it (see `domain::server_name`): refused
    /// with `server_name_taken` while another server holds it or is about to.
    pub(crate) async fn claim_name(
        &self,
        context: &CommandContext,
        id: ServerId,
        name: &ServerName,
    ) -> Result<(), CommandError> {
        let now = self.envelopes.clock().now();
        let directory = &self.read_models.servers;
        execute::<NameClaim, _>(
            self.log.as_ref(),
            &self.envelopes,
            &name_subject(&name.slug())?,
            context,
            |state| {
                let claim = NameClaimCommand::Claim {
                    server_id: id,
                    name: name.clone(),
                    now,
                };
                directory.read(|directory| domain::server_name::decide(state, claim, directory))
            },
        )
        .await?;
        Ok(())
    }

    /// Gives up server `id`'s claim on `slug`. Best effort: a claim left behind is void once
    /// its grace has passed and the directory shows the name free.
    pub(crate) async fn release_name(&self, context: &CommandContext, id: ServerId, slug: &Slug) {
        let released = async {
            execute::<NameClaim, _>(
                self.log.as_ref(),
                &self.envelopes,
                &name_subject(slug)?,
                context,
                |state| {
                    let release = NameClaimCommand::Release {
                        server_id: id,
                        slug: slug.clone(),
                    };
                    domain::server_name::decide(state, release, &Default::default())
                },
            )
            .await
        }
        .await;
        if let Err(error) = released {
            tracing::warn!(server = %id, slug = slug.as_str(), %error, "a server name's claim was not released; it lapses on its own");
        }
    }
}
