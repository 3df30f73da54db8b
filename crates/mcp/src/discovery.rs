//! OAuth discovery for an MCP server, as the MCP specification (2026-07-28) requires: an
//! unauthenticated request and its `WWW-Authenticate` `resource_metadata`, else the
//! protected-resource metadata well-known URLs (RFC 9728), then the authorization server's
//! metadata (RFC 8414 / OpenID Connect discovery). `rmcp` walks the URLs and checks issuers and
//! resources; this module adds what Switchboard refuses on top (no OAuth, no PKCE `S256`, a
//! plain-HTTP endpoint) and decides the registration mode.
use std::sync::Arc;

use rmcp::transport::auth::{AuthError, AuthorizationManager, AuthorizationMetadataSource};
use serde::Serialize;
use url::Url;

use crate::{GuardedOAuthHttp, OutboundClient, OutboundError, OutboundRequest};

/// One departure from the specification that a provider is known for. A server gets the
/// allowances of the catalog template it was added from, and no others; each is logged when
/// it changes an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Allowance {
    /// No protected-resource metadata on the MCP endpoint; the root authorization-server
    /// metadata is used.
    NoProtectedResourceMetadata,
    /// The metadata's `issuer` is on another host than the one it was fetched from.
    IssuerOnAnotherHost,
    /// Dynamic registration silently drops the requested `scope`.
    RegistrationDropsScope,
    /// Redirect URIs are matched exactly (no port or path variation).
    ExactRedirectUriMatch,
    /// No dynamic registration: a pre-registered client with a secret is needed.
    NoDynamicRegistration,
    /// The issuer has a path (`https://github.com/login/oauth`).
    PathIssuer,
    /// Tokens are revoked through the provider's REST API, not RFC 7009.
    RevocationThroughRestApi,
    /// Dynamic registration yields a public client (`token_endpoint_auth_method` `none`).
    PublicClientRegistration,
    /// Refresh tokens rotate with two live at once.
    OverlappingRefreshTokens,
    /// Only OpenID Connect discovery is published.
    OpenIdConnectDiscoveryOnly,
    /// The client secret is also needed on refresh.
    SecretOnRefresh,
    /// The well-known metadata URL answers with a 302.
    RedirectedWellKnown,
    /// Tokens are revoked through `auth.revoke`.
    RevocationThroughAuthRevoke,
}

/// How Switchboard gets its OAuth client at the server's authorization server, in the order
/// the MCP specification gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistrationPlan {
    /// The admin gives a client id (and secret).
    Preconfigured,
    /// Switchboard's client ID metadata document URL is its client id.
    ClientMetadataDocument,
    /// RFC 7591 dynamic client registration.
    DynamicRegistration,
    /// None of the above: the admin must register Switchboard with the provider by hand
    /// (with the redirect URL) and give the credentials.
    ManualCredentialsRequired,
}

/// What discovery found.
#[derive(Debug, Clone, Serialize)]
pub struct Discovered {
    /// The protected resource (the server's URL as configured): the RFC 8707 `resource`.
    pub resource: String,
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub registration_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
    /// Scopes to ask for: the challenge's, else the protected resource's, else none.
    pub scopes: Vec<String>,
    pub scopes_supported: Vec<String>,
    pub code_challenge_methods_supported: Vec<String>,
    /// RFC 8414 `token_endpoint_auth_methods_supported` (empty: not published, which means
    /// `client_secret_basic`).
    pub token_endpoint_auth_methods_supported: Vec<String>,
    pub client_id_metadata_document_supported: bool,
    pub authorization_response_iss_parameter_supported: bool,
    /// Found through protected-resource metadata (`false`: the older root fallback).
    pub via_protected_resource_metadata: bool,
    pub registration: RegistrationPlan,
}

/// Why discovery refused a server. Each has a stable code.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Outbound(#[from] OutboundError),
    #[error(
        "the server answered {status} without asking for OAuth; Switchboard connects only to MCP servers that use OAuth 2.0"
    )]
    NotOAuth { status: u16 },
    #[error(
        "the server publishes no OAuth metadata (neither protected-resource nor authorization-server metadata was found)"
    )]
    NoMetadata,
    #[error(
        "the authorization server's metadata names issuer {received}, not {expected} where it was found; refusing it"
    )]
    IssuerMismatch { expected: String, received: String },
    #[error("the authorization server's metadata has no issuer (expected {expected})")]
    IssuerMissing { expected: String },
    #[error("the authorization server does not support PKCE with S256, which Switchboard requires")]
    PkceS256Unsupported,
    #[error("the metadata's {field} is not an https:// URL")]
    EndpointNotHttps { field: &'static str },
    #[error("the protected-resource metadata is not valid: {reason}")]
    InvalidResourceMetadata { reason: String },
    #[error("none of the authorization servers the resource names answered with usable metadata")]
    AuthorizationServersUnavailable,
    /// A metadata request was refused by the discovery rules (e.g. a redirect to another
    /// origin), not failed by the network.
    #[error("OAuth discovery refused the server's metadata: {reason}")]
    Refused { reason: String },
    #[error("OAuth discovery failed: {reason}")]
    Failed { reason: String },
}

impl Discovered {
    /// How a client with (or without) a secret authenticates at this authorization server:
    /// `none` without a secret; with one, `client_secret_basic` (the RFC 7591 default)
    /// unless the server publishes only `client_secret_post`.
    pub fn client_authentication_method(&self, has_secret: bool) -> &'static str {
        domain::client_authentication_method(
            &self.token_endpoint_auth_methods_supported,
            has_secret,
        )
    }
}

impl DiscoveryError {
    pub fn code(&self) -> &'static str {
        match self {
            DiscoveryError::Outbound(OutboundError::AddressRefused { .. }) => "address_refused",
            DiscoveryError::Outbound(OutboundError::NotHttps { .. }) => "url_not_https",
            DiscoveryError::Outbound(_) => "server_unreachable",
            DiscoveryError::NotOAuth { .. } => "server_not_oauth",
            DiscoveryError::NoMetadata => "oauth_metadata_missing",
            DiscoveryError::IssuerMismatch { .. } => "issuer_mismatch",
            DiscoveryError::IssuerMissing { .. } => "issuer_missing",
            DiscoveryError::PkceS256Unsupported => "pkce_s256_unsupported",
            DiscoveryError::EndpointNotHttps { .. } => "endpoint_not_https",
            DiscoveryError::InvalidResourceMetadata { .. } => "resource_metadata_invalid",
            DiscoveryError::AuthorizationServersUnavailable => "authorization_server_unavailable",
            DiscoveryError::Refused { .. } => "oauth_discovery_refused",
            DiscoveryError::Failed { .. } => "oauth_discovery_failed",
        }
    }
}

/// The guard's refusal, when an `rmcp` error was caused by one.
fn outbound_cause<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a OutboundError> {
    let mut source = Some(error);
    while let Some(cause) = source {
        if let Some(outbound) = cause.downcast_ref::<OutboundError>() {
            return Some(outbound);
        }
        source = cause.source();
    }
    None
}

fn from_auth_error(error: AuthError) -> DiscoveryError {
    if let Some(outbound) = outbound_cause(&error) {
        return DiscoveryError::Outbound(match outbound {
            OutboundError::AddressRefused { .. } | OutboundError::NotHttps { .. } => {
                outbound.clone()
            }
            other => OutboundError::Connect {
                host: String::new(),
                reason: other.to_string(),
            },
        });
    }
    match error {
        AuthError::AuthorizationServerMismatch {
            expected_issuer,
            received_issuer,
        } => DiscoveryError::IssuerMismatch {
            expected: expected_issuer,
            received: received_issuer,
        },
        AuthError::AuthorizationServerMissingIssuer { expected_issuer } => {
            DiscoveryError::IssuerMissing {
                expected: expected_issuer,
            }
        }
        AuthError::PkceUnsupported => DiscoveryError::PkceS256Unsupported,
        AuthError::ProtectedResourceMetadataInvalid { .. } => {
            DiscoveryError::InvalidResourceMetadata {
                reason: error.to_string(),
            }
        }
        AuthError::AuthorizationServersUnavailable { .. } => {
            DiscoveryError::AuthorizationServersUnavailable
        }
        // Without an outbound cause (handled above), a failed discovery request is one the
        // discovery rules refused: a redirect to another origin, too many redirects.
        AuthError::DiscoveryRequestFailed { .. } => {
            let mut reason = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                reason.push_str(": ");
                reason.push_str(&cause.to_string());
                source = cause.source();
            }
            DiscoveryError::Refused { reason }
        }
        other => DiscoveryError::Failed {
            reason: other.to_string(),
        },
    }
}

/// An MCP `initialize` request: what a client first sends, and what a server that needs OAuth
/// answers with 401 and its `WWW-Authenticate` challenge.
const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2026-07-28","capabilities":{},"clientInfo":{"name":"switchboard","version":"1"}}}"#;

/// Discovers the OAuth set-up of the MCP server at `server_url`. `preconfigured`: the admin
/// gives a client id. Changes nothing anywhere.
pub async fn discover(
    outbound: &OutboundClient,
    server_url: &Url,
    preconfigured: bool,
    allowances: &[Allowance],
) -> Result<(Discovered, AuthorizationManager), DiscoveryError> {
    let challenge = unauthenticated_challenge(outbound, server_url).await?;
    let http = GuardedOAuthHttp::with_allowances(outbound.clone(), allowances);
    let manager = AuthorizationManager::new_with_oauth_http_client(
        server_url.clone(),
        Arc::new(http.clone()),
    )
    .await
    .map_err(from_auth_error)?;
    let resolution = manager
        .resolve_metadata_from_challenge(challenge.as_deref())
        .await
        .map_err(from_auth_error)?;
    if resolution.source == AuthorizationMetadataSource::LegacyEndpointFallback {
        return Err(DiscoveryError::NoMetadata);
    }
    let metadata = resolution.metadata;
    let endpoint = |field: &'static str, url: &str| -> Result<String, DiscoveryError> {
        let parsed = Url::parse(url).map_err(|_| DiscoveryError::EndpointNotHttps { field })?;
        // The scheme rule of the outbound guard: https, or http to loopback when allowed.
        outbound
            .check_scheme(&parsed)
            .map_err(|_| DiscoveryError::EndpointNotHttps { field })?;
        Ok(url.to_owned())
    };
    let authorization_endpoint =
        endpoint("authorization_endpoint", &metadata.authorization_endpoint)?;
    let token_endpoint = endpoint("token_endpoint", &metadata.token_endpoint)?;
    let registration_endpoint = metadata
        .registration_endpoint
        .as_deref()
        .map(|url| endpoint("registration_endpoint", url))
        .transpose()?;
    let extra_text = |name: &str| {
        metadata
            .additional_fields
            .get(name)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    let extra_flag = |name: &str| {
        metadata
            .additional_fields
            .get(name)
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    };
    let revocation_endpoint = extra_text("revocation_endpoint")
        .map(|url| endpoint("revocation_endpoint", &url))
        .transpose()?;
    let methods = metadata
        .code_challenge_methods_supported
        .clone()
        .unwrap_or_default();
    if !methods.iter().any(|m| m == "S256") {
        return Err(DiscoveryError::PkceS256Unsupported);
    }
    // Under the `IssuerOnAnotherHost` allowance the issuer is the one the server named (the
    // one its `iss` answers will carry); otherwise rmcp has checked it.
    let issuer = match http.accepted_issuer() {
        Some(issuer) => issuer,
        None => metadata
            .issuer
            .clone()
            .ok_or_else(|| DiscoveryError::IssuerMissing {
                expected: String::new(),
            })?,
    };
    let client_id_metadata_document_supported = extra_flag("client_id_metadata_document_supported");
    let no_dynamic_registration = allowances.contains(&Allowance::NoDynamicRegistration);
    let registration = if preconfigured {
        RegistrationPlan::Preconfigured
    } else if client_id_metadata_document_supported {
        RegistrationPlan::ClientMetadataDocument
    } else if registration_endpoint.is_some() && !no_dynamic_registration {
        RegistrationPlan::DynamicRegistration
    } else {
        RegistrationPlan::ManualCredentialsRequired
    };
    let scopes = manager.select_initial_scopes(&[]).await;
    let discovered = Discovered {
        resource: server_url.as_str().to_owned(),
        issuer,
        authorization_endpoint,
        token_endpoint,
        registration_endpoint,
        revocation_endpoint,
        scopes,
        scopes_supported: metadata.scopes_supported.clone().unwrap_or_default(),
        code_challenge_methods_supported: methods,
        token_endpoint_auth_methods_supported: metadata
            .additional_fields
            .get("token_endpoint_auth_methods_supported")
            .and_then(serde_json::Value::as_array)
            .map(|methods| {
                methods
                    .iter()
                    .filter_map(|m| m.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        client_id_metadata_document_supported,
        authorization_response_iss_parameter_supported: extra_flag(
            "authorization_response_iss_parameter_supported",
        ),
        via_protected_resource_metadata: resolution.source
            == AuthorizationMetadataSource::ProtectedResourceMetadata,
        registration,
    };
    let mut manager = manager;
    manager.set_metadata(metadata);
    Ok((discovered, manager))
}

/// Sends an unauthenticated `initialize`; returns the `WWW-Authenticate` challenge of a 401.
/// A server that answers 2xx does not ask for OAuth: refused.
async fn unauthenticated_challenge(
    outbound: &OutboundClient,
    server_url: &Url,
) -> Result<Option<String>, DiscoveryError> {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::ACCEPT,
        http::HeaderValue::from_static("application/json, text/event-stream"),
    );
    let response = outbound
        .send(OutboundRequest {
            method: http::Method::POST,
            url: server_url.clone(),
            headers,
            body: Some(bytes::Bytes::from_static(INITIALIZE.as_bytes())),
            follow_redirects: true,
        })
        .await?;
    if response.status.is_success() {
        return Err(DiscoveryError::NotOAuth {
            status: response.status.as_u16(),
        });
    }
    Ok(response
        .headers
        .get(http::header::WWW_AUTHENTICATE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned))
}
