//! The configured servers over HTTP, on both stores: every change is an event by the admin
//! who made it, visible to the next read and to every viewer's stream; bad input is a 4xx
//! that names the rule.
use eventlog::{LogKind, Subject};
use serde_json::{Value, json};

use crate::support::{STORES, SseReader, Store, TestApp};

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value, String) {
    let mut request = app
        .client
        .request(method, format!("{}{path}", app.url))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    let text = response.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).expect("JSON")
    };
    (status, body, request_id)
}

async fn types_of(app: &TestApp, id: &str) -> Vec<(String, String, String)> {
    let history = app
        .log
        .read_aggregate(&Subject::parse(&format!("server.{id}")).expect("subject"))
        .await
        .expect("read");
    history
        .events
        .iter()
        .map(|event| {
            let actor = match event.envelope.actor.as_ref().and_then(|a| a.kind.clone()) {
                Some(proto::v1::actor::Kind::UserId(user)) => user,
                _ => String::new(),
            };
            (
                event.event_type.to_string(),
                actor,
                event.envelope.correlation_id.clone(),
            )
        })
        .collect()
}

async fn admins_change_servers_and_every_change_is_an_event_by_them(store: Store) {
    use reqwest::Method;
    let app = TestApp::start(store).await;
    let admin = app.token("ada@example.com", &["admin"]);
    let id = app.seed_server("Issues").await;
    let path = format!("/api/v1/servers/{id}");

    let (status, renamed, rename_request) = send(
        &app,
        Method::PATCH,
        &path,
        &admin,
        Some(json!({"name": "Prod GitHub", "description": "Code"})),
    )
    .await;
    assert_eq!(status, 200, "{renamed}");
    assert_eq!(
        (renamed["name"].as_str(), renamed["slug"].as_str()),
        (Some("Prod GitHub"), Some("prod_github"))
    );
    assert_eq!(renamed["updated_by"], "ada@example.com");
    // Read-your-writes: the next read shows it.
    let (_, read, _) = send(&app, Method::GET, &path, &admin, None).await;
    assert_eq!(read["description"], "Code");

    let (status, disabled, disable_request) = send(
        &app,
        Method::POST,
        &format!("{path}/disable"),
        &admin,
        Some(json!({"reason": "maintenance"})),
    )
    .await;
    assert_eq!((status, disabled["enabled"].as_bool()), (200, Some(false)));
    let (status, again, _) =
        send(&app, Method::POST, &format!("{path}/disable"), &admin, None).await;
    assert_eq!(
        (status, again["enabled"].as_bool()),
        (200, Some(false)),
        "disabling twice changes nothing"
    );
    let (status, enabled, enable_request) =
        send(&app, Method::POST, &format!("{path}/enable"), &admin, None).await;
    assert_eq!((status, enabled["enabled"].as_bool()), (200, Some(true)));
    let (_, list, _) = send(&app, Method::GET, "/api/v1/servers", &admin, None).await;
    assert_eq!(list["servers"].as_array().map(Vec::len), Some(1));
    assert_eq!(list["servers"][0]["template"], "custom");

    let (status, _, delete_request) = send(&app, Method::DELETE, &path, &admin, None).await;
    assert_eq!(status, 204);
    let (status, gone, _) = send(&app, Method::GET, &path, &admin, None).await;
    assert_eq!(
        (status, gone["error"]["code"].as_str()),
        (404, Some("server_not_found"))
    );
    let (status, twice, _) = send(&app, Method::DELETE, &path, &admin, None).await;
    assert_eq!(
        (status, twice["error"]["code"].as_str()),
        (410, Some("server_deleted"))
    );
    let (_, list, _) = send(&app, Method::GET, "/api/v1/servers", &admin, None).await;
    assert_eq!(list["servers"].as_array().map(Vec::len), Some(0));

    let ada = "ada@example.com".to_owned();
    assert_eq!(
        types_of(&app, &id).await[1..],
        [
            ("ServerUpdated".to_owned(), ada.clone(), rename_request),
            ("ServerDisabled".to_owned(), ada.clone(), disable_request),
            ("ServerEnabled".to_owned(), ada.clone(), enable_request),
            ("ServerDeleted".to_owned(), ada, delete_request),
        ],
        "one event per change, by the admin, correlated with the request"
    );
}

#[tokio::test]
async fn admins_change_servers_and_every_change_is_an_event_by_them_on_jsonl() {
    admins_change_servers_and_every_change_is_an_event_by_them(Store::Jsonl).await;
}

#[tokio::test]
async fn admins_change_servers_and_every_change_is_an_event_by_them_on_jetstream() {
    admins_change_servers_and_every_change_is_an_event_by_them(Store::JetStream).await;
}

#[tokio::test]
async fn names_descriptions_and_the_url_follow_their_rules() {
    use reqwest::Method;
    let app = TestApp::start(Store::Jsonl).await;
    let admin = app.token("ada@example.com", &["admin"]);
    let _taken = app.seed_server("Prod GitHub").await;
    let id = app.seed_server("Other").await;
    let path = format!("/api/v1/servers/{id}");
    let end_before = app.log.last_sequence(LogKind::Config).await.expect("end");
    for (body, status, code) in [
        (json!({"name": "prod-github"}), 409, "server_name_taken"),
        (json!({"name": "PROD  github"}), 409, "server_name_taken"),
        (
            json!({"name": "bad/name"}),
            422,
            "server_name_invalid_character",
        ),
        (json!({"name": "x".repeat(25)}), 422, "server_name_too_long"),
        (json!({"name": ""}), 422, "server_name_empty"),
        (
            json!({"description": "d".repeat(5000)}),
            422,
            "server_description_too_long",
        ),
        (
            json!({"url": "https://elsewhere.example.com/mcp"}),
            422,
            "server_url_immutable",
        ),
        (json!({"name": 5}), 400, "invalid_body"),
        (json!({"colour": "red"}), 400, "invalid_body"),
    ] {
        let (got, answer, _) = send(&app, Method::PATCH, &path, &admin, Some(body.clone())).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }
    assert_eq!(
        app.log.last_sequence(LogKind::Config).await.expect("end"),
        end_before,
        "nothing refused was written"
    );
}

/// The event types on a name's claim subject.
async fn claim_history(app: &TestApp, slug: &str) -> Vec<(String, String)> {
    app.log
        .read_aggregate(&Subject::parse(&format!("server.name.{slug}")).expect("subject"))
        .await
        .expect("read")
        .events
        .iter()
        .map(|event| {
            let server = match &event.envelope.event {
                Some(proto::v1::envelope::Event::ServerNameClaimed(c)) => c.server_id.clone(),
                Some(proto::v1::envelope::Event::ServerNameReleased(r)) => r.server_id.clone(),
                _ => String::new(),
            };
            (event.event_type.to_string(), server)
        })
        .collect()
}

/// Two admins adding or renaming to clashing names at once both find the name free in the
/// directory: the claim on the name decides. Here the other admin's change is as far as its
/// claim (stored by another process a moment ago), its server not yet recorded.
#[tokio::test]
async fn a_name_claimed_by_a_change_in_flight_is_taken_until_its_claim_lapses() {
    use reqwest::Method;
    let app = TestApp::start(Store::Jsonl).await;
    let admin = app.token("ada@example.com", &["admin"]);
    let id = app.seed_server("Other").await;
    let second = app.seed_server("Second").await;
    let path = format!("/api/v1/servers/{id}");
    let in_flight = domain::ServerId::new().to_string();
    let claim = |server: &str, age: std::time::Duration| {
        proto::v1::envelope::Event::ServerNameClaimed(proto::v1::ServerNameClaimed {
            slug: "prod_github".into(),
            server_id: server.to_owned(),
            name: "Prod GitHub".into(),
            claimed_at: Some(domain::time::to_timestamp(
                std::time::SystemTime::now() - age,
            )),
        })
    };
    let fresh = std::time::Duration::from_secs(1);
    app.append("server.name.prod_github", claim(&in_flight, fresh))
        .await;
    let (status, refused, _) = send(
        &app,
        Method::PATCH,
        &path,
        &admin,
        Some(json!({"name": "Prod GitHub"})),
    )
    .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (409, Some("server_name_taken")),
        "{refused}"
    );
    // A claim whose server never came (its process died) lapses.
    let lapsed = domain::ServerId::new().to_string();
    app.append(
        "server.name.prod_github",
        claim(&lapsed, domain::server_name::CLAIM_GRACE * 2),
    )
    .await;
    let (status, renamed, _) = send(
        &app,
        Method::PATCH,
        &path,
        &admin,
        Some(json!({"name": "Prod GitHub"})),
    )
    .await;
    assert_eq!(
        (status, renamed["slug"].as_str()),
        (200, Some("prod_github"))
    );
    let claimed = ("ServerNameClaimed".to_owned(), id.clone());
    assert_eq!(
        claim_history(&app, "prod_github").await.last(),
        Some(&claimed)
    );
    // Held, the name is refused to the next rename, and given up with the server.
    let second_path = format!("/api/v1/servers/{second}");
    let rename_second = || {
        send(
            &app,
            Method::PATCH,
            &second_path,
            &admin,
            Some(json!({"name": "prod github"})),
        )
    };
    let (status, _, _) = rename_second().await;
    assert_eq!(status, 409);
    let (status, _, _) = send(&app, Method::DELETE, &path, &admin, None).await;
    assert_eq!(status, 204);
    assert_eq!(
        claim_history(&app, "prod_github").await.last(),
        Some(&("ServerNameReleased".to_owned(), id.clone()))
    );
    let (status, renamed, _) = rename_second().await;
    assert_eq!(
        (status, renamed["slug"].as_str()),
        (200, Some("prod_github")),
        "{renamed}"
    );
}

#[tokio::test]
async fn bad_ids_and_bodies_are_4xx_never_5xx() {
    let app = TestApp::start(Store::Jsonl).await;
    let admin = app.token("ada@example.com", &["admin"]);
    let id = app.seed_server("Issues").await;
    let url = |path: &str| format!("{}{path}", app.url);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            app.client.get(url("/api/v1/servers/not-a-uuid")),
            400,
            "server_id_invalid",
        ),
        (
            app.client
                .delete(url("/api/v1/servers/00000000-0000-0000-0000-000000000000")),
            400,
            "server_id_invalid",
        ),
        (
            app.client
                .get(url("/api/v1/servers/0190f3c4-0000-7000-8000-00000000dead")),
            404,
            "server_not_found",
        ),
        (
            app.client.post(url(
                "/api/v1/servers/0190f3c4-0000-7000-8000-00000000dead/enable",
            )),
            404,
            "server_not_found",
        ),
        (
            app.client
                .patch(url(&format!("/api/v1/servers/{id}")))
                .header("content-type", "application/json")
                .body("{\"name\": "),
            400,
            "malformed_json",
        ),
        (
            app.client
                .patch(url(&format!("/api/v1/servers/{id}")))
                .body("{}"),
            415,
            "unsupported_media_type",
        ),
        (
            app.client
                .patch(url(&format!("/api/v1/servers/{id}")))
                .header("content-type", "application/json")
                .body(format!(
                    "{{\"description\": \"{}\"}}",
                    "x".repeat(2 * 1024 * 1024)
                )),
            413,
            "body_too_large",
        ),
        (
            app.client
                .post(url(&format!("/api/v1/servers/{id}/disable")))
                .body("{\"why\": 1}"),
            400,
            "invalid_body",
        ),
        (
            app.client
                .post(url(&format!("/api/v1/servers/{id}/disable")))
                .body("{\"reason\": "),
            400,
            "malformed_json",
        ),
        (
            app.client
                .post(url(&format!("/api/v1/servers/{id}/disable")))
                .body(format!("{{\"reason\": \"{}\"}}", "r".repeat(600))),
            422,
            "disable_reason_invalid",
        ),
    ];
    for (request, status, code) in cases {
        let request = request.bearer_auth(&admin).build().expect("request");
        let what = format!("{} {}", request.method(), request.url().path());
        let response = app.client.execute(request).await.expect("send");
        let got = response.status().as_u16();
        let body: Value = response.json().await.expect("JSON error");
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{what}: {body}"
        );
    }
}

#[tokio::test]
async fn the_catalog_lists_five_providers_and_custom() {
    let app = TestApp::start(Store::Jsonl).await;
    let analyst = app.token("ann@example.com", &["analyst"]);
    let catalog: Value = app
        .get("/api/v1/catalog", Some(&analyst))
        .await
        .json()
        .await
        .expect("JSON");
    let ids: Vec<&str> = catalog["templates"]
        .as_array()
        .expect("templates")
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        [
            "atlassian",
            "github",
            "notion",
            "pagerduty",
            "slack",
            "custom"
        ]
    );
    assert_eq!(
        catalog["templates"][1]["url"],
        "https://api.githubcopilot.com/mcp"
    );
    assert_eq!(
        catalog["templates"][1]["allowances"][0],
        "no_dynamic_registration"
    );
    assert!(catalog["templates"][5]["url"].is_null());
}

#[tokio::test]
async fn server_changes_reach_every_viewers_stream() {
    for store in STORES {
        let app = TestApp::start(store).await;
        let admin = app.token("ada@example.com", &["admin"]);
        let analyst = app.token("ann@example.com", &["analyst"]);
        let id = app.seed_server("Issues").await;
        let mut stream = SseReader::new(
            app.client
                .get(format!("{}/api/v1/stream", app.url))
                .bearer_auth(&analyst)
                .send()
                .await
                .expect("subscribe"),
        );
        let (status, _, _) = send(
            &app,
            reqwest::Method::POST,
            &format!("/api/v1/servers/{id}/disable"),
            &admin,
            None,
        )
        .await;
        assert_eq!(status, 200);
        let event = stream.next().await.expect("the change");
        assert_eq!(event.event, "ServerDisabled", "{store:?}");
        assert_eq!(
            event.data["envelope"]["serverDisabled"]["serverId"],
            id.as_str()
        );
    }
}
