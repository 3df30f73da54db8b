//! Adding servers over HTTP against fixture OAuth/MCP servers over real TLS: each
//! registration mode, each refusal with its code, the secret kept out of events and answers.
use serde_json::{Value, json};

use crate::support::{STORES, Store, WithFixture, app_with_fixture, app_with_fixture_for};
use testkit::OAuthFixture;

const SECRET: &str = "fixture-secret-do-not-leak";

async fn post(setup: &WithFixture, path: &str, body: Value) -> (u16, Value) {
    let admin = setup.app.token("ada@example.com", &["admin"]);
    let response = setup
        .app
        .client
        .post(format!("{}{path}", setup.app.url))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

/// Every stored event of the config log but the claims on names (`server.name.<slug>`,
/// checked by the tests of names), as proto3 JSON text.
async fn history(setup: &WithFixture) -> Vec<(String, Value)> {
    full_history(setup)
        .await
        .into_iter()
        .filter(|(kind, _)| !kind.starts_with("ServerName"))
        .collect()
}

/// Every stored event of the config log, as proto3 JSON text.
async fn full_history(setup: &WithFixture) -> Vec<(String, Value)> {
    use futures_util::StreamExt;
    let mut events = setup
        .app
        .log
        .read_from(eventlog::LogKind::Config, 1, None)
        .await
        .expect("read");
    let mut out = Vec::new();
    while let Some(event) = events.next().await {
        let event = event.expect("event");
        out.push((
            event.event_type.to_string(),
            serde_json::to_value(&event.envelope).expect("JSON"),
        ));
    }
    out
}

async fn dynamic_registration_records_the_client_and_keeps_the_secret_in_the_vault(store: Store) {
    let setup = app_with_fixture(store, OAuthFixture::default()).await;
    let (status, server) = post(
        &setup,
        "/api/v1/servers",
        json!({"name": "Team Issues", "url": setup.fixture_url, "description": "The team's tracker"}),
    )
    .await;
    assert_eq!(status, 201, "{server}");
    assert_eq!(server["registration_mode"], "dynamic_registration");
    assert_eq!(server["template"], "custom");
    assert_eq!(server["slug"], "team_issues");
    assert_eq!(server["created_by"], "ada@example.com");
    let id = server["id"].as_str().expect("id").to_owned();

    let all = full_history(&setup).await;
    let types: Vec<&str> = all.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        ["ServerNameClaimed", "ServerAdded", "ServerClientRegistered"],
        "the name claimed, then one atomic add"
    );
    assert_eq!(all[0].1["serverNameClaimed"]["serverId"], id.as_str());
    assert_eq!(all[0].1["serverNameClaimed"]["slug"], "team_issues");
    let events = history(&setup).await;
    let registered = &events[1].1["serverClientRegistered"];
    assert_eq!(registered["clientId"], "fixture-client-1");
    assert_eq!(
        registered["clientSecretRef"],
        format!("server/{id}/client_secret")
    );
    let origin = setup.fixture_url.trim_end_matches("/mcp");
    assert_eq!(registered["authorizationServer"]["issuer"], origin);
    assert_eq!(registered["resource"], setup.fixture_url);
    let everything = format!("{events:?}{server}");
    assert!(
        !everything.contains(SECRET),
        "the client secret leaked into an event or answer"
    );
    let name = vault::SecretName::parse(format!("server/{id}/client_secret")).expect("name");
    let (secret, _) = setup
        .app
        .vault
        .get(&name)
        .await
        .expect("vault")
        .expect("stored");
    assert_eq!(secret.expose_str(), Some(SECRET));
}

#[tokio::test]
async fn dynamic_registration_records_the_client_and_keeps_the_secret_in_the_vault_on_jsonl() {
    dynamic_registration_records_the_client_and_keeps_the_secret_in_the_vault(Store::Jsonl).await;
}

#[tokio::test]
async fn dynamic_registration_records_the_client_and_keeps_the_secret_in_the_vault_on_jetstream() {
    dynamic_registration_records_the_client_and_keeps_the_secret_in_the_vault(Store::JetStream)
        .await;
}

#[tokio::test]
async fn preconfigured_and_metadata_document_clients() {
    let setup = app_with_fixture(Store::Jsonl, OAuthFixture::default()).await;
    let (status, server) = post(
        &setup,
        "/api/v1/servers",
        json!({"name": "Pre", "url": setup.fixture_url, "client_id": "given-id", "client_secret": "given-secret"}),
    )
    .await;
    assert_eq!(
        (status, server["registration_mode"].as_str()),
        (201, Some("preconfigured")),
        "{server}"
    );
    let own = server["redirect_url"].as_str().expect("redirect_url");
    assert!(
        own.starts_with(&format!("{}/oauth/callback/", setup.app.url)),
        "a pre-registered client has the authorization server's own redirect URL: {own}"
    );

    let cimd = app_with_fixture(
        Store::Jsonl,
        OAuthFixture {
            client_id_metadata_document: true,
            ..OAuthFixture::default()
        },
    )
    .await;
    let (status, server) = post(
        &cimd,
        "/api/v1/servers",
        json!({"name": "Docs", "url": cimd.fixture_url}),
    )
    .await;
    assert_eq!(
        (status, server["registration_mode"].as_str()),
        (201, Some("client_metadata_document")),
        "{server}"
    );
    assert_eq!(
        server["redirect_url"],
        format!("{}/oauth/callback", cimd.app.url),
        "one document for every server: the shared redirect URL"
    );
    let document: Value = cimd
        .app
        .get("/oauth/client-metadata.json", None)
        .await
        .json()
        .await
        .expect("JSON");
    let events = history(&cimd).await;
    assert_eq!(
        events[1].1["serverClientRegistered"]["clientId"],
        document["client_id"]
    );
    assert_eq!(
        document["client_id"],
        format!("{}/oauth/client-metadata.json", cimd.app.url)
    );
    assert_eq!(
        document["redirect_uris"],
        json!([format!("{}/oauth/callback", cimd.app.url)])
    );
}

#[tokio::test]
async fn discovery_tells_the_mode_and_the_redirect_url_when_credentials_are_needed() {
    let setup = app_with_fixture(
        Store::Jsonl,
        OAuthFixture {
            dynamic_registration: false,
            ..OAuthFixture::default()
        },
    )
    .await;
    let (status, found) = post(
        &setup,
        "/api/v1/servers/discover",
        json!({"url": setup.fixture_url}),
    )
    .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["registration_mode"], "manual_credentials_required");
    // The authorization server's own redirect URL: its token endpoint's host and a digest.
    let redirect_url = found["redirect_url"].as_str().expect("redirect_url");
    let key = redirect_url
        .strip_prefix(&format!("{}/oauth/callback/", setup.app.url))
        .expect("the server's own redirect URL");
    let (host, digest) = key.rsplit_once('-').expect("host-digest");
    assert_eq!(host, "fixture.test", "{key}");
    assert!(
        digest.len() == 12 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "{key}"
    );
    let (status, refused) = post(
        &setup,
        "/api/v1/servers",
        json!({"name": "Manual", "url": setup.fixture_url}),
    )
    .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (422, Some("manual_credentials_required"))
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains(redirect_url),
        "{refused}"
    );
    assert!(
        history(&setup).await.is_empty(),
        "discovery and a refused add change nothing"
    );
}

#[tokio::test]
async fn templates_fix_the_url_and_refusals_carry_their_codes() {
    for store in STORES {
        let setup = app_with_fixture(store, OAuthFixture::default()).await;
        let (status, server) = post(
            &setup,
            "/api/v1/servers",
            json!({"name": "Notion", "template": "notion"}),
        )
        .await;
        assert_eq!(
            (status, server["template"].as_str()),
            (201, Some("notion")),
            "{server}"
        );
        assert_eq!(server["url"], setup.fixture_url);
        for (body, status, code) in [
            (
                json!({"name": "Other", "template": "notion", "url": "https://elsewhere.test/mcp"}),
                422,
                "template_url_fixed",
            ),
            (
                json!({"name": "Other", "template": "gitlab"}),
                422,
                "template_unknown",
            ),
            (
                json!({"name": "Other", "template": "custom"}),
                422,
                "url_missing",
            ),
            (
                json!({"name": "NOTION", "template": "notion"}),
                409,
                "server_name_taken",
            ),
            (
                json!({"name": "Other", "url": "http://fixture.test/mcp"}),
                422,
                "url_not_https",
            ),
            (
                json!({"name": "Other", "url": "https://private.test/mcp"}),
                422,
                "address_refused",
            ),
            (
                json!({"name": "Other", "url": setup.fixture_url, "client_secret": "s"}),
                422,
                "client_id_missing",
            ),
            (
                json!({"name": "Other/1", "url": setup.fixture_url}),
                422,
                "server_name_invalid_character",
            ),
            (
                json!({"name": "Other", "url": setup.fixture_url, "colour": 1}),
                400,
                "invalid_body",
            ),
        ] {
            let (got, answer) = post(&setup, "/api/v1/servers", body.clone()).await;
            assert_eq!(
                (got, answer["error"]["code"].as_str()),
                (status, Some(code)),
                "{store:?} {body}: {answer}"
            );
        }
        assert_eq!(
            history(&setup).await.len(),
            2,
            "only the one add was written"
        );
    }
}

#[tokio::test]
async fn servers_whose_oauth_breaks_the_rules_are_refused() {
    for (fixture, code) in [
        (
            OAuthFixture {
                wrong_issuer: true,
                ..OAuthFixture::default()
            },
            "issuer_mismatch",
        ),
        (
            OAuthFixture {
                pkce_s256: false,
                ..OAuthFixture::default()
            },
            "pkce_s256_unsupported",
        ),
        (
            OAuthFixture {
                http_token_endpoint: true,
                ..OAuthFixture::default()
            },
            "endpoint_not_https",
        ),
        (
            OAuthFixture {
                requires_oauth: false,
                ..OAuthFixture::default()
            },
            "server_not_oauth",
        ),
        (
            OAuthFixture {
                redirect_mcp_to: Some("https://private.test/mcp"),
                ..OAuthFixture::default()
            },
            "address_refused",
        ),
    ] {
        let what = format!("{fixture:?}");
        let setup = app_with_fixture(Store::Jsonl, fixture).await;
        let (status, answer) = post(
            &setup,
            "/api/v1/servers",
            json!({"name": "Refused", "url": setup.fixture_url}),
        )
        .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (422, Some(code)),
            "{what}: {answer}"
        );
        assert!(history(&setup).await.is_empty());
    }
}

/// Each catalog provider's template against a fixture reproducing its profile, and the same
/// fixture added as a Custom MCP Server, which stays strict where the provider departs from
/// the specification.
#[tokio::test]
async fn each_provider_template_works_against_its_profile_and_custom_stays_strict() {
    let cases: [(&str, OAuthFixture, Value, &str, Option<&str>); 5] = [
        (
            "atlassian",
            OAuthFixture::atlassian(),
            json!({}),
            "dynamic_registration",
            Some("issuer_mismatch"),
        ),
        (
            "github",
            OAuthFixture::github(),
            json!({"client_id": "gh-app"}),
            "preconfigured",
            None,
        ),
        (
            "notion",
            OAuthFixture::notion(),
            json!({}),
            "dynamic_registration",
            None,
        ),
        (
            "pagerduty",
            OAuthFixture::pagerduty(),
            json!({"client_id": "pd-app", "client_secret": "pd-secret"}),
            "preconfigured",
            None,
        ),
        (
            "slack",
            OAuthFixture::slack(),
            json!({"client_id": "slack-app"}),
            "preconfigured",
            Some("oauth_discovery_refused"),
        ),
    ];
    for (template, fixture, client, mode, custom_refusal) in cases {
        let setup = app_with_fixture_for(Store::Jsonl, fixture, template).await;
        let mut body = json!({"name": template, "template": template});
        let mut custom = json!({"name": format!("{template} custom"), "url": setup.fixture_url});
        for (key, value) in client.as_object().expect("object") {
            body[key] = value.clone();
            custom[key] = value.clone();
        }
        let (status, server) = post(&setup, "/api/v1/servers", body).await;
        assert_eq!(
            (status, server["registration_mode"].as_str()),
            (201, Some(mode)),
            "{template}: {server}"
        );
        assert_eq!(server["template"], template);
        let (status, answer) = post(&setup, "/api/v1/servers", custom).await;
        match custom_refusal {
            Some(code) => assert_eq!(
                (status, answer["error"]["code"].as_str()),
                (422, Some(code)),
                "{template} as custom: {answer}"
            ),
            None => assert_eq!(status, 201, "{template} as custom: {answer}"),
        }
    }
    // GitHub without a client: its template knows there is no dynamic registration.
    let setup = app_with_fixture_for(Store::Jsonl, OAuthFixture::github(), "github").await;
    let (status, answer) = post(
        &setup,
        "/api/v1/servers",
        json!({"name": "GitHub", "template": "github"}),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (422, Some("manual_credentials_required")),
        "{answer}"
    );
}

#[tokio::test]
async fn the_atlassian_template_binds_the_client_to_the_issuer_the_server_names() {
    let setup = app_with_fixture_for(Store::Jsonl, OAuthFixture::atlassian(), "atlassian").await;
    let (status, server) = post(
        &setup,
        "/api/v1/servers",
        json!({"name": "Jira", "template": "atlassian"}),
    )
    .await;
    assert_eq!(status, 201, "{server}");
    let events = history(&setup).await;
    assert_eq!(
        events[1].1["serverClientRegistered"]["authorizationServer"]["issuer"],
        "https://auth.fixture.test"
    );
}

async fn patch(setup: &WithFixture, id: &str, body: Value) -> (u16, Value) {
    let admin = setup.app.token("ada@example.com", &["admin"]);
    let response = setup
        .app
        .client
        .patch(format!("{}/api/v1/servers/{id}", setup.app.url))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

async fn vault_entries(setup: &WithFixture) -> Vec<String> {
    let mut names: Vec<String> = setup
        .app
        .vault
        .names()
        .await
        .expect("names")
        .iter()
        .map(|n| n.as_str().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_pre_registered_clients_credentials_are_replaced_and_only_theirs() {
    let setup = app_with_fixture(Store::Jsonl, OAuthFixture::default()).await;
    let (_, server) = post(
        &setup,
        "/api/v1/servers",
        json!({"name": "Pre", "url": setup.fixture_url, "client_id": "first-id", "client_secret": "first-secret"}),
    )
    .await;
    let id = server["id"].as_str().expect("id").to_owned();
    assert_eq!(
        vault_entries(&setup).await,
        [format!("server/{id}/client_secret")]
    );

    let (status, answer) = patch(
        &setup,
        &id,
        json!({"client_id": "second-id", "client_secret": "second-secret"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let events = history(&setup).await;
    let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "ServerAdded",
            "ServerClientRegistered",
            "ServerUpdated",
            "ServerClientRegistered"
        ]
    );
    let registered = &events[3].1["serverClientRegistered"];
    assert_eq!(registered["clientId"], "second-id");
    let secret_ref = registered["clientSecretRef"]
        .as_str()
        .expect("ref")
        .to_owned();
    assert!(
        secret_ref.starts_with(&format!("server/{id}/client_secret/")),
        "{secret_ref}"
    );
    assert_eq!(
        events[2].1["serverUpdated"]["oauth"]["clientId"],
        "second-id"
    );
    // The new secret is in the vault under the recorded name; the old entry is gone.
    assert_eq!(
        vault_entries(&setup).await,
        std::slice::from_ref(&secret_ref)
    );
    let name = vault::SecretName::parse(secret_ref).expect("name");
    let (secret, _) = setup
        .app
        .vault
        .get(&name)
        .await
        .expect("vault")
        .expect("stored");
    assert_eq!(secret.expose_str(), Some("second-secret"));
    let everything = format!("{events:?}{answer}");
    assert!(!everything.contains("second-secret") && !everything.contains("first-secret"));

    // A dynamically registered client's credentials are not the admin's to edit; nothing
    // is written and no secret is left behind.
    let (_, dynamic) = post(
        &setup,
        "/api/v1/servers",
        json!({"name": "Dyn", "url": setup.fixture_url}),
    )
    .await;
    let dynamic_id = dynamic["id"].as_str().expect("id").to_owned();
    let entries = vault_entries(&setup).await;
    let end = setup
        .app
        .log
        .last_sequence(eventlog::LogKind::Config)
        .await
        .expect("end");
    let (status, refused) = patch(&setup, &dynamic_id, json!({"client_secret": "nope"})).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (422, Some("client_credentials_not_editable"))
    );
    assert_eq!(vault_entries(&setup).await, entries);
    assert_eq!(
        setup
            .app
            .log
            .last_sequence(eventlog::LogKind::Config)
            .await
            .expect("end"),
        end
    );
}

/// A client secret that cannot be one is refused with its own code before anything is
/// registered or stored; a secret given later to a client added without one is sent the way
/// the provider takes it (GitHub: in the request body).
#[tokio::test]
async fn client_secrets_are_checked_and_a_later_one_is_sent_as_the_provider_takes_it() {
    let setup = app_with_fixture_for(Store::Jsonl, OAuthFixture::github(), "github").await;
    for secret in ["", "   ", "line\nbreak", " padded ", &"x".repeat(2_000)] {
        let (status, answer) = post(
            &setup,
            "/api/v1/servers",
            json!({"name": "GitHub", "template": "github", "client_id": "gh-app", "client_secret": secret}),
        )
        .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (422, Some("client_secret_invalid")),
            "{secret:?}: {answer}"
        );
    }
    assert!(history(&setup).await.is_empty());
    assert!(vault_entries(&setup).await.is_empty());

    let (status, server) = post(
        &setup,
        "/api/v1/servers",
        json!({"name": "GitHub", "template": "github", "client_id": "gh-app"}),
    )
    .await;
    assert_eq!(status, 201, "{server}");
    let id = server["id"].as_str().expect("id").to_owned();
    let registered = |events: &[(String, Value)]| {
        events
            .iter()
            .rev()
            .find(|(t, _)| t == "ServerClientRegistered")
            .map(|(_, e)| e["serverClientRegistered"]["tokenEndpointAuthMethod"].clone())
            .expect("registered")
    };
    assert_eq!(registered(&history(&setup).await), "none");
    let (status, refused) = patch(&setup, &id, json!({"client_secret": ""})).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (422, Some("client_secret_invalid"))
    );
    let (status, answer) = patch(&setup, &id, json!({"client_secret": "gh-secret"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(registered(&history(&setup).await), "client_secret_post");
}
