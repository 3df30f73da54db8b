//! The OpenAPI document is generated from the routes: every route the router serves is in it,
//! with the same method, and it documents nothing the router does not serve.
use std::collections::BTreeSet;

use gateway::routes;
use serde_json::Value;

use crate::support::{Store, TestApp};

#[tokio::test]
async fn the_document_lists_exactly_the_routes_served() {
    let app = TestApp::start(Store::Jsonl).await;
    let response = app.get("/openapi.json", None).await;
    assert_eq!(response.status(), 200);
    let document: Value = response.json().await.expect("JSON");
    assert_eq!(document["openapi"].as_str().map(|v| &v[..3]), Some("3.1"));
    let mut documented = BTreeSet::new();
    for (path, operations) in document["paths"].as_object().expect("paths") {
        for method in operations.as_object().expect("operations").keys() {
            documented.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    let declared: BTreeSet<String> = routes::table()
        .iter()
        .map(|route| format!("{} {}", route.method, route.path))
        .collect();
    assert_eq!(
        documented, declared,
        "OpenAPI document and route table differ"
    );
    // And every declared route is really served: its method is not refused as unknown.
    for route in routes::table() {
        let path = route
            .path
            .replace("{id}", "00000000-0000-7000-8000-000000000001");
        let status = app
            .client
            .request(route.method.clone(), format!("{}{path}", app.url))
            .send()
            .await
            .expect("request")
            .status();
        assert!(
            status != 404 && status != 405,
            "{} {} is declared but not served ({status})",
            route.method,
            route.path
        );
    }
}
