//! What OAuth providers fetch from Switchboard: its client ID metadata document.
use axum::{extract::State, http::Method};
use serde::Serialize;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{Access, AppState, RouteSpec};

pub const ROUTES: &[RouteSpec] = &[RouteSpec::new(
    Method::GET,
    "/oauth/client-metadata.json",
    Access::Public,
)];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(client_metadata))
}

/// An OAuth Client ID Metadata Document: Switchboard as a public client (PKCE, no secret).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ClientMetadataDocument {
    pub client_id: String,
    pub client_name: String,
    pub client_uri: String,
    pub redirect_uris: Vec<String>,
    pub grant_types: Vec<&'static str>,
    pub response_types: Vec<&'static str>,
    pub token_endpoint_auth_method: &'static str,
}

/// Switchboard's client ID metadata document (its URL is its client id).
#[utoipa::path(get, path = "/oauth/client-metadata.json", tag = "oauth",
    responses((status = 200, description = "The document", body = ClientMetadataDocument)))]
async fn client_metadata(State(state): State<AppState>) -> axum::Json<ClientMetadataDocument> {
    let oauth = state.servers.oauth();
    axum::Json(ClientMetadataDocument {
        client_id: oauth.client_metadata_url.clone(),
        client_name: oauth.client_name.clone(),
        client_uri: state.settings.public_url.clone(),
        redirect_uris: vec![oauth.redirect_url.clone()],
        grant_types: vec!["authorization_code", "refresh_token"],
        response_types: vec!["code"],
        token_endpoint_auth_method: "none",
    })
}
