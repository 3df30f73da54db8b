//! Who the caller is, as Switchboard sees them: a console shows what it may offer.
use axum::http::Method;
use serde::Serialize;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{Access, AppState, Caller, Permission, RouteSpec};

pub const ROUTES: &[RouteSpec] = &[RouteSpec::new(Method::GET, "/api/v1/me", Access::SignedIn)];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(me))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Me {
    /// The user id (the token's `sub`).
    pub user: String,
    /// The roles the token names.
    pub roles: Vec<String>,
    /// What those roles grant (roles this server does not know grant nothing).
    pub permissions: Vec<Permission>,
}

/// The signed-in caller, their roles and permissions.
#[utoipa::path(get, path = "/api/v1/me", tag = "me", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller", body = Me),
        (status = 401, description = "Not signed in", body = crate::ErrorBody),
    ))]
async fn me(caller: Caller) -> axum::Json<Me> {
    axum::Json(Me {
        user: caller.user.as_str().to_owned(),
        roles: caller.roles.clone(),
        permissions: caller.permissions.iter().collect(),
    })
}
