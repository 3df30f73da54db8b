//! Tool states, tool categories and tool definition hashes.
use std::fmt;

use proto::v1 as pb;

use crate::DomainError;

/// What a user lets the AI do with one tool. Every tool starts [`ToolState::Blocked`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ToolState {
    #[default]
    Blocked,
    NeedsApproval,
    AlwaysAllow,
}

impl ToolState {
    /// The API spelling: `blocked`, `needs_approval`, `always_allow`.
    pub fn as_str(self) -> &'static str {
        match self {
            ToolState::Blocked => "blocked",
            ToolState::NeedsApproval => "needs_approval",
            ToolState::AlwaysAllow => "always_allow",
        }
    }

    /// Reads the API spelling.
    pub fn parse(text: &str) -> Result<ToolState, DomainError> {
        match text {
            "blocked" => Ok(ToolState::Blocked),
            "needs_approval" => Ok(ToolState::NeedsApproval),
            "always_allow" => Ok(ToolState::AlwaysAllow),
            _ => Err(DomainError::ToolStateUnspecified),
        }
    }

    /// Reads a state from a *command* (proto enum value): `TOOL_STATE_UNSPECIFIED` and unknown
    /// values are an error, because a user who sends no state has not decided anything.
    pub fn from_proto(value: i32) -> Result<ToolState, DomainError> {
        match pb::ToolState::try_from(value) {
            Ok(pb::ToolState::Blocked) => Ok(ToolState::Blocked),
            Ok(pb::ToolState::NeedsApproval) => Ok(ToolState::NeedsApproval),
            Ok(pb::ToolState::AlwaysAllow) => Ok(ToolState::AlwaysAllow),
            Ok(pb::ToolState::Unspecified) | Err(_) => Err(DomainError::ToolStateUnspecified),
        }
    }

    /// Reads a state from a recorded *event*: `TOOL_STATE_UNSPECIFIED` and values a newer
    /// version may add read as [`ToolState::Blocked`], so that an event this version does not
    /// fully understand can never allow a tool.
    pub fn from_event(value: i32) -> ToolState {
        ToolState::from_proto(value).unwrap_or(ToolState::Blocked)
    }

    pub fn to_proto(self) -> pb::ToolState {
        match self {
            ToolState::Blocked => pb::ToolState::Blocked,
            ToolState::NeedsApproval => pb::ToolState::NeedsApproval,
            ToolState::AlwaysAllow => pb::ToolState::AlwaysAllow,
        }
    }
}

impl From<ToolState> for pb::ToolState {
    fn from(state: ToolState) -> Self {
        state.to_proto()
    }
}

impl TryFrom<pb::ToolState> for ToolState {
    type Error = DomainError;
    fn try_from(state: pb::ToolState) -> Result<Self, DomainError> {
        ToolState::from_proto(state as i32)
    }
}

impl fmt::Display for ToolState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The two groups a user can set at once.
///
/// A tool is [`ToolCategory::ReadOnly`] when its annotations say `readOnlyHint: true`, else
/// [`ToolCategory::Write`]. The hint comes from the server and is only used to *group* tools
/// for a bulk setting; it never allows a tool by itself (a tool is allowed only by a state the
/// user set), and a missing hint counts as write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToolCategory {
    ReadOnly,
    Write,
}

impl ToolCategory {
    pub fn of(definition: &pb::ToolDefinition) -> ToolCategory {
        let read_only = definition
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.read_only_hint)
            .unwrap_or(false);
        if read_only {
            ToolCategory::ReadOnly
        } else {
            ToolCategory::Write
        }
    }

    /// The API spelling: `read_only`, `write_delete` (write covers every tool that is not
    /// read-only, deleting ones included).
    pub fn as_str(self) -> &'static str {
        match self {
            ToolCategory::ReadOnly => "read_only",
            ToolCategory::Write => "write_delete",
        }
    }

    pub fn parse(text: &str) -> Result<ToolCategory, DomainError> {
        match text {
            "read_only" => Ok(ToolCategory::ReadOnly),
            "write_delete" => Ok(ToolCategory::Write),
            _ => Err(DomainError::ToolCategoryUnspecified),
        }
    }

    /// `TOOL_CATEGORY_UNSPECIFIED` and unknown values are an error.
    pub fn from_proto(value: i32) -> Result<ToolCategory, DomainError> {
        match pb::ToolCategory::try_from(value) {
            Ok(pb::ToolCategory::ReadOnly) => Ok(ToolCategory::ReadOnly),
            Ok(pb::ToolCategory::Write) => Ok(ToolCategory::Write),
            Ok(pb::ToolCategory::Unspecified) | Err(_) => Err(DomainError::ToolCategoryUnspecified),
        }
    }

    pub fn to_proto(self) -> pb::ToolCategory {
        match self {
            ToolCategory::ReadOnly => pb::ToolCategory::ReadOnly,
            ToolCategory::Write => pb::ToolCategory::Write,
        }
    }
}

impl From<ToolCategory> for pb::ToolCategory {
    fn from(category: ToolCategory) -> Self {
        category.to_proto()
    }
}

impl TryFrom<pb::ToolCategory> for ToolCategory {
    type Error = DomainError;
    fn try_from(category: pb::ToolCategory) -> Result<Self, DomainError> {
        ToolCategory::from_proto(category as i32)
    }
}

impl fmt::Display for ToolCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// SHA-256 (lowercase hex) over everything in a tool definition the AI or the user sees:
/// name, title, description, input and output schema, annotations. Each field is
/// length-prefixed, so no two definitions share a hash by moving text between fields. The
/// `definition_hash` field itself is not hashed.
///
/// The schema texts are hashed as given: pass them in one canonical form (e.g. serialised from
/// a `serde_json::Value`, whose object keys are sorted). A different spelling of the same
/// schema errs on the safe side: it counts as a changed definition.
pub fn tool_definition_hash(definition: &pb::ToolDefinition) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut text_field = |text: &str| {
        context.update(&(text.len() as u64).to_be_bytes());
        context.update(text.as_bytes());
    };
    text_field(&definition.name);
    text_field(&definition.title);
    text_field(&definition.description);
    text_field(&definition.input_schema_json);
    text_field(&definition.output_schema_json);
    let annotations = definition.annotations.clone().unwrap_or_default();
    text_field(&annotations.title);
    let hint = |hint: Option<bool>| match hint {
        None => 0u8,
        Some(false) => 1,
        Some(true) => 2,
    };
    context.update(&[
        u8::from(definition.annotations.is_some()),
        hint(annotations.read_only_hint),
        hint(annotations.destructive_hint),
        hint(annotations.idempotent_hint),
        hint(annotations.open_world_hint),
    ]);
    let digest = context.finish();
    let mut hex = String::with_capacity(64);
    push_hex(&mut hex, digest.as_ref());
    hex
}

/// Appends `bytes` as lowercase hex.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &byte in bytes {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_tool_state_in_a_command_is_an_error_and_in_an_event_is_blocked() {
        assert_eq!(
            ToolState::from_proto(0).map_err(|e| e.code()),
            Err("tool_state_unspecified")
        );
        assert_eq!(
            ToolState::from_proto(99).map_err(|e| e.code()),
            Err("tool_state_unspecified")
        );
        assert_eq!(ToolState::from_event(0), ToolState::Blocked);
        assert_eq!(ToolState::from_event(99), ToolState::Blocked);
        for state in [
            ToolState::Blocked,
            ToolState::NeedsApproval,
            ToolState::AlwaysAllow,
        ] {
            assert_eq!(ToolState::from_proto(state.to_proto() as i32), Ok(state));
            assert_eq!(ToolState::try_from(pb::ToolState::from(state)), Ok(state));
            assert_eq!(ToolState::parse(state.as_str()), Ok(state));
        }
        assert_eq!(ToolState::default(), ToolState::Blocked);
    }

    #[test]
    fn tool_category_conversions() {
        for category in [ToolCategory::ReadOnly, ToolCategory::Write] {
            assert_eq!(
                ToolCategory::from_proto(category.to_proto() as i32),
                Ok(category)
            );
            assert_eq!(ToolCategory::parse(category.as_str()), Ok(category));
        }
        assert_eq!(
            ToolCategory::from_proto(0).map_err(|e| e.code()),
            Err("tool_category_unspecified")
        );
    }

    fn definition(read_only_hint: Option<bool>) -> pb::ToolDefinition {
        pb::ToolDefinition {
            name: "list_issues".into(),
            description: "Lists issues".into(),
            input_schema_json: r#"{"type":"object"}"#.into(),
            annotations: Some(pb::ToolAnnotations {
                read_only_hint,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_an_explicit_read_only_hint_makes_a_tool_read_only() {
        assert_eq!(
            ToolCategory::of(&definition(Some(true))),
            ToolCategory::ReadOnly
        );
        assert_eq!(
            ToolCategory::of(&definition(Some(false))),
            ToolCategory::Write
        );
        assert_eq!(ToolCategory::of(&definition(None)), ToolCategory::Write);
        assert_eq!(
            ToolCategory::of(&pb::ToolDefinition::default()),
            ToolCategory::Write
        );
    }

    #[test]
    fn definition_hash_changes_with_what_the_ai_sees_and_not_with_the_hash_field() {
        let base = definition(Some(true));
        let hash = tool_definition_hash(&base);
        assert_eq!(hash.len(), 64);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));

        let mut same = base.clone();
        same.definition_hash = "anything".into();
        assert_eq!(tool_definition_hash(&same), hash);

        let mut changed = Vec::new();
        let mut d = base.clone();
        d.description.push_str(" and deletes them");
        changed.push(d);
        let mut d = base.clone();
        d.input_schema_json = r#"{"type":"object","properties":{}}"#.into();
        changed.push(d);
        let mut d = base.clone();
        d.annotations = Some(pb::ToolAnnotations {
            read_only_hint: Some(false),
            ..Default::default()
        });
        changed.push(d);
        let mut d = base.clone();
        d.annotations = None;
        changed.push(d);
        // Moving text between fields is a change too.
        let mut d = base.clone();
        d.name = "list_issuesLists".into();
        d.description = " issues".into();
        changed.push(d);
        for d in changed {
            assert_ne!(tool_definition_hash(&d), hash, "{d:?}");
        }
    }
}
