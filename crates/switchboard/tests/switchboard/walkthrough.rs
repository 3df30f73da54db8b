//! The terminal walk-through against a running `switchboard up` and a fixture MCP server with
//! its authorization server (HTTPS on `localhost`, a throw-away CA): `servers`, `connect` (the
//! printed URL followed like a browser), `tools`, `allow`.
use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Output, Stdio},
};

use serde_json::json;

/// The child process, killed when the test ends, also when it fails.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

fn walk(data_dir: &Path, url: &str, token: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("SWITCHBOARD_URL", url)
        .env("SWITCHBOARD_TOKEN", token)
        .env("NO_COLOR", "1")
        .output()
        .expect("run switchboard")
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "switchboard failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `switchboard invoke TOOL ARGUMENTS --id ID` as `token`, with `more` flags; its output.
fn invoke(
    data_dir: &Path,
    url: &str,
    token: &str,
    [tool, arguments, id]: [&str; 3],
    more: &[&str],
) -> String {
    let mut args = vec!["invoke", tool, arguments, "--id", id];
    args.extend_from_slice(more);
    stdout_of(&walk(data_dir, url, token, &args))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_connects_and_sets_tools_from_the_terminal() {
    let ca = testkit::TestCa::new();
    let (router, fixture) = testkit::OAuthFixture::default().start();
    let server = testkit::serve_https(router, &ca.issue(&["localhost"])).await;
    let fixture_url = format!("{}/mcp", server.https_url("localhost"));
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("test-ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).expect("CA file");
    let data_dir = dir.path().join("data");
    let ca_path = ca_file.to_str().expect("path").to_owned();
    let (up, log, url) = super::http::serve(
        &data_dir,
        &[
            ("SWITCHBOARD_ALLOW_LOOPBACK", "true"),
            ("SWITCHBOARD_EXTRA_CA_FILE", &ca_path),
        ],
        &[],
    );
    let mut up = KillOnDrop(up);
    // Drain `up`'s log so that it never blocks on a full pipe; keep it for the secret scan.
    let up_log = std::thread::spawn(move || {
        log.map_while(Result::ok)
            .collect::<Vec<String>>()
            .join("\n")
    });
    let admin = super::token(&data_dir, "admin@example.com", "admin");
    let alice = super::token(&data_dir, "alice@example.com", "analyst");
    let client = testkit::http_client().build().expect("client");
    let added = client
        .post(format!("{url}/api/v1/servers"))
        .bearer_auth(&admin)
        .json(&json!({"name": "Tracker", "url": fixture_url}))
        .send()
        .await
        .expect("add");
    assert_eq!(
        added.status(),
        201,
        "{}",
        added.text().await.unwrap_or_default()
    );

    // Without a token the commands say how to get one.
    let no_token = walk(&data_dir, &url, "", &["servers"]);
    assert!(!no_token.status.success());
    assert!(String::from_utf8_lossy(&no_token.stderr).contains("switchboard token"));

    let listed = stdout_of(&walk(&data_dir, &url, &alice, &["servers"]));
    assert!(
        listed.contains("Tracker") && listed.contains("not_connected"),
        "{listed}"
    );

    // `connect` prints the authorization URL and waits; a browser follows it.
    let mut connect = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["connect", "tracker"])
        .env("SWITCHBOARD_URL", &url)
        .env("SWITCHBOARD_TOKEN", &alice)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("connect");
    let mut printed = BufReader::new(connect.stdout.take().expect("stdout")).lines();
    let authorization_url = printed
        .by_ref()
        .map(|line| line.expect("line"))
        .find_map(|line| {
            line.trim()
                .starts_with("https://")
                .then(|| line.trim().to_owned())
        })
        .expect("the authorization URL is printed");
    let browser = testkit::http_client()
        .tls_certs_only(
            reqwest::Certificate::from_pem_bundle(ca.cert_pem().as_bytes()).expect("CA"),
        )
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("browser");
    let redirect = browser
        .get(&authorization_url)
        .send()
        .await
        .expect("authorize");
    assert_eq!(redirect.status(), 302);
    let callback = redirect.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let (status, page, confirmation) =
        testkit::follow_callback(&browser, &callback, "connect").await;
    assert_eq!(status, 200, "{page}");
    assert!(confirmation.contains("alice@example.com"), "{confirmation}");
    let (rest, status) = tokio::task::spawn_blocking(move || {
        let rest: Vec<String> = printed.map(|line| line.expect("line")).collect();
        (rest, connect.wait().expect("connect ends"))
    })
    .await
    .expect("connect");
    assert!(status.success(), "{rest:?}");
    assert!(
        rest.join("\n").contains("Connected to Tracker: 4 tools"),
        "{rest:?}"
    );

    let tools = stdout_of(&walk(
        &data_dir,
        &url,
        &alice,
        &["tools", "--server", "Tracker"],
    ));
    assert_eq!(
        tools.matches("blocked").count(),
        4,
        "every tool starts Blocked:\n{tools}"
    );
    let allowed = stdout_of(&walk(
        &data_dir,
        &url,
        &alice,
        &["allow", "Tracker", "search_issues", "always"],
    ));
    assert!(
        allowed.contains("tracker__search_issues is now always_allow"),
        "{allowed}"
    );
    let category = stdout_of(&walk(
        &data_dir,
        &url,
        &alice,
        &["allow", "Tracker", "write_delete", "approval", "--category"],
    ));
    assert!(
        category.contains("write_delete: 2 tool(s) now needs_approval"),
        "{category}"
    );
    let tools = stdout_of(&walk(
        &data_dir,
        &url,
        &alice,
        &["tools", "--server", "Tracker"],
    ));
    assert!(tools.contains("always_allow"), "{tools}");
    assert_eq!(
        tools.matches("needs_approval").count(),
        2,
        "create and delete:\n{tools}"
    );
    // Invocations from the terminal: an allowed tool runs, a write waits for approval and
    // is denied.
    let searched = invoke(
        &data_dir,
        &url,
        &alice,
        ["tracker__search_issues", r#"{"query": "first"}"#, "walk_1"],
        &[],
    );
    assert!(searched.contains("completed (walk_1)"), "{searched}");
    assert!(searched.contains("\"untrusted\": true"), "{searched}");
    let waiting = invoke(
        &data_dir,
        &url,
        &alice,
        ["tracker__create_issue", r#"{"title": "x"}"#, "walk_2"],
        &["--wait", "0"],
    );
    assert!(waiting.contains("awaiting approval (walk_2)"), "{waiting}");
    // An orchestrator's invocation for Alice waits for her decision under her name.
    let orchestrator = super::token(&data_dir, "orchestrator", "orchestrator");
    let for_alice = invoke(
        &data_dir,
        &url,
        &orchestrator,
        ["tracker__create_issue", r#"{"title": "y"}"#, "walk_3"],
        &["--user", "alice@example.com", "--wait", "1"],
    );
    assert!(
        for_alice.contains("awaiting approval (walk_3)"),
        "{for_alice}"
    );
    assert!(for_alice.contains("Still awaiting approval"), "{for_alice}");
    let pending = stdout_of(&walk(&data_dir, &url, &alice, &["approvals"]));
    assert!(pending.contains("walk_2"), "{pending}");
    assert!(pending.contains("(write_delete)"), "{pending}");
    assert!(pending.contains("walk_3"), "{pending}");
    let denied = stdout_of(&walk(
        &data_dir,
        &url,
        &alice,
        &["deny", "walk_2", "--reason", "wrong project"],
    ));
    assert!(
        denied.contains("denied (walk_2): denied_by_user: wrong project"),
        "{denied}"
    );
    // The orchestrator no longer wants its request for Alice: it leaves her approvals.
    let withdrawn = stdout_of(&walk(
        &data_dir,
        &url,
        &orchestrator,
        &["withdraw", "walk_3", "--user", "alice@example.com"],
    ));
    assert!(
        withdrawn.contains("denied (walk_3): withdrawn"),
        "{withdrawn}"
    );
    let pending = stdout_of(&walk(&data_dir, &url, &alice, &["approvals"]));
    assert!(!pending.contains("walk_3"), "{pending}");
    let again = walk(
        &data_dir,
        &url,
        &orchestrator,
        &["withdraw", "walk_3", "--user", "alice@example.com"],
    );
    assert!(!again.status.success(), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("invocation_finished"),
        "{again:?}"
    );
    // Approved for good: the tool asks no more.
    let waiting = invoke(
        &data_dir,
        &url,
        &alice,
        ["tracker__create_issue", r#"{"title": "z"}"#, "walk_4"],
        &["--wait", "0"],
    );
    assert!(waiting.contains("awaiting approval (walk_4)"), "{waiting}");
    let approved = stdout_of(&walk(
        &data_dir,
        &url,
        &alice,
        &["approve", "walk_4", "--always"],
    ));
    assert!(approved.contains("completed (walk_4)"), "{approved}");
    assert!(approved.contains("now always_allow"), "{approved}");
    let direct = invoke(
        &data_dir,
        &url,
        &alice,
        ["tracker__create_issue", r#"{"title": "w"}"#, "walk_5"],
        &["--wait", "0"],
    );
    assert!(direct.contains("completed (walk_5)"), "{direct}");
    // Alice's own history: what was done as her, and by whom.
    let history = stdout_of(&walk(&data_dir, &url, &alice, &["history"]));
    assert!(history.contains("ToolPermissionSet"), "{history}");
    let requested = |id: &str| {
        history
            .lines()
            .find(|line| {
                line.contains("InvocationRequested") && line.contains(&format!("invocation {id}"))
            })
            .unwrap_or_else(|| panic!("{id} requested: {history}"))
            .to_owned()
    };
    assert!(
        requested("walk_1").contains("by alice@example.com"),
        "{history}"
    );
    assert!(
        !requested("walk_3").contains("by alice@example.com"),
        "{history}"
    );
    assert!(
        history
            .lines()
            .any(|line| line.contains("InvocationDenied") && line.contains("invocation walk_2")),
        "{history}"
    );
    let narrowed = stdout_of(&walk(
        &data_dir,
        &url,
        &alice,
        &["history", "--type", "InvocationApproved"],
    ));
    assert_eq!(narrowed.lines().count(), 1, "walk_4's approval: {narrowed}");
    // Another user's tools need the orchestrator's permission: refused, not Alice's own
    // tools under Bob's name.
    let theirs = walk(
        &data_dir,
        &url,
        &alice,
        &["tools", "--user", "bob@example.com"],
    );
    assert!(!theirs.status.success(), "{theirs:?}");
    assert!(theirs.stdout.is_empty(), "{theirs:?}");
    assert!(
        String::from_utf8_lossy(&theirs.stderr).contains("HTTP 403"),
        "{theirs:?}"
    );
    // A refusal is said as such, not as a call that may still be running.
    let refused = walk(
        &data_dir,
        &url,
        &alice,
        &[
            "invoke",
            "tracker__search_issues",
            "{}",
            "--user",
            "bob@example.com",
        ],
    );
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("HTTP 403"), "{said}");
    assert!(!said.contains("may still be running"), "{said}");
    let mixed = walk(
        &data_dir,
        &url,
        &alice,
        &["tools", "--user", "bob@example.com", "--server", "Tracker"],
    );
    assert!(!mixed.status.success());
    assert!(String::from_utf8_lossy(&mixed.stderr).contains("does not combine with --server"));
    // A tool the server does not have is named in the error.
    let unknown = walk(
        &data_dir,
        &url,
        &alice,
        &["allow", "Tracker", "nope", "always"],
    );
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("has no tool \"nope\""));
    // Disconnected from the terminal too; connecting again is then possible.
    let gone = stdout_of(&walk(&data_dir, &url, &alice, &["disconnect", "Tracker"]));
    assert!(gone.contains("Disconnected from Tracker"), "{gone}");
    let none = stdout_of(&walk(
        &data_dir,
        &url,
        &alice,
        &["tools", "--server", "Tracker"],
    ));
    assert!(
        none.contains("No tools: connect to a server first"),
        "{none}"
    );
    // Secrets never reach the terminal.
    let everything: String = [listed, tools, allowed, category, gone].concat();
    for secret in fixture.issued_secrets() {
        assert!(!everything.contains(&secret));
    }
    up.stop();
    let up_log = up_log.join().expect("log");
    for secret in fixture.issued_secrets() {
        assert!(!up_log.contains(&secret), "up's log holds an issued secret");
    }
}
