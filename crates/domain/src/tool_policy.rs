//! The ToolPolicy aggregate: what one user lets the AI do with one server's tools (subject
//! `policy.<user_key>.<server_id>`).
//!
//! Rules:
//! - Every tool without an explicit setting is [`ToolState::Blocked`].
//! - A setting remembers the definition hash the user saw. A user can only set a tool the
//!   server offers them now, and a request naming a definition that is no longer the current
//!   one is refused: a console never allows a definition its user did not see.
//! - When a tool's definition changes, `ToolDefinitionChanged` is recorded, and an *Always
//!   allow* tool drops to *Needs approval* until the user sets it again (a "rug pull" cannot
//!   inherit a blanket allow). The setting is flagged `changed` until the user sets it again
//!   — to any state, the one it already has included.
//! - A tool the server no longer offers keeps no setting (`ToolPermissionsCleared`): when it
//!   comes back it starts Blocked like any new tool.
//! - A category setting applies to the tools of that category *at the time*; a tool that
//!   appears later is blocked like any other. Categories come from the `readOnlyHint`
//!   annotation, which only groups tools (see [`ToolCategory`]).
//!
//! A category setting is recorded as one `CategoryPermissionSet` (the user's act, listing the
//! tools it applied to) followed by a `ToolPermissionSet` per tool whose setting it changed:
//! `CategoryPermissionSet` has no field for the definition hashes, and the per-tool events
//! carry them. Folding reads the per-tool events only.
use std::collections::{BTreeMap, HashSet};

use proto::v1::{self as pb, envelope::Event};

use crate::{Aggregate, DomainError, ServerId, ToolCategory, ToolName, ToolState, UserId};

/// Which policy: one user × one server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyId {
    pub user_id: UserId,
    pub server_id: ServerId,
}

impl PolicyId {
    /// The aggregate's subject, relative to the deployment's prefix.
    pub fn subject(&self) -> String {
        format!("policy.{}.{}", self.user_id.key(), self.server_id)
    }
}

/// A user's explicit setting for one tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolSetting {
    pub state: ToolState,
    /// The definition the setting was made for (or, after a change, last recorded).
    pub definition_hash: String,
    /// The definition changed after the user made the setting, and the user has not set the
    /// tool since.
    pub changed: bool,
}

/// One user's settings for one server's tools.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolPolicyState {
    settings: BTreeMap<String, ToolSetting>,
}

impl ToolPolicyState {
    /// The state of `tool`: its explicit setting, or `Blocked`.
    pub fn tool_state(&self, tool: &str) -> ToolState {
        self.settings
            .get(tool)
            .map_or(ToolState::Blocked, |setting| setting.state)
    }

    /// The explicit setting of `tool`, if the user made one.
    pub fn setting(&self, tool: &str) -> Option<&ToolSetting> {
        self.settings.get(tool)
    }

    /// Every explicit setting, in tool name order.
    pub fn settings(&self) -> impl Iterator<Item = (&str, &ToolSetting)> {
        self.settings.iter().map(|(tool, s)| (tool.as_str(), s))
    }
}

/// The state of `tool` under `policy`: its explicit setting, or `Blocked`.
pub fn tool_state(policy: &ToolPolicyState, tool: &str) -> ToolState {
    policy.tool_state(tool)
}

impl Aggregate for ToolPolicyState {
    fn apply(&mut self, event: &Event) {
        let (tool, state, definition_hash, changed) = match event {
            Event::ToolPermissionSet(e) => (&e.tool_name, e.state, &e.definition_hash, false),
            Event::ToolDefinitionChanged(e) => (&e.tool_name, e.state, &e.definition_hash, true),
            Event::ToolPermissionsCleared(e) => {
                for tool in &e.tool_names {
                    self.settings.remove(tool);
                }
                return;
            }
            // `CategoryPermissionSet`: the per-tool events that follow it carry the change
            // (see the module docs).
            _ => return,
        };
        self.settings.insert(
            tool.clone(),
            ToolSetting {
                state: ToolState::from_event(state),
                definition_hash: definition_hash.clone(),
                changed,
            },
        );
    }
}

/// A tool as the tool-state projection shows it now. It folds each discovery as it comes,
/// ahead of the policy service's reaction to it: where it differs from the aggregate, a
/// setting is recorded even if the aggregate holds that setting already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShownSetting {
    pub state: ToolState,
    /// Shown as changed since the user set it (setting it again confirms it).
    pub changed: bool,
}

impl ShownSetting {
    /// Whether setting the tool to `state` would show the same as now.
    fn is(&self, state: ToolState) -> bool {
        self.state == state && !self.changed
    }
}

/// What a user (or the policy service) asks of a policy.
#[derive(Debug, Clone)]
pub enum ToolPolicyCommand {
    /// The user sets one tool.
    SetToolPermission {
        tool: ToolName,
        state: ToolState,
        /// The definition hash of the tool the server offers the user now; `None`: the server
        /// offers the user no such tool now.
        current_definition_hash: Option<String>,
        /// The definition the user saw, when the request names one. Without it the setting
        /// applies to the current definition.
        seen_definition_hash: Option<String>,
        /// The tool as the tool-state projection shows it now.
        shown: Option<ShownSetting>,
        /// The configuration log position of that view (recorded in the setting: the
        /// discoveries up to there are the ones the user decided on).
        decided_at_position: u64,
    },
    /// The user sets every tool of `category` among the server's current tools.
    SetCategoryPermission {
        category: ToolCategory,
        state: ToolState,
        current_tools: Vec<pb::ToolDefinition>,
        /// The tools as the tool-state projection shows them now, by name.
        shown: Vec<(String, ShownSetting)>,
        /// The configuration log position of that view (see `SetToolPermission`).
        decided_at_position: u64,
    },
    /// The tool definitions of one discovery: notices changed definitions and forgets the
    /// settings of tools it no longer offers. Each discovery is observed in the log's order;
    /// a later one does not stand in for it (a tool gone and back starts Blocked, a definition
    /// changed and changed back needs approval again).
    ObserveDefinitions {
        current_tools: Vec<pb::ToolDefinition>,
        /// The discovery's position in the configuration log, recorded in what it changes.
        observed_position: u64,
        /// Tools settled since that discovery — set by the user after it, or changed by the
        /// observation of it or of a later one: left as they are (a lagging observer must not
        /// take a setting back to an older list).
        set_since: Vec<String>,
    },
}

/// Decides a command for the policy `id`.
pub fn decide(
    state: &ToolPolicyState,
    id: &PolicyId,
    command: ToolPolicyCommand,
) -> Result<Vec<Event>, DomainError> {
    match command {
        ToolPolicyCommand::SetToolPermission {
            tool,
            state: tool_state,
            current_definition_hash,
            seen_definition_hash,
            shown,
            decided_at_position,
        } => {
            let Some(current) = current_definition_hash else {
                return Err(DomainError::ToolNotFound {
                    tool: tool.as_str().to_owned(),
                });
            };
            if current.is_empty() {
                return Err(DomainError::ToolDefinitionHashMissing {
                    tool: tool.as_str().to_owned(),
                });
            }
            if seen_definition_hash.is_some_and(|seen| seen != current) {
                return Err(DomainError::ToolDefinitionStale {
                    tool: tool.as_str().to_owned(),
                    current,
                });
            }
            if is_unchanged(state, tool.as_str(), tool_state, &current)
                && shown.is_none_or(|shown| shown.is(tool_state))
            {
                return Ok(vec![]);
            }
            Ok(vec![permission_set(
                state,
                id,
                tool.as_str().to_owned(),
                tool_state,
                current,
                decided_at_position,
            )])
        }
        ToolPolicyCommand::SetCategoryPermission {
            category,
            state: tool_state,
            current_tools,
            shown,
            decided_at_position,
        } => {
            let mut tool_names = Vec::new();
            let mut changes = Vec::new();
            for tool in current_tools
                .into_iter()
                .filter(|tool| ToolCategory::of(tool) == category)
            {
                ToolName::parse(&tool.name)?;
                if tool.definition_hash.is_empty() {
                    return Err(DomainError::ToolDefinitionHashMissing { tool: tool.name });
                }
                let shown_differs = shown
                    .iter()
                    .any(|(name, shown)| *name == tool.name && !shown.is(tool_state));
                if shown_differs
                    || !is_unchanged(state, &tool.name, tool_state, &tool.definition_hash)
                {
                    changes.push(permission_set(
                        state,
                        id,
                        tool.name.clone(),
                        tool_state,
                        tool.definition_hash,
                        decided_at_position,
                    ));
                }
                tool_names.push(tool.name);
            }
            if changes.is_empty() {
                return Ok(vec![]);
            }
            let mut events = Vec::with_capacity(1 + changes.len());
            events.push(Event::CategoryPermissionSet(pb::CategoryPermissionSet {
                user_id: id.user_id.as_str().to_owned(),
                server_id: id.server_id.to_string(),
                category: category.to_proto() as i32,
                state: tool_state.to_proto() as i32,
                tool_names,
            }));
            events.extend(changes);
            Ok(events)
        }
        ToolPolicyCommand::ObserveDefinitions {
            current_tools,
            observed_position,
            set_since,
        } => {
            let mut events = Vec::new();
            let offered: HashSet<&str> = current_tools.iter().map(|t| t.name.as_str()).collect();
            let stands = |tool: &str| set_since.iter().any(|set| set == tool);
            let gone: Vec<String> = state
                .settings
                .keys()
                .filter(|tool| !offered.contains(tool.as_str()) && !stands(tool))
                .cloned()
                .collect();
            for tool in &current_tools {
                let Some(setting) = state.settings.get(&tool.name) else {
                    continue; // no explicit setting: blocked whatever its definition
                };
                if stands(&tool.name) {
                    continue;
                }
                if tool.definition_hash.is_empty()
                    || tool.definition_hash == setting.definition_hash
                {
                    continue;
                }
                let new_state = match setting.state {
                    ToolState::AlwaysAllow => ToolState::NeedsApproval,
                    other => other,
                };
                events.push(Event::ToolDefinitionChanged(pb::ToolDefinitionChanged {
                    user_id: id.user_id.as_str().to_owned(),
                    server_id: id.server_id.to_string(),
                    tool_name: tool.name.clone(),
                    previous_definition_hash: setting.definition_hash.clone(),
                    definition_hash: tool.definition_hash.clone(),
                    previous_state: setting.state.to_proto() as i32,
                    state: new_state.to_proto() as i32,
                    observed_position,
                }));
            }
            if !gone.is_empty() {
                let previous = gone
                    .iter()
                    .filter_map(|tool| {
                        let setting = state.settings.get(tool)?;
                        Some(pb::ClearedToolSetting {
                            tool_name: tool.clone(),
                            state: setting.state.to_proto() as i32,
                            definition_hash: setting.definition_hash.clone(),
                        })
                    })
                    .collect();
                events.push(Event::ToolPermissionsCleared(pb::ToolPermissionsCleared {
                    user_id: id.user_id.as_str().to_owned(),
                    server_id: id.server_id.to_string(),
                    tool_names: gone,
                    previous,
                    observed_position,
                }));
            }
            Ok(events)
        }
    }
}

/// Whether setting `tool` to `tool_state` for definition `hash` would change nothing. A
/// setting flagged `changed` always changes: setting it again is how the user confirms it.
fn is_unchanged(state: &ToolPolicyState, tool: &str, tool_state: ToolState, hash: &str) -> bool {
    state.settings.get(tool).is_some_and(|setting| {
        setting.state == tool_state && setting.definition_hash == hash && !setting.changed
    })
}

fn permission_set(
    policy: &ToolPolicyState,
    id: &PolicyId,
    tool: String,
    state: ToolState,
    definition_hash: String,
    decided_at_position: u64,
) -> Event {
    let previous = policy.settings.get(&tool);
    Event::ToolPermissionSet(pb::ToolPermissionSet {
        user_id: id.user_id.as_str().to_owned(),
        server_id: id.server_id.to_string(),
        previous_state: previous
            .map_or(ToolState::Blocked, |setting| setting.state)
            .to_proto() as i32,
        previous_definition_hash: previous
            .map(|setting| setting.definition_hash.clone())
            .unwrap_or_default(),
        tool_name: tool,
        state: state.to_proto() as i32,
        definition_hash,
        decided_at_position,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Scenario;

    fn id() -> PolicyId {
        PolicyId {
            user_id: UserId::parse("alice@example.com").unwrap(),
            server_id: ServerId::parse("0190f3c4-a8b2-7c3d-9e1f-0123456789ab").unwrap(),
        }
    }

    /// The user sets `tool` as offered now with definition `hash`, naming no definition.
    fn set(tool: &str, state: ToolState, hash: &str) -> ToolPolicyCommand {
        ToolPolicyCommand::SetToolPermission {
            tool: ToolName::parse(tool).unwrap(),
            state,
            current_definition_hash: Some(hash.into()),
            seen_definition_hash: None,
            shown: None,
            decided_at_position: 0,
        }
    }

    /// A recorded setting (for `given`: the previous-state fields do not matter to the fold).
    fn permission_was_set(tool: &str, state: ToolState, hash: &str) -> Event {
        permission_changed(tool, ToolState::Blocked, "", state, hash)
    }

    fn permission_changed(
        tool: &str,
        previous_state: ToolState,
        previous_hash: &str,
        state: ToolState,
        hash: &str,
    ) -> Event {
        Event::ToolPermissionSet(pb::ToolPermissionSet {
            user_id: "alice@example.com".into(),
            server_id: id().server_id.to_string(),
            tool_name: tool.into(),
            state: state.to_proto() as i32,
            definition_hash: hash.into(),
            previous_state: previous_state.to_proto() as i32,
            previous_definition_hash: previous_hash.into(),
            decided_at_position: 0,
        })
    }

    fn definition(name: &str, hash: &str, read_only: Option<bool>) -> pb::ToolDefinition {
        pb::ToolDefinition {
            name: name.into(),
            definition_hash: hash.into(),
            annotations: Some(pb::ToolAnnotations {
                read_only_hint: read_only,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn definition_changed(
        tool: &str,
        previous_hash: &str,
        hash: &str,
        previous_state: ToolState,
        state: ToolState,
    ) -> Event {
        Event::ToolDefinitionChanged(pb::ToolDefinitionChanged {
            user_id: "alice@example.com".into(),
            server_id: id().server_id.to_string(),
            tool_name: tool.into(),
            previous_definition_hash: previous_hash.into(),
            definition_hash: hash.into(),
            previous_state: previous_state.to_proto() as i32,
            state: state.to_proto() as i32,
            observed_position: 0,
        })
    }

    fn cleared(tools: &[&str]) -> Event {
        Event::ToolPermissionsCleared(pb::ToolPermissionsCleared {
            user_id: "alice@example.com".into(),
            server_id: id().server_id.to_string(),
            tool_names: tools.iter().map(|t| (*t).to_owned()).collect(),
            ..Default::default()
        })
    }

    fn observe(tools: Vec<pb::ToolDefinition>) -> ToolPolicyCommand {
        ToolPolicyCommand::ObserveDefinitions {
            current_tools: tools,
            observed_position: 0,
            set_since: Vec::new(),
        }
    }

    fn decide_policy(
        command: ToolPolicyCommand,
    ) -> impl FnOnce(&ToolPolicyState) -> Result<Vec<Event>, DomainError> {
        move |state| decide(state, &id(), command)
    }

    #[test]
    fn subject_uses_the_user_key() {
        assert_eq!(
            id().subject(),
            "policy.alice_40example_2Ecom.0190f3c4-a8b2-7c3d-9e1f-0123456789ab"
        );
    }

    #[test]
    fn every_tool_without_a_setting_is_blocked() {
        let state = ToolPolicyState::default();
        assert_eq!(tool_state(&state, "anything"), ToolState::Blocked);
        let state = Scenario::<ToolPolicyState>::given([permission_was_set(
            "search",
            ToolState::AlwaysAllow,
            "h1",
        )])
        .state()
        .clone();
        assert_eq!(tool_state(&state, "search"), ToolState::AlwaysAllow);
        assert_eq!(tool_state(&state, "delete_repo"), ToolState::Blocked);
    }

    #[test]
    fn setting_a_tool_records_the_definition_the_user_saw_and_what_it_was_before() {
        let state = Scenario::<ToolPolicyState>::given([])
            .when(decide_policy(set("search", ToolState::AlwaysAllow, "h1")))
            .then([permission_changed(
                "search",
                ToolState::Blocked,
                "",
                ToolState::AlwaysAllow,
                "h1",
            )]);
        assert_eq!(
            state.setting("search"),
            Some(&ToolSetting {
                state: ToolState::AlwaysAllow,
                definition_hash: "h1".into(),
                changed: false,
            })
        );
        Scenario::<ToolPolicyState>::given([permission_was_set(
            "search",
            ToolState::AlwaysAllow,
            "h1",
        )])
        .when(decide_policy(set("search", ToolState::NeedsApproval, "h1")))
        .then([permission_changed(
            "search",
            ToolState::AlwaysAllow,
            "h1",
            ToolState::NeedsApproval,
            "h1",
        )]);
    }

    #[test]
    fn setting_a_tool_to_its_current_setting_records_nothing() {
        Scenario::<ToolPolicyState>::given([permission_was_set(
            "search",
            ToolState::NeedsApproval,
            "h1",
        )])
        .when(decide_policy(set("search", ToolState::NeedsApproval, "h1")))
        .then_nothing();
    }

    #[test]
    fn a_tool_the_server_does_not_offer_now_cannot_be_set() {
        Scenario::<ToolPolicyState>::given([])
            .when(decide_policy(ToolPolicyCommand::SetToolPermission {
                tool: ToolName::parse("gone").unwrap(),
                state: ToolState::Blocked,
                current_definition_hash: None,
                seen_definition_hash: None,
                shown: None,
                decided_at_position: 0,
            }))
            .then_error("tool_not_found");
        Scenario::<ToolPolicyState>::given([])
            .when(decide_policy(set("search", ToolState::AlwaysAllow, "")))
            .then_error("tool_definition_hash_missing");
    }

    #[test]
    fn a_setting_for_a_definition_that_is_no_longer_current_is_refused() {
        let command = |seen: &str| ToolPolicyCommand::SetToolPermission {
            tool: ToolName::parse("search").unwrap(),
            state: ToolState::AlwaysAllow,
            current_definition_hash: Some("h2".into()),
            seen_definition_hash: Some(seen.into()),
            shown: None,
            decided_at_position: 0,
        };
        let error = Scenario::<ToolPolicyState>::given([])
            .when(decide_policy(command("h1")))
            .then_error("tool_definition_changed");
        assert!(error.to_string().contains("h2"), "{error}");
        Scenario::<ToolPolicyState>::given([])
            .when(decide_policy(command("h2")))
            .then([permission_changed(
                "search",
                ToolState::Blocked,
                "",
                ToolState::AlwaysAllow,
                "h2",
            )]);
    }

    #[test]
    fn always_allow_tool_with_changed_definition_needs_approval() {
        let state = Scenario::<ToolPolicyState>::given([permission_was_set(
            "search",
            ToolState::AlwaysAllow,
            "h1",
        )])
        .when(decide_policy(observe(vec![definition(
            "search",
            "h2",
            Some(true),
        )])))
        .then([definition_changed(
            "search",
            "h1",
            "h2",
            ToolState::AlwaysAllow,
            ToolState::NeedsApproval,
        )]);
        assert_eq!(state.tool_state("search"), ToolState::NeedsApproval);
        assert!(state.setting("search").is_some_and(|s| s.changed));
    }

    #[test]
    fn a_changed_definition_is_recorded_once() {
        Scenario::<ToolPolicyState>::given([
            permission_was_set("search", ToolState::AlwaysAllow, "h1"),
            definition_changed(
                "search",
                "h1",
                "h2",
                ToolState::AlwaysAllow,
                ToolState::NeedsApproval,
            ),
        ])
        .when(decide_policy(observe(vec![definition(
            "search", "h2", None,
        )])))
        .then_nothing();
    }

    #[test]
    fn the_user_confirms_a_changed_tool_by_setting_it_again() {
        let changed = [
            permission_was_set("search", ToolState::AlwaysAllow, "h1"),
            definition_changed(
                "search",
                "h1",
                "h2",
                ToolState::AlwaysAllow,
                ToolState::NeedsApproval,
            ),
        ];
        let state = Scenario::<ToolPolicyState>::given(changed.clone())
            .when(decide_policy(set("search", ToolState::AlwaysAllow, "h2")))
            .then([permission_changed(
                "search",
                ToolState::NeedsApproval,
                "h2",
                ToolState::AlwaysAllow,
                "h2",
            )]);
        assert_eq!(state.tool_state("search"), ToolState::AlwaysAllow);
        assert!(state.setting("search").is_some_and(|s| !s.changed));
    }

    #[test]
    fn setting_a_changed_tool_to_the_state_it_dropped_to_clears_the_flag() {
        let state = Scenario::<ToolPolicyState>::given([
            permission_was_set("search", ToolState::AlwaysAllow, "h1"),
            definition_changed(
                "search",
                "h1",
                "h2",
                ToolState::AlwaysAllow,
                ToolState::NeedsApproval,
            ),
        ])
        .when(decide_policy(set("search", ToolState::NeedsApproval, "h2")))
        .then([permission_changed(
            "search",
            ToolState::NeedsApproval,
            "h2",
            ToolState::NeedsApproval,
            "h2",
        )]);
        assert!(state.setting("search").is_some_and(|s| !s.changed));
    }

    #[test]
    fn changed_definitions_of_other_tools_keep_their_state_but_are_noticed() {
        Scenario::<ToolPolicyState>::given([
            permission_was_set("create", ToolState::NeedsApproval, "c1"),
            permission_was_set("delete", ToolState::Blocked, "d1"),
            permission_was_set("search", ToolState::AlwaysAllow, "s1"),
        ])
        .when(decide_policy(observe(vec![
            definition("create", "c2", None),
            definition("delete", "d2", None),
            definition("search", "s1", Some(true)),
            definition("unset", "u1", None),
        ])))
        .then([
            definition_changed(
                "create",
                "c1",
                "c2",
                ToolState::NeedsApproval,
                ToolState::NeedsApproval,
            ),
            definition_changed("delete", "d1", "d2", ToolState::Blocked, ToolState::Blocked),
        ]);
    }

    #[test]
    fn a_removed_tool_keeps_no_setting_and_starts_blocked_when_it_comes_back() {
        let state = Scenario::<ToolPolicyState>::given([
            permission_was_set("search", ToolState::AlwaysAllow, "s1"),
            permission_was_set("create", ToolState::NeedsApproval, "c1"),
        ])
        .when(decide_policy(observe(vec![definition(
            "create", "c1", None,
        )])))
        .then([Event::ToolPermissionsCleared(pb::ToolPermissionsCleared {
            user_id: "alice@example.com".into(),
            server_id: id().server_id.to_string(),
            tool_names: vec!["search".into()],
            // What it was, for the audit log.
            previous: vec![pb::ClearedToolSetting {
                tool_name: "search".into(),
                state: pb::ToolState::AlwaysAllow as i32,
                definition_hash: "s1".into(),
            }],
            observed_position: 0,
        })]);
        assert_eq!(state.setting("search"), None);
        assert_eq!(state.tool_state("search"), ToolState::Blocked);
        // Seen again, the same list changes nothing; the tool coming back stays blocked.
        Scenario::<ToolPolicyState>::given([
            permission_was_set("search", ToolState::AlwaysAllow, "s1"),
            cleared(&["search"]),
        ])
        .when(decide_policy(observe(vec![definition(
            "search", "s1", None,
        )])))
        .then_nothing();
    }

    #[test]
    fn a_setting_made_after_the_discovery_observed_stands() {
        // The discovery without `search` is observed late, after the user set `search` again
        // against a later list that offered it: that setting is not cleared or downgraded.
        Scenario::<ToolPolicyState>::given([permission_was_set(
            "search",
            ToolState::AlwaysAllow,
            "s1",
        )])
        .when(decide_policy(ToolPolicyCommand::ObserveDefinitions {
            current_tools: vec![definition("create", "c1", None)],
            observed_position: 7,
            set_since: vec!["search".into()],
        }))
        .then_nothing();
        Scenario::<ToolPolicyState>::given([permission_was_set(
            "search",
            ToolState::AlwaysAllow,
            "s1",
        )])
        .when(decide_policy(ToolPolicyCommand::ObserveDefinitions {
            current_tools: vec![definition("search", "s2", None)],
            observed_position: 7,
            set_since: vec!["search".into()],
        }))
        .then_nothing();
    }

    #[test]
    fn a_setting_the_projection_shows_otherwise_is_recorded_again() {
        // The projection cleared `search` at a discovery the policy service has not observed
        // yet: the user's setting is recorded, not taken for one already there.
        Scenario::<ToolPolicyState>::given([permission_was_set(
            "search",
            ToolState::AlwaysAllow,
            "s1",
        )])
        .when(decide_policy(ToolPolicyCommand::SetToolPermission {
            tool: ToolName::parse("search").unwrap(),
            state: ToolState::AlwaysAllow,
            current_definition_hash: Some("s1".into()),
            seen_definition_hash: None,
            shown: Some(ShownSetting {
                state: ToolState::Blocked,
                changed: false,
            }),
            decided_at_position: 0,
        }))
        .then([permission_changed(
            "search",
            ToolState::AlwaysAllow,
            "s1",
            ToolState::AlwaysAllow,
            "s1",
        )]);
        Scenario::<ToolPolicyState>::given([permission_was_set(
            "get",
            ToolState::AlwaysAllow,
            "g1",
        )])
        .when(decide_policy(ToolPolicyCommand::SetCategoryPermission {
            category: ToolCategory::ReadOnly,
            state: ToolState::AlwaysAllow,
            current_tools: vec![definition("get", "g1", Some(true))],
            shown: vec![(
                "get".into(),
                ShownSetting {
                    state: ToolState::Blocked,
                    changed: false,
                },
            )],
            decided_at_position: 0,
        }))
        .then([
            Event::CategoryPermissionSet(pb::CategoryPermissionSet {
                user_id: "alice@example.com".into(),
                server_id: id().server_id.to_string(),
                category: ToolCategory::ReadOnly.to_proto() as i32,
                state: ToolState::AlwaysAllow.to_proto() as i32,
                tool_names: vec!["get".into()],
            }),
            permission_changed(
                "get",
                ToolState::AlwaysAllow,
                "g1",
                ToolState::AlwaysAllow,
                "g1",
            ),
        ]);
    }

    #[test]
    fn confirming_a_tool_the_projection_shows_changed_is_recorded() {
        // The projection folded a discovery that changed `search` and changed it back, which
        // the policy service has not observed yet: the aggregate still holds the user's old
        // setting, unflagged, but the user confirms what the console showed them flagged.
        Scenario::<ToolPolicyState>::given([permission_was_set(
            "search",
            ToolState::NeedsApproval,
            "s1",
        )])
        .when(decide_policy(ToolPolicyCommand::SetToolPermission {
            tool: ToolName::parse("search").unwrap(),
            state: ToolState::NeedsApproval,
            current_definition_hash: Some("s1".into()),
            seen_definition_hash: None,
            shown: Some(ShownSetting {
                state: ToolState::NeedsApproval,
                changed: true,
            }),
            decided_at_position: 0,
        }))
        .then([permission_changed(
            "search",
            ToolState::NeedsApproval,
            "s1",
            ToolState::NeedsApproval,
            "s1",
        )]);
    }

    #[test]
    fn a_setting_records_the_position_of_the_view_it_was_decided_on() {
        let Event::ToolPermissionSet(mut expected) =
            permission_was_set("search", ToolState::AlwaysAllow, "s1")
        else {
            unreachable!()
        };
        expected.decided_at_position = 42;
        Scenario::<ToolPolicyState>::given([])
            .when(decide_policy(ToolPolicyCommand::SetToolPermission {
                tool: ToolName::parse("search").unwrap(),
                state: ToolState::AlwaysAllow,
                current_definition_hash: Some("s1".into()),
                seen_definition_hash: None,
                shown: None,
                decided_at_position: 42,
            }))
            .then([Event::ToolPermissionSet(expected)]);
    }

    #[test]
    fn category_setting_applies_to_the_tools_of_that_category_at_the_time() {
        let tools = vec![
            definition("list", "l1", Some(true)),
            definition("get", "g1", Some(true)),
            definition("create", "c1", Some(false)),
            definition("unhinted", "u1", None),
        ];
        let state = Scenario::<ToolPolicyState>::given([permission_was_set(
            "get",
            ToolState::AlwaysAllow,
            "g1",
        )])
        .when(decide_policy(ToolPolicyCommand::SetCategoryPermission {
            category: ToolCategory::ReadOnly,
            state: ToolState::AlwaysAllow,
            current_tools: tools,
            shown: Vec::new(),
            decided_at_position: 0,
        }))
        .then([
            Event::CategoryPermissionSet(pb::CategoryPermissionSet {
                user_id: "alice@example.com".into(),
                server_id: id().server_id.to_string(),
                category: pb::ToolCategory::ReadOnly as i32,
                state: pb::ToolState::AlwaysAllow as i32,
                tool_names: vec!["list".into(), "get".into()],
            }),
            permission_was_set("list", ToolState::AlwaysAllow, "l1"),
        ]);
        assert_eq!(state.tool_state("list"), ToolState::AlwaysAllow);
        assert_eq!(state.tool_state("create"), ToolState::Blocked);
        assert_eq!(state.tool_state("unhinted"), ToolState::Blocked);
        assert_eq!(
            state.tool_state("later_read_only_tool"),
            ToolState::Blocked,
            "a tool that appears later is not covered"
        );
    }

    #[test]
    fn a_category_setting_confirms_its_changed_tools() {
        let state = Scenario::<ToolPolicyState>::given([
            permission_was_set("list", ToolState::AlwaysAllow, "l1"),
            definition_changed(
                "list",
                "l1",
                "l2",
                ToolState::AlwaysAllow,
                ToolState::NeedsApproval,
            ),
        ])
        .when(decide_policy(ToolPolicyCommand::SetCategoryPermission {
            category: ToolCategory::ReadOnly,
            state: ToolState::NeedsApproval,
            current_tools: vec![definition("list", "l2", Some(true))],
            shown: Vec::new(),
            decided_at_position: 0,
        }))
        .then([
            Event::CategoryPermissionSet(pb::CategoryPermissionSet {
                user_id: "alice@example.com".into(),
                server_id: id().server_id.to_string(),
                category: pb::ToolCategory::ReadOnly as i32,
                state: pb::ToolState::NeedsApproval as i32,
                tool_names: vec!["list".into()],
            }),
            permission_changed(
                "list",
                ToolState::NeedsApproval,
                "l2",
                ToolState::NeedsApproval,
                "l2",
            ),
        ]);
        assert!(state.setting("list").is_some_and(|s| !s.changed));
    }

    #[test]
    fn read_only_hint_alone_never_allows_a_tool() {
        let state = Scenario::<ToolPolicyState>::given([])
            .when(decide_policy(observe(vec![definition(
                "list",
                "l1",
                Some(true),
            )])))
            .then_nothing();
        assert_eq!(state.tool_state("list"), ToolState::Blocked);
    }

    #[test]
    fn write_category_includes_tools_without_a_read_only_hint() {
        let (events, state) = Scenario::<ToolPolicyState>::given([])
            .when(decide_policy(ToolPolicyCommand::SetCategoryPermission {
                category: ToolCategory::Write,
                state: ToolState::NeedsApproval,
                current_tools: vec![
                    definition("list", "l1", Some(true)),
                    definition("create", "c1", Some(false)),
                    definition("unhinted", "u1", None),
                ],
                shown: Vec::new(),
                decided_at_position: 0,
            }))
            .then_events();
        assert_eq!(events.len(), 3);
        assert_eq!(state.tool_state("create"), ToolState::NeedsApproval);
        assert_eq!(state.tool_state("unhinted"), ToolState::NeedsApproval);
        assert_eq!(state.tool_state("list"), ToolState::Blocked);
    }

    #[test]
    fn category_setting_that_changes_nothing_records_nothing() {
        Scenario::<ToolPolicyState>::given([permission_was_set(
            "list",
            ToolState::AlwaysAllow,
            "l1",
        )])
        .when(decide_policy(ToolPolicyCommand::SetCategoryPermission {
            category: ToolCategory::ReadOnly,
            state: ToolState::AlwaysAllow,
            current_tools: vec![definition("list", "l1", Some(true))],
            shown: Vec::new(),
            decided_at_position: 0,
        }))
        .then_nothing();
        Scenario::<ToolPolicyState>::given([])
            .when(decide_policy(ToolPolicyCommand::SetCategoryPermission {
                category: ToolCategory::ReadOnly,
                state: ToolState::AlwaysAllow,
                current_tools: vec![],
                shown: Vec::new(),
                decided_at_position: 0,
            }))
            .then_nothing();
    }

    #[test]
    fn unknown_tool_states_in_recorded_events_read_as_blocked() {
        let state =
            Scenario::<ToolPolicyState>::given([Event::ToolPermissionSet(pb::ToolPermissionSet {
                user_id: "alice@example.com".into(),
                server_id: id().server_id.to_string(),
                tool_name: "search".into(),
                state: 42,
                definition_hash: "h1".into(),
                ..Default::default()
            })])
            .state()
            .clone();
        assert_eq!(state.tool_state("search"), ToolState::Blocked);
    }
}
