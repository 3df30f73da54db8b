//! The policy service: what each user lets the AI do with each tool of each server.
//!
//! - [`PolicyCommands`]: a user sets one tool ([`PolicyCommands::set_tool_state`]) or every
//!   tool of a category ([`PolicyCommands::set_category_state`]); load → decide (in
//!   `domain::tool_policy`) → append, through `service_kit::execute`.
//! - [`DefinitionChanges`]: the reaction to `ToolsDiscovered`. It reconciles the user's
//!   settings with the connection's current tool list: an *Always allow* tool whose definition
//!   changed drops to *Needs approval* (`ToolDefinitionChanged`), and the settings of tools the
//!   server no longer offers are forgotten (`ToolPermissionsCleared`). Checkpointed and
//!   idempotent.
//! - [`PolicyError`]: the crate's errors, with their stable codes.
//!
//! What the settings mean for each tool is read from the tool-state projection
//! (`domain::ToolStates`, kept by `service_kit::ReadModels`).
mod commands;
mod error;
mod reactions;

pub use commands::PolicyCommands;
pub use error::PolicyError;
pub use reactions::{DefinitionChanges, REACTION_NAME};
