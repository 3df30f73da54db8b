//! Switchboard's outbound side. Every request Switchboard makes — OAuth discovery and
//! registration, token requests, MCP calls — goes through [`OutboundClient`], which enforces
//! the outbound rules: HTTPS only (plain HTTP only to loopback, and only when allowed), every
//! resolved address checked and the connection made to the checked address (no DNS
//! rebinding), redirects followed hop by hop under the same rules, time-outs and a response
//! size cap.
//!
//! The MCP client ([`McpSession`]) and the OAuth flows run on `rmcp` over this client;
//! token revocation ([`revoke_tokens`]) on `oauth2`.
mod discovery;
mod oauth_http;
mod outbound;
mod revocation;
mod session;

pub use discovery::{Allowance, Discovered, DiscoveryError, RegistrationPlan, discover};
pub use oauth_http::GuardedOAuthHttp;
pub use outbound::{
    AddressClass, OutboundClient, OutboundError, OutboundPolicy, OutboundRequest, OutboundResponse,
    Resolver, StaticResolver, SystemResolver, classify,
};
pub use revocation::{
    ClientAuthentication, RevocationError, RevocationMethod, TokensToRevoke, revoke_tokens,
};
pub use rmcp::model::ProtocolVersion;
pub use rmcp::transport::auth::AuthorizationManager;
pub use session::{McpCallError, McpSession, ProtocolEra, ProtocolEras, list_tools};
