//! The OpenAPI 3.1 document, assembled from the route modules' annotations: a route and its
//! entry are registered together (`utoipa_axum::routes!`), so the document cannot miss one.
use std::sync::OnceLock;

use utoipa::{
    Modify, OpenApi,
    openapi::security::{Http, HttpAuthScheme, SecurityScheme},
};
use utoipa_axum::router::OpenApiRouter;

use crate::{AppState, routes};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Switchboard",
        description = "Lets an AI act in remote MCP servers on behalf of each user, safely. \
                       Every route but health, metrics and this document needs \
                       `Authorization: Bearer <JWT>`.",
    ),
    components(schemas(crate::ErrorBody, crate::error::ErrorDetail)),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    let router: OpenApiRouter<AppState> =
        OpenApiRouter::with_openapi(ApiDoc::openapi()).merge(routes::router());
    router.split_for_parts().1
}

/// The document as JSON, built once.
pub(crate) fn document_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| document().to_json().unwrap_or_else(|_| "{}".to_owned()))
}
