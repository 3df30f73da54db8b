//! Bad input gets a 4xx in the API's error shape, never a 5xx; every answer carries a request
//! id.
use serde_json::Value;

use crate::support::{Store, TestApp};

async fn error_of(response: reqwest::Response) -> (u16, Value, Option<String>) {
    let status = response.status().as_u16();
    let header = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = response.json().await.expect("error body is JSON");
    (status, body, header)
}

#[tokio::test]
async fn bad_input_on_every_route_is_a_4xx_that_says_what_was_wrong() {
    let app = TestApp::start(Store::Jsonl).await;
    let admin = app.token("admin@example.com", &["admin"]);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            app.client.get(format!("{}/nope", app.url)),
            404,
            "not_found",
        ),
        (
            app.client.delete(format!("{}/healthz", app.url)),
            405,
            "method_not_allowed",
        ),
        (
            app.client
                .post(format!("{}/api/v1/me", app.url))
                .bearer_auth(&admin),
            405,
            "method_not_allowed",
        ),
        (
            app.client
                .get(format!("{}/api/v1/audit/events?limit=abc", app.url))
                .bearer_auth(&admin),
            400,
            "invalid_query",
        ),
        (
            app.client
                .get(format!("{}/api/v1/audit/events?limit=0", app.url))
                .bearer_auth(&admin),
            400,
            "invalid_query",
        ),
        (
            app.client
                .get(format!("{}/api/v1/audit/events?colour=red", app.url))
                .bearer_auth(&admin),
            400,
            "invalid_query",
        ),
        (
            app.client
                .get(format!("{}/api/v1/audit/events?since=yesterday", app.url))
                .bearer_auth(&admin),
            400,
            "invalid_query",
        ),
        (
            app.client
                .get(format!("{}/api/v1/audit/events?subject=server..x", app.url))
                .bearer_auth(&admin),
            400,
            "invalid_query",
        ),
        (
            app.client
                .get(format!("{}/api/v1/audit/events?cursor=zzz", app.url))
                .bearer_auth(&admin),
            400,
            "invalid_query",
        ),
        (
            // One past it would overflow: the next position must exist.
            app.client
                .get(format!(
                    "{}/api/v1/audit/events?cursor=18446744073709551615-0",
                    app.url
                ))
                .bearer_auth(&admin),
            400,
            "invalid_query",
        ),
        (
            app.client
                .get(format!("{}/api/v1/audit/events?from=3", app.url))
                .bearer_auth(&admin),
            400,
            "invalid_query",
        ),
        (
            app.client
                .get(format!("{}/api/v1/audit/events?server=not-a-uuid", app.url))
                .bearer_auth(&admin),
            400,
            "invalid_query",
        ),
        (
            app.client
                .get(format!("{}/api/v1/stream", app.url))
                .bearer_auth(&admin)
                .header("last-event-id", "x"),
            400,
            "invalid_last_event_id",
        ),
        (
            app.client
                .get(format!("{}/api/v1/stream", app.url))
                .bearer_auth(&admin)
                .header("last-event-id", "0-18446744073709551615"),
            400,
            "invalid_last_event_id",
        ),
        (
            app.client
                .get(format!("{}/api/v1/me", app.url))
                .bearer_auth(&admin)
                .body(vec![b'x'; 2 * 1024 * 1024]),
            200,
            "",
        ),
    ];
    for (request, status, code) in cases {
        let request = request.build().expect("request");
        let what = format!("{} {}", request.method(), request.url());
        let response = app.client.execute(request).await.expect("send");
        if status == 200 {
            // A body on a route that takes none is ignored, never a 5xx.
            assert_eq!(response.status(), 200, "{what}");
            continue;
        }
        let (got, body, header) = error_of(response).await;
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(
            !body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "{what}: {body}"
        );
        assert_eq!(
            body["error"]["request_id"].as_str(),
            header.as_deref(),
            "{what}"
        );
    }
}

#[tokio::test]
async fn a_request_id_sent_is_kept_and_one_is_made_otherwise() {
    let app = TestApp::start(Store::Jsonl).await;
    let response = app
        .client
        .get(format!("{}/healthz", app.url))
        .header("x-request-id", "trace-abc-123")
        .send()
        .await
        .expect("request");
    assert_eq!(response.headers()["x-request-id"], "trace-abc-123");
    let made = app.get("/healthz", None).await;
    let id = made.headers()["x-request-id"].to_str().expect("ASCII");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    // A request id with spaces (it would end up in logs) is replaced.
    let response = app
        .client
        .get(format!("{}/healthz", app.url))
        .header("x-request-id", "two words")
        .send()
        .await
        .expect("request");
    assert_ne!(response.headers()["x-request-id"], "two words");
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_and_events_by_type() {
    let app = TestApp::start(Store::Jsonl).await;
    let admin = app.token("admin@example.com", &["admin"]);
    for _ in 0..3 {
        assert_eq!(app.get("/api/v1/me", Some(&admin)).await.status(), 200);
    }
    assert_eq!(app.get("/api/v1/me", None).await.status(), 401);
    app.append(
        "server.0190f3c4-0000-7000-8000-000000000001",
        crate::support::server_enabled("0190f3c4-0000-7000-8000-000000000001"),
    )
    .await;
    let text = app.get("/metrics", None).await.text().await.expect("text");
    assert!(
        text.contains(
            r#"switchboard_http_requests_total{route="/api/v1/me",method="GET",status="200"} 3"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"switchboard_http_requests_total{route="/api/v1/me",method="GET",status="401"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"switchboard_events_appended_total{type="ServerEnabled"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(
            "switchboard_projection_position{projection=\"server_directory_v2\",log=\"config\"}"
        ),
        "{text}"
    );
    assert!(
        text.contains("switchboard_http_request_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn a_client_that_trickles_its_request_head_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::start_with_options(
        Store::Jsonl,
        crate::support::Options {
            limits: gateway::server::ServeLimits {
                header_read_timeout: std::time::Duration::from_millis(300),
                ..gateway::server::ServeLimits::default()
            },
            ..crate::support::Options::default()
        },
    )
    .await;
    let address = app.url.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("partial head");
    // The head never ends: the server must close the connection on its own.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut rest),
    )
    .await;
    assert!(read.is_ok(), "the server kept a trickling connection open");
    // A well-behaved request on a new connection is answered as usual.
    assert_eq!(app.get("/healthz", None).await.status(), 200);
}
