//! The connection service: each user's own OAuth authorization to each configured server.
//!
//! - [`ConnectionService::start_connection`] → the authorization URL (PKCE S256, a
//!   single-use `state` bound to the user and the server, the RFC 8707 `resource`);
//! - [`ConnectionService::complete_authorization`] → the callback: `state` and `iss`
//!   checked, the code exchanged with the registration's client authentication, the tokens
//!   into the vault, the first tool discovery;
//! - [`ConnectionService::access_token`], [`ConnectionService::with_token`] → a fresh token,
//!   refreshed by one process at a time (`tokens.rs`);
//! - [`ConnectionService::probe`] → health and tool discovery in one `tools/list`;
//! - [`ConnectionService::disconnect`] → revoke at the provider, delete from the vault;
//! - reactions: a deleted server's users disconnected, probes with back-off and jitter,
//!   expired `state` entries swept, a listener per connection for tool-list notices.
//!
//! `rmcp` does the OAuth protocol work (its authorization manager, with its state and
//! credential stores implemented over the vault in `stores.rs`); `mcp` guards every request.
mod answers;
mod commands;
mod discovery;
mod error;
mod reactions;
mod service;
mod stores;
mod tokens;
mod watchers;

pub use commands::{CallbackOutcome, CallbackParams, ConnectionReport, Disconnected};
pub use discovery::{ProbeOutcome, tool_definition};
pub use error::ConnectionError;
pub use reactions::{CascadeHook, SERVER_DELETED_REACTION};
pub use service::{ConnectionService, ConnectionSettings};
