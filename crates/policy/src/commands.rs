//! The commands a user sends about their own tool settings: load → decide (in `domain`) →
//! append, through the command path of `service-kit`. What the server offers the user now
//! (the current definitions) comes from the tool-state projection.
use std::sync::Arc;

use domain::{
    DomainError, ServerId, ToolCategory, ToolName, ToolState, UserId,
    tool_policy::{PolicyId, ShownSetting, ToolPolicyCommand, ToolPolicyState, decide},
};
use eventlog::{AggregateKind, EventLog, LogKind, Subject};
use proto::v1 as pb;
use service_kit::{CommandContext, CommandError, EnvelopeBuilder, ReadModels, Written, execute};

use crate::PolicyError;

/// How long a setting waits for the tool states to catch up with the log.
const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(5);

/// The policy service's commands. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PolicyCommands {
    log: Arc<dyn EventLog>,
    envelopes: EnvelopeBuilder,
    read_models: ReadModels,
}

pub(crate) fn subject_of(id: &PolicyId) -> Result<Subject, CommandError> {
    Ok(Subject::for_aggregate(
        AggregateKind::Policy,
        &[id.user_id.key().as_str(), &id.server_id.to_string()],
    )?)
}

impl PolicyCommands {
    pub fn new(
        log: Arc<dyn EventLog>,
        envelopes: EnvelopeBuilder,
        read_models: ReadModels,
    ) -> Self {
        PolicyCommands {
            log,
            envelopes,
            read_models,
        }
    }

    /// Waits (bounded) until the read models hold every configuration event stored now, so
    /// that a setting is decided against the tools the server offers now, not a moment ago
    /// (a discovery another process just recorded changes the current definition).
    async fn catch_up(&self) -> Result<(), PolicyError> {
        let end = self
            .log
            .last_sequence(LogKind::Config)
            .await
            .map_err(CommandError::from)?;
        if !self
            .read_models
            .wait_for_position(LogKind::Config, end, CATCH_UP)
            .await
        {
            tracing::warn!(
                position = end,
                "the tool states are behind the log; deciding on what they hold"
            );
        }
        Ok(())
    }

    /// The server must exist and the user be connected to it: only then does it offer them
    /// tools to set.
    fn check_connected(&self, user: &UserId, server: ServerId) -> Result<(), DomainError> {
        if self.read_models.servers.read(|d| d.get(server).is_none()) {
            return Err(DomainError::ServerNotFound);
        }
        if !self
            .read_models
            .tool_states
            .read(|states| states.is_connected(user, server))
        {
            return Err(DomainError::NotConnected);
        }
        Ok(())
    }

    async fn run(
        &self,
        context: &CommandContext,
        id: PolicyId,
        command: ToolPolicyCommand,
    ) -> Result<Written, PolicyError> {
        let subject = subject_of(&id)?;
        Ok(execute::<ToolPolicyState, _>(
            self.log.as_ref(),
            &self.envelopes,
            &subject,
            context,
            |state| decide(state, &id, command.clone()),
        )
        .await?)
    }

    /// Sets one tool of `server` for `user`. With `definition_hash`, the setting is refused
    /// unless that is the definition the server offers the user now (the user decided about
    /// what they saw); without it, it applies to the current definition.
    pub async fn set_tool_state(
        &self,
        context: &CommandContext,
        user: &UserId,
        server: ServerId,
        tool: &str,
        state: ToolState,
        definition_hash: Option<String>,
    ) -> Result<Written, PolicyError> {
        self.catch_up().await?;
        self.check_connected(user, server)?;
        // A name no server could offer is simply not one of the user's tools.
        let tool_name = ToolName::parse(tool).map_err(|_| DomainError::ToolNotFound {
            tool: tool.to_owned(),
        })?;
        // The tool as the user's console shows it now, and the log position of that view.
        let (current, shown, decided_at_position) =
            self.read_models.tool_states.read_at(|states, position| {
                let (current, shown) = states
                    .tool(user, server, tool)
                    .map(|view| {
                        let shown = ShownSetting {
                            state: view.state,
                            changed: view.changed,
                        };
                        (view.definition_hash.to_owned(), shown)
                    })
                    .unzip();
                (current, shown, position)
            });
        let id = PolicyId {
            user_id: user.clone(),
            server_id: server,
        };
        self.run(
            context,
            id,
            ToolPolicyCommand::SetToolPermission {
                tool: tool_name,
                state,
                current_definition_hash: current,
                seen_definition_hash: definition_hash,
                shown,
                decided_at_position,
            },
        )
        .await
    }

    /// Sets every tool of `category` that `server` offers `user` now. Tools that appear later
    /// start Blocked like any other.
    pub async fn set_category_state(
        &self,
        context: &CommandContext,
        user: &UserId,
        server: ServerId,
        category: ToolCategory,
        state: ToolState,
    ) -> Result<Written, PolicyError> {
        self.catch_up().await?;
        self.check_connected(user, server)?;
        let (mut current_tools, shown, decided_at_position) =
            self.read_models.tool_states.read_at(|states, position| {
                let (tools, shown): (Vec<pb::ToolDefinition>, Vec<_>) = states
                    .tools_of(user, server)
                    .map(|view| {
                        let definition = pb::ToolDefinition {
                            name: view.name.to_owned(),
                            definition_hash: view.definition_hash.to_owned(),
                            // Only the category matters to the decision; the projection has
                            // it from the tool's annotations.
                            annotations: Some(pb::ToolAnnotations {
                                read_only_hint: Some(view.category == ToolCategory::ReadOnly),
                                ..Default::default()
                            }),
                            ..Default::default()
                        };
                        let shown = ShownSetting {
                            state: view.state,
                            changed: view.changed,
                        };
                        (definition, (view.name.to_owned(), shown))
                    })
                    .unzip();
                (tools, shown, position)
            });
        current_tools.sort_by(|a, b| a.name.cmp(&b.name));
        let id = PolicyId {
            user_id: user.clone(),
            server_id: server,
        };
        self.run(
            context,
            id,
            ToolPolicyCommand::SetCategoryPermission {
                category,
                state,
                current_tools,
                shown,
                decided_at_position,
            },
        )
        .await
    }
}
