//! The routes, one module per capability, and the one permission table every route declares
//! its access in. The authorization middleware and the permission test read the same table.
use axum::http::Method;
use utoipa_axum::router::OpenApiRouter;

use crate::{AppState, Permission};

pub mod audit;
pub mod connections;
pub mod invocations;
pub mod me;
pub mod oauth;
pub mod servers;
pub mod stream;
pub mod system;
pub mod tools;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, signed in or not (health, metrics, the OpenAPI document, OAuth redirects).
    Public,
    /// Any signed-in caller.
    SignedIn,
    /// A signed-in caller with at least one of these permissions. What a caller sees through
    /// the route (only their own resources, unless a permission says otherwise) is the
    /// handler's business.
    AnyOf(&'static [Permission]),
}

/// One route: method, path (axum syntax, as `MatchedPath` reports it) and access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
}

impl RouteSpec {
    pub const fn new(method: Method, path: &'static str, access: Access) -> Self {
        RouteSpec {
            method,
            path,
            access,
        }
    }
}

/// A server id from a path, or the 400 that says why it is not one.
pub(crate) fn server_id(text: &str) -> Result<domain::ServerId, crate::ApiError> {
    domain::ServerId::parse(text).map_err(|e| crate::ApiError::bad_request(e.code(), e.to_string()))
}

/// A time as the API writes it: RFC 3339, UTC, milliseconds.
pub(crate) fn rfc3339(time: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Every route the API serves, with its access. A capability adds its module's table here.
pub fn table() -> Vec<RouteSpec> {
    [
        system::ROUTES,
        me::ROUTES,
        servers::ROUTES,
        tools::ROUTES,
        connections::ROUTES,
        invocations::ROUTES,
        oauth::ROUTES,
        audit::ROUTES,
        stream::ROUTES,
    ]
    .concat()
}

/// Every capability's routes, with their OpenAPI entries.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(system::router())
        .merge(me::router())
        .merge(servers::router())
        .merge(tools::router())
        .merge(connections::router())
        .merge(invocations::router())
        .merge(oauth::router())
        .merge(audit::router())
        .merge(stream::router())
}
