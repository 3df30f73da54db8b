//! What a user's tools are: the list offered to the AI, and what an exposed name resolves to.

use domain::{ApiConnectionStatus, ServerId, ToolState, UserId, invocation::ResolvedTool};
use serde_json::Value;

use super::{ToolListing, ToolServer};
use crate::Invoker;

/// What resolving an exposed name found, beyond the domain's facts.
pub(super) struct Resolved {
    pub(super) tool: ResolvedTool,
    pub(super) server_name: String,
    pub(super) url: String,
}

impl Invoker {
    /// The tools `user` may use now: server enabled, connection healthy, state Always allow
    /// or Needs approval. Sorted by exposed name.
    pub fn list_tools(&self, user: &UserId) -> Vec<ToolListing> {
        let models = &self.inner.read_models;
        let candidates: Vec<(ServerId, ToolListing)> = models.tool_states.read(|states| {
            states
                .all_tools_of(user)
                .filter(|view| view.state != ToolState::Blocked)
                .filter_map(|view| {
                    let parse = |text: &str| {
                        (!text.is_empty())
                            .then(|| serde_json::from_str::<Value>(text).ok())
                            .flatten()
                    };
                    Some((
                        view.server_id,
                        ToolListing {
                            name: view.exposed_name?.to_owned(),
                            tool_name: view.name.to_owned(),
                            server: ToolServer {
                                id: view.server_id.to_string(),
                                name: String::new(),
                                description: String::new(),
                            },
                            title: view.title.to_owned(),
                            description: view.description.to_owned(),
                            input_schema: parse(view.input_schema_json)
                                .unwrap_or_else(|| serde_json::json!({"type": "object"})),
                            output_schema: parse(view.output_schema_json),
                            annotations: parse(view.annotations_json),
                            state: view.state.as_str(),
                        },
                    ))
                })
                .collect()
        });
        let mut tools: Vec<ToolListing> = candidates
            .into_iter()
            .filter_map(|(server_id, mut listing)| {
                let (enabled, name, description) = models.servers.read(|d| {
                    d.get(server_id)
                        .map(|s| (s.enabled, s.name.clone(), s.description.clone()))
                })?;
                let healthy = models.connections.read(|c| {
                    c.get(server_id, user.as_str())
                        .is_some_and(|v| v.api_status(enabled) == ApiConnectionStatus::Healthy)
                });
                if !enabled || !healthy {
                    return None;
                }
                listing.server.name = name;
                listing.server.description = description;
                Some(listing)
            })
            .collect();
        tools.sort_by(|a, b| a.name.cmp(&b.name));
        tools
    }

    /// What the exposed name is for `user` now; `None`: no tool of any server. A tool of a
    /// server the user is not connected to (never, or no longer) resolves, unconnected: the
    /// orchestrator learns to have the user connect rather than that the tool does not exist.
    pub(super) fn resolve(&self, user: &UserId, exposed: &str) -> Option<Resolved> {
        let models = &self.inner.read_models;
        // `None` for the state: a tool of a server the user is not connected to.
        let (server_id, tool, state) =
            models
                .tool_states
                .read(|states| match states.resolve_exposed(user, exposed) {
                    Some(view) => Some((view.server_id, view.name.to_owned(), Some(view.state))),
                    None => states
                        .exposed_tool(exposed)
                        .filter(|(server_id, _)| !states.is_connected(user, *server_id))
                        .map(|(server_id, tool)| (server_id, tool.to_owned(), None)),
                })?;
        let tool = domain::ToolName::parse(&tool).ok()?;
        let (enabled, server_name, url) = models.servers.read(|d| {
            d.get(server_id)
                .map(|s| (s.enabled, s.name.clone(), s.url.clone()))
        })?;
        let status = models.connections.read(|c| {
            c.get(server_id, user.as_str())
                .map(|v| v.api_status(enabled))
        });
        // An unreachable connection is tried: the last probe may be minutes old, and a
        // failed call says why.
        let connected = state.is_some()
            && matches!(
                status,
                Some(ApiConnectionStatus::Healthy | ApiConnectionStatus::Unreachable)
            );
        Some(Resolved {
            tool: ResolvedTool {
                server_id,
                tool,
                server_enabled: enabled,
                connected,
                connection_auth_error: status == Some(ApiConnectionStatus::AuthError),
                // Not connected is decided first; no setting applies without a connection.
                tool_state: state.unwrap_or(ToolState::Blocked),
            },
            server_name,
            url,
        })
    }
}
