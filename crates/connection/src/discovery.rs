//! Tool discovery and health: `tools/list` under the user's token is both the probe (did the
//! server answer?) and the discovery (what can this user's AI use there?). Events record
//! changes only: a probe that finds the same tools on a healthy connection writes nothing.
use domain::{
    ServerId, UserId,
    connection::{ConnectionCommand, ConnectionId},
    tool_definition_hash,
};
use mcp::McpCallError;
use proto::v1 as pb;
use rmcp::model::Tool;
use service_kit::CommandContext;

use crate::{ConnectionError, ConnectionService};

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The server answered `tools/list`.
    Healthy,
    /// The server could not be reached or answered with a server error.
    Unreachable,
    /// The user's authorization no longer works (recorded as an auth error).
    AuthError,
}

/// A tool as an event records it, with its definition hash.
pub fn tool_definition(tool: &Tool) -> pb::ToolDefinition {
    let schema_text = |schema: &serde_json::Map<String, serde_json::Value>| {
        // serde_json's maps are sorted by key: one canonical spelling per schema.
        serde_json::to_string(schema).unwrap_or_default()
    };
    let annotations = tool.annotations.as_ref().map(|a| pb::ToolAnnotations {
        read_only_hint: a.read_only_hint,
        destructive_hint: a.destructive_hint,
        idempotent_hint: a.idempotent_hint,
        open_world_hint: a.open_world_hint,
        title: a.title.clone().unwrap_or_default(),
    });
    let mut definition = pb::ToolDefinition {
        name: tool.name.to_string(),
        title: tool.title.clone().unwrap_or_default(),
        description: tool.description.as_deref().unwrap_or("").to_owned(),
        input_schema_json: schema_text(&tool.input_schema),
        output_schema_json: tool
            .output_schema
            .as_deref()
            .map(schema_text)
            .unwrap_or_default(),
        annotations,
        definition_hash: String::new(),
    };
    definition.definition_hash = tool_definition_hash(&definition);
    definition
}

impl ConnectionService {
    /// Lists the user's tools at the server and records what changed: the tools, and the
    /// connection's reachability.
    pub async fn probe(
        &self,
        server_id: ServerId,
        user: &UserId,
    ) -> Result<ProbeOutcome, ConnectionError> {
        let server = self.server_oauth(server_id, false).await?;
        let outbound = self.inner.outbound.clone();
        let url = server.url.clone();
        let listed = self
            .with_token(server_id, user, |token| {
                let (outbound, url) = (outbound.clone(), url.clone());
                async move { mcp::list_tools(&outbound, &url, &token).await }
            })
            .await;
        let id = ConnectionId {
            server_id,
            user_id: user.clone(),
        };
        let context = CommandContext::service("connection");
        match listed {
            Ok(tools) => {
                let mut definitions: Vec<pb::ToolDefinition> =
                    tools.iter().map(tool_definition).collect();
                // A server that lists a name twice: keep the first (the domain refuses
                // duplicates, and one bad entry must not hide the rest).
                let mut seen = std::collections::HashSet::new();
                definitions.retain(|d| seen.insert(d.name.clone()));
                definitions.retain(|d| domain::ToolName::parse(&d.name).is_ok());
                self.run(
                    &context,
                    &id,
                    vec![
                        ConnectionCommand::RecordRecovered,
                        ConnectionCommand::RecordDiscoveredTools { tools: definitions },
                    ],
                )
                .await?;
                Ok(ProbeOutcome::Healthy)
            }
            Err(ConnectionError::Upstream(
                error @ (McpCallError::Unreachable { .. }
                | McpCallError::Protocol { .. }
                | McpCallError::ErrorAnswer { .. }
                | McpCallError::InputRequired { .. }
                | McpCallError::Refused(_)),
            )) => {
                self.run(
                    &context,
                    &id,
                    vec![ConnectionCommand::RecordUnreachable {
                        reason: error.to_string(),
                    }],
                )
                .await?;
                Ok(ProbeOutcome::Unreachable)
            }
            Err(ConnectionError::RefreshUnavailable { reason }) => {
                self.run(
                    &context,
                    &id,
                    vec![ConnectionCommand::RecordUnreachable {
                        reason: format!("the authorization server is unreachable: {reason}"),
                    }],
                )
                .await?;
                Ok(ProbeOutcome::Unreachable)
            }
            Err(ConnectionError::Upstream(McpCallError::InsufficientScope { required_scope })) => {
                self.record_scope_required(
                    server_id,
                    user,
                    required_scope.as_deref().unwrap_or(""),
                )
                .await?;
                Ok(ProbeOutcome::AuthError)
            }
            Err(ConnectionError::ReauthorizationRequired { .. }) => Ok(ProbeOutcome::AuthError),
            Err(other) => Err(other),
        }
    }
}
