//! The whole story through the binary, over HTTP, on both stores: `up --demo`; an admin adds a
//! server; a user connects through the demo sign-in page; every tool starts Blocked; the user
//! allows the search and puts write/delete on approval; the search completes (untrusted); the
//! delete waits, another user can neither see nor decide it, the owner approves it; the same
//! id again gives the same outcome without a second call; a disabled server rejects; the user
//! disconnects (revoked); the server is deleted; the audit log, over HTTP and through `audit
//! replay`, shows every step and who did it; no secret the demo issued is anywhere.
use super::token;
use std::path::Path;

use serde_json::{Value, json};

use super::demo::{
    assert_no_demo_secret, client, connect, connection_status, files_under, stop, up_demo,
};

async fn call(
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = client().request(method, url).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn invoke(url: &str, token: &str, id: &str, tool: &str, arguments: Value) -> Value {
    let (code, body) = call(
        reqwest::Method::POST,
        &format!("{url}/api/v1/invocations"),
        token,
        Some(json!({"invocation_id": id, "tool": tool, "arguments": arguments})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    body
}

async fn tool_calls(stats_url: &str) -> Value {
    let (_, stats) = call(reqwest::Method::GET, stats_url, "", None).await;
    stats["tool_calls"].clone()
}

#[tokio::test]
async fn the_whole_story_through_the_binary_on_both_stores() {
    story_on(&[], None).await;
    let global = crate::on_shared_jetstream("story");
    story_on(&global, Some(testkit::shared_nats().store_dir())).await;
}

async fn story_on(global: &[String], nats_store: Option<&Path>) {
    use reqwest::Method;
    let dir = tempfile::tempdir().expect("tempdir");
    let (up, lines, seen, stdout, url) = up_demo(dir.path(), global);
    let admin = token(dir.path(), "admin@example.com", "admin");
    let alice = token(dir.path(), "alice@example.com", "analyst");
    let bob = token(dir.path(), "bob@example.com", "analyst");

    // An admin adds a server from the catalog's demo tile.
    let (code, server) = call(
        Method::POST,
        &format!("{url}/api/v1/servers"),
        &admin,
        Some(json!({"name": "Tracker", "template": "demo"})),
    )
    .await;
    assert_eq!(code, 201, "{server}");
    let id = server["id"].as_str().expect("id").to_owned();
    let stats_url = server["url"]
        .as_str()
        .expect("url")
        .replace("/mcp", "/demo/stats");

    // Alice connects through the sign-in page: healthy, four tools, every one Blocked.
    let (code, page) = connect(&url, &id, &alice, "allow").await;
    assert_eq!(code, 200, "{page}");
    let status = connection_status(&url, &id, &alice).await;
    assert_eq!(status["status"], "healthy", "{status}");
    let (_, tools) = call(
        Method::GET,
        &format!("{url}/api/v1/servers/{id}/tools"),
        &alice,
        None,
    )
    .await;
    let tools = tools["tools"].as_array().expect("tools").clone();
    assert_eq!(tools.len(), 4);
    assert!(tools.iter().all(|t| t["state"] == "blocked"), "{tools:?}");

    // The search always, write/delete on approval.
    let (code, body) = call(
        Method::PUT,
        &format!("{url}/api/v1/servers/{id}/tools/search_issues"),
        &alice,
        Some(json!({"state": "always_allow"})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = call(
        Method::PUT,
        &format!("{url}/api/v1/servers/{id}/categories/write_delete"),
        &alice,
        Some(json!({"state": "needs_approval"})),
    )
    .await;
    assert_eq!(code, 200, "{body}");

    // The search completes; its result is marked untrusted.
    let searched = invoke(
        &url,
        &alice,
        "call_search_1",
        "tracker__search_issues",
        json!({"query": "export"}),
    )
    .await;
    assert_eq!(searched["outcome"], "completed", "{searched}");
    assert_eq!(searched["result"]["untrusted"], true, "{searched}");

    // The delete waits for Alice's approval; Bob neither sees nor decides it.
    let delete = json!({"key": "DEMO-1"});
    let waiting = invoke(
        &url,
        &alice,
        "toolu_delete_1",
        "tracker__delete_issue",
        delete.clone(),
    )
    .await;
    assert_eq!(waiting["outcome"], "awaiting_approval", "{waiting}");
    let (_, bobs) = call(Method::GET, &format!("{url}/api/v1/approvals"), &bob, None).await;
    assert_eq!(bobs["approvals"], json!([]), "{bobs}");
    let (code, refused) = call(
        Method::POST,
        &format!("{url}/api/v1/approvals/toolu_delete_1"),
        &bob,
        Some(json!({"decision": "approve"})),
    )
    .await;
    assert!(code == 404 || code == 403, "{code} {refused}");
    let (_, alices) = call(
        Method::GET,
        &format!("{url}/api/v1/approvals"),
        &alice,
        None,
    )
    .await;
    assert_eq!(
        alices["approvals"].as_array().map(Vec::len),
        Some(1),
        "{alices}"
    );
    assert_eq!(
        tool_calls(&stats_url).await["delete_issue"],
        Value::Null,
        "not called before approval"
    );
    let (code, approved) = call(
        Method::POST,
        &format!("{url}/api/v1/approvals/toolu_delete_1"),
        &alice,
        Some(json!({"decision": "approve"})),
    )
    .await;
    assert_eq!(code, 200, "{approved}");
    let (_, done) = call(
        Method::GET,
        &format!("{url}/api/v1/invocations/toolu_delete_1?wait=10"),
        &alice,
        None,
    )
    .await;
    assert_eq!(done["outcome"], "completed", "{done}");
    // The same id again: the same outcome, the server called once.
    let again = invoke(
        &url,
        &alice,
        "toolu_delete_1",
        "tracker__delete_issue",
        delete,
    )
    .await;
    assert_eq!(again["outcome"], "completed", "{again}");
    assert_eq!(tool_calls(&stats_url).await["delete_issue"], 1);

    // Disabled: the connection shows it and invocations are rejected; then enabled again.
    let (code, _) = call(
        Method::POST,
        &format!("{url}/api/v1/servers/{id}/disable"),
        &admin,
        Some(json!({"reason": "maintenance"})),
    )
    .await;
    assert_eq!(code, 200);
    let status = connection_status(&url, &id, &alice).await;
    assert_eq!(status["status"], "disabled", "{status}");
    let rejected = invoke(
        &url,
        &alice,
        "call_search_2",
        "tracker__search_issues",
        json!({"query": "x"}),
    )
    .await;
    assert_eq!(rejected["outcome"], "rejected", "{rejected}");
    let (code, _) = call(
        Method::POST,
        &format!("{url}/api/v1/servers/{id}/enable"),
        &admin,
        Some(json!({})),
    )
    .await;
    assert_eq!(code, 200);

    // Disconnect: the demo authorization server saw the revocation.
    let (code, disconnected) = call(
        Method::DELETE,
        &format!("{url}/api/v1/servers/{id}/connection"),
        &alice,
        None,
    )
    .await;
    assert_eq!(code, 200, "{disconnected}");
    assert_eq!(disconnected["tokens_revoked"], true);
    let (_, stats) = call(Method::GET, &stats_url, "", None).await;
    assert!(
        !stats["revocations"]
            .as_array()
            .expect("revocations")
            .is_empty(),
        "{stats}"
    );

    // The admin deletes the server.
    let (code, _) = call(
        Method::DELETE,
        &format!("{url}/api/v1/servers/{id}"),
        &admin,
        None,
    )
    .await;
    assert_eq!(code, 204);

    // The audit log over HTTP shows every step, with who did it.
    let (_, audit) = call(
        Method::GET,
        &format!("{url}/api/v1/audit/events?limit=1000"),
        &admin,
        None,
    )
    .await;
    let events = audit["events"].as_array().expect("events").clone();
    let by = |event_type: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["type"] == event_type)
            .map(|e| e["envelope"]["actor"].to_string())
            .collect()
    };
    for (event_type, actor) in [
        ("ServerAdded", "admin@example.com"),
        ("ConnectionStarted", "alice@example.com"),
        ("ConnectionEstablished", "alice@example.com"),
        ("ToolPermissionSet", "alice@example.com"),
        ("InvocationRequested", "alice@example.com"),
        ("InvocationAwaitingApproval", ""),
        ("InvocationApproved", "alice@example.com"),
        ("InvocationCompleted", ""),
        ("ServerDisabled", "admin@example.com"),
        ("InvocationRejected", ""),
        ("ServerEnabled", "admin@example.com"),
        ("ConnectionDisconnected", "alice@example.com"),
        ("ServerDeleted", "admin@example.com"),
    ] {
        let actors = by(event_type);
        assert!(!actors.is_empty(), "no {event_type} in the audit log");
        assert!(
            actors.iter().any(|a| a.contains(actor)),
            "{event_type} by {actor}: {actors:?}"
        );
    }

    let (log, printed) = stop(up, lines, stdout);
    // `audit replay` through the binary shows the same steps.
    let mut replay_args: Vec<String> = global.to_vec();
    replay_args.extend(["audit".to_owned(), "replay".to_owned()]);
    let replay_args: Vec<&str> = replay_args.iter().map(String::as_str).collect();
    let replay = super::switchboard(dir.path(), &replay_args);
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let replayed = String::from_utf8_lossy(&replay.stdout).into_owned();
    for event_type in [
        "ServerAdded",
        "ConnectionEstablished",
        "InvocationApproved",
        "InvocationCompleted",
        "ConnectionDisconnected",
        "ServerDeleted",
    ] {
        assert!(
            replayed.contains(event_type),
            "audit replay lacks {event_type}"
        );
    }

    // No secret the demo authorization server issued, anywhere.
    for (what, bytes) in [
        ("the log", seen + &log),
        ("the output", printed),
        ("the replay", replayed),
    ] {
        assert_no_demo_secret(what, bytes.as_bytes());
    }
    let mut files = Vec::new();
    files_under(dir.path(), &mut files);
    if let Some(store) = nats_store {
        files_under(store, &mut files);
    }
    for (path, bytes) in &files {
        assert_no_demo_secret(&path.display().to_string(), bytes);
    }

    // Started again, it answers a look-up of the search with its result, not only the
    // outcome: the stopping process handed the results it held over in the vault.
    assert!(log.contains("results handed over"), "{log}");
    let (up, lines, seen, stdout, url) = up_demo(dir.path(), global);
    let (code, looked_up) = call(
        Method::GET,
        &format!("{url}/api/v1/invocations/call_search_1"),
        &alice,
        None,
    )
    .await;
    assert_eq!(code, 200, "{looked_up}\n{seen}");
    assert_eq!(looked_up["outcome"], "completed");
    assert_eq!(looked_up["result"], searched["result"], "{looked_up}");
    stop(up, lines, stdout);
}
