//! `switchboard up --demo` through the binary: the demo server is added on the first start
//! (once per data directory), a user connects through the demo sign-in page (Allow → Healthy
//! with four tools; Deny → a clear failure), and no secret the demo authorization server
//! issued reaches the output or the data directory.
use super::token;
use std::{
    io::{BufRead, Read},
    path::Path,
    process::{Child, ChildStderr, ChildStdout, Command, Stdio},
};

use serde_json::Value;

pub(super) type Lines = std::io::Lines<std::io::BufReader<ChildStderr>>;

/// `switchboard up --demo` on a free port, after it logged where it listens (the demo server
/// is added before that); returns it, its log so far and later, its stdout and its URL.
pub(super) fn up_demo(
    data_dir: &Path,
    global: &[String],
) -> (Child, Lines, String, ChildStdout, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(global)
        .args(["up", "--demo"])
        .env_remove("SWITCHBOARD_VAULT_KEYS")
        .env_remove("SWITCHBOARD_NATS_URL")
        .env_remove("SWITCHBOARD_JWT_SECRET")
        .env_remove("SWITCHBOARD_ALLOW_LOOPBACK")
        .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start switchboard up --demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let (seen, url) = super::read_listening_url(&mut lines);
    (child, lines, seen, stdout, url)
}

/// Stops `up` with SIGTERM; returns the rest of its log and everything it printed.
pub(super) fn stop(mut child: Child, lines: Lines, mut stdout: ChildStdout) -> (String, String) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    let mut log = String::new();
    for line in lines {
        log.push_str(&line.expect("read stderr"));
        log.push('\n');
    }
    let mut printed = String::new();
    stdout.read_to_string(&mut printed).expect("read stdout");
    assert!(child.wait().expect("wait").success(), "{log}");
    (log, printed)
}

pub(super) fn client() -> reqwest::Client {
    testkit::http_client()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

async fn demo_servers(url: &str, admin: &str) -> Vec<Value> {
    let list: Value = client()
        .get(format!("{url}/api/v1/servers"))
        .bearer_auth(admin)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("JSON");
    list["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .filter(|server| server["template"] == "demo")
        .cloned()
        .collect()
}

/// The `value` of the hidden `request` input of the sign-in page, unescaped.
fn hidden_request(page: &str) -> String {
    let start = page
        .find("name=\"request\" value=\"")
        .expect("the request field")
        + "name=\"request\" value=\"".len();
    let end = start + page[start..].find('"').expect("the value's end");
    page[start..end]
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Starts connecting as `user`, opens the authorization URL like a browser, presses the
/// button `decision` (`allow` or `deny`), follows the redirect to Switchboard's callback;
/// returns the callback's status and page.
pub(super) async fn connect(
    url: &str,
    server_id: &str,
    user: &str,
    decision: &str,
) -> (u16, String) {
    let client = client();
    let response = client
        .post(format!("{url}/api/v1/servers/{server_id}/connection"))
        .bearer_auth(user)
        .send()
        .await
        .expect("connect");
    let body: Value = response.json().await.expect("body");
    assert_eq!(body["status"], "pending", "{body}");
    let authorization_url =
        url::Url::parse(body["authorization_url"].as_str().expect("url")).expect("a URL");
    let page = client
        .get(authorization_url.clone())
        .send()
        .await
        .expect("the sign-in page");
    assert_eq!(page.status(), 200);
    let page = page.text().await.expect("page");
    assert!(
        page.contains(">Allow</button>") && page.contains(">Deny</button>"),
        "{page}"
    );
    let form = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("request", &hidden_request(&page))
        .append_pair("decision", decision)
        .finish();
    let decided = client
        .post(authorization_url.join("/authorize/decision").expect("URL"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .expect("decide");
    assert_eq!(decided.status(), 302);
    let location = decided.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    assert!(
        location.starts_with(&format!("{url}/oauth/callback/")),
        "{location}"
    );
    let (status, page, _) = testkit::follow_callback(&client, &location, "connect").await;
    (status, page)
}

pub(super) async fn connection_status(url: &str, server_id: &str, user: &str) -> Value {
    client()
        .get(format!("{url}/api/v1/servers/{server_id}/connection"))
        .bearer_auth(user)
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("JSON")
}

/// Every file under `dir`, read whole.
pub(super) fn files_under(dir: &Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
}

pub(super) fn assert_no_demo_secret(what: &str, bytes: &[u8]) {
    let prefix = demo::SECRET_PREFIX.as_bytes();
    assert!(
        !bytes.windows(prefix.len()).any(|w| w == prefix),
        "{what} holds a secret the demo authorization server issued"
    );
}

#[tokio::test]
async fn up_demo_adds_the_demo_server_and_a_user_connects_through_allow_or_fails_through_deny() {
    // The embedded default (JSONL), then JetStream.
    allow_and_deny_on(&[], None).await;
    let global = crate::on_shared_jetstream("demo");
    allow_and_deny_on(&global, Some(testkit::shared_nats().store_dir())).await;
}

async fn allow_and_deny_on(global: &[String], nats_store: Option<&Path>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (up, lines, seen, stdout, url) = up_demo(dir.path(), global);
    let admin = token(dir.path(), "admin@example.com", "admin");
    let servers = demo_servers(&url, &admin).await;
    assert_eq!(servers.len(), 1, "{servers:?}\n{seen}");
    let server = &servers[0];
    let server_id = server["id"].as_str().expect("id").to_owned();
    let mcp_url = server["url"].as_str().expect("url").to_owned();
    assert!(mcp_url.starts_with("http://127.0.0.1:"), "{mcp_url}");
    assert_eq!(server["slug"], "demo", "{server}");

    // Allow: connected, healthy, four tools.
    let alice = token(dir.path(), "alice@example.com", "analyst");
    let (code, page) = connect(&url, &server_id, &alice, "allow").await;
    assert_eq!(code, 200, "{page}");
    let status = connection_status(&url, &server_id, &alice).await;
    assert_eq!(status["status"], "healthy", "{status}");
    assert_eq!(status["tool_count"], 4, "{status}");

    // Deny: the callback page says what happened, the connection is an authorization error.
    let bob = token(dir.path(), "bob@example.com", "analyst");
    let (code, page) = connect(&url, &server_id, &bob, "deny").await;
    assert_eq!(code, 400, "{page}");
    assert!(page.contains("authorization_denied"), "{page}");
    assert!(page.contains("declined"), "{page}");
    let status = connection_status(&url, &server_id, &bob).await;
    assert_eq!(status["status"], "auth_error", "{status}");

    // The demo's own report: one sign-in allowed, one denied, no tool called yet.
    let stats_url = mcp_url.replace("/mcp", "/demo/stats");
    let stats: Value = client()
        .get(&stats_url)
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("JSON");
    assert_eq!(stats["authorizations_allowed"], 1, "{stats}");
    assert_eq!(stats["authorizations_denied"], 1, "{stats}");
    assert_eq!(stats["tool_calls"], serde_json::json!({}), "{stats}");
    assert_eq!(stats["revocations"], serde_json::json!([]), "{stats}");

    // Disconnecting revokes at the demo authorization server, which reports it.
    let disconnected: Value = client()
        .delete(format!("{url}/api/v1/servers/{server_id}/connection"))
        .bearer_auth(&alice)
        .send()
        .await
        .expect("disconnect")
        .json()
        .await
        .expect("JSON");
    assert_eq!(disconnected["tokens_revoked"], true, "{disconnected}");
    let stats: Value = client()
        .get(&stats_url)
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("JSON");
    let kinds: Vec<&str> = stats["revocations"]
        .as_array()
        .expect("revocations")
        .iter()
        .filter_map(|r| r["token_kind"].as_str())
        .collect();
    assert!(kinds.contains(&"refresh_token"), "{stats}");
    assert!(!kinds.contains(&"unknown"), "{stats}");

    let (log, printed) = stop(up, lines, stdout);
    // What to do next is printed: both tokens and the commands.
    assert!(printed.contains("export SWITCHBOARD_TOKEN=ey"), "{printed}");
    assert!(
        printed.contains("export SWITCHBOARD_ADMIN_TOKEN=ey"),
        "{printed}"
    );
    assert!(printed.contains("switchboard connect demo"), "{printed}");
    for (what, bytes) in [("the log", seen + &log), ("the output", printed)] {
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
}

#[tokio::test]
async fn up_demo_twice_on_one_data_directory_adds_the_demo_server_once_and_it_still_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (up, lines, _, stdout, url) = up_demo(dir.path(), &[]);
    let admin = token(dir.path(), "admin@example.com", "admin");
    let first = demo_servers(&url, &admin).await;
    assert_eq!(first.len(), 1, "{first:?}");
    stop(up, lines, stdout);

    let (up, lines, seen, stdout, url) = up_demo(dir.path(), &[]);
    assert!(seen.contains("not adding it again"), "{seen}");
    let second = demo_servers(&url, &admin).await;
    assert_eq!(second.len(), 1, "{second:?}");
    // Same server, same URL: the demo came back on the ports it saved.
    assert_eq!(second[0]["id"], first[0]["id"]);
    assert_eq!(second[0]["url"], first[0]["url"]);
    // The stored server, its endpoints and its registered client still work: a user connects.
    let server_id = second[0]["id"].as_str().expect("id");
    let alice = token(dir.path(), "alice@example.com", "analyst");
    let (code, page) = connect(&url, server_id, &alice, "allow").await;
    assert_eq!(code, 200, "{page}");
    let status = connection_status(&url, server_id, &alice).await;
    assert_eq!(status["status"], "healthy", "{status}");
    stop(up, lines, stdout);
}
