//! The catalog service: which MCP servers an admin can add ([`Catalog`], the templates with
//! their provider profiles) and the commands that change configured servers
//! ([`ServerCommands`]).
mod add;
mod commands;
mod templates;

pub use add::{AddServerInput, EditServerInput, OAuthClientSettings, ServerChangeError};
pub use commands::ServerCommands;
pub use templates::{Allowance, CUSTOM_TEMPLATE, Catalog, DEMO_TEMPLATE, RevocationApi, Template};
