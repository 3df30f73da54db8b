//! `switchboard up` serving the HTTP API, end to end through the binary: tokens from
//! `switchboard token`, HTTPS with a throw-away CA, the printed configuration, and a graceful
//! shutdown under load followed by a restart from the checkpoints.
use super::token;
use std::{
    io::BufRead,
    path::Path,
    process::{Child, ChildStderr, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use eventlog::jsonl::{JsonlLog, JsonlOptions};
use proto::v1::{ServerAdded, envelope::Event};

type Lines = std::io::Lines<std::io::BufReader<ChildStderr>>;

/// Starts `switchboard up` on a free port; returns it, its log and the URL it serves.
pub(super) fn serve(
    data_dir: &Path,
    env: &[(&str, &str)],
    up_args: &[&str],
) -> (Child, Lines, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("up")
        .args(up_args)
        .env_remove("SWITCHBOARD_VAULT_KEYS")
        .env_remove("SWITCHBOARD_NATS_URL")
        .env_remove("SWITCHBOARD_JWT_SECRET")
        .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start switchboard up");
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let (_, url) = super::read_listening_url(&mut lines);
    (child, lines, url)
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    child.wait().expect("wait for switchboard")
}

#[tokio::test]
async fn up_serves_the_api_and_token_signs_with_the_generated_secret() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut up, _log, url) = serve(dir.path(), &[], &[]);
    let secret = dir.path().join("jwt.secret");
    assert_eq!(
        std::fs::metadata(&secret)
            .expect("secret file")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let token = token(dir.path(), "alice@example.com", "admin");
    let client = testkit::http_client().build().expect("client");
    let me: serde_json::Value = client
        .get(format!("{url}/api/v1/me"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON");
    assert_eq!(me["user"], "alice@example.com");
    assert_eq!(me["roles"], serde_json::json!(["admin"]));
    let ready = client
        .get(format!("{url}/readyz"))
        .send()
        .await
        .expect("request");
    assert_eq!(ready.status(), 200);
    // A token signed with another secret is refused.
    let foreign = gateway::auth::mint_token(
        b"some-other-secret",
        &gateway::auth::TokenRequest {
            user: "alice@example.com",
            roles: &["admin".to_owned()],
            ttl: std::time::Duration::from_secs(60),
            issuer: None,
            audience: None,
            roles_claim: "roles",
        },
    )
    .expect("token");
    let refused = client
        .get(format!("{url}/api/v1/me"))
        .bearer_auth(foreign)
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), 401);
    assert!(terminate(&mut up).success());
}

#[tokio::test]
async fn up_serves_https_with_a_certificate_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = testkit::TestCa::new();
    let (cert, key) = ca.issue(&["127.0.0.1", "localhost"]).write_to(dir.path());
    let (mut up, _log, url) = serve(
        dir.path(),
        &[],
        &[
            "--tls-cert",
            cert.to_str().expect("path"),
            "--tls-key",
            key.to_str().expect("path"),
        ],
    );
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let client = testkit::http_client()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).expect("CA")])
        .build()
        .expect("client");
    let health = client
        .get(format!("{url}/healthz"))
        .send()
        .await
        .expect("HTTPS request");
    assert_eq!(health.status(), 200);
    // A client that does not trust the CA cannot talk to it; neither can plain HTTP.
    let other = testkit::TestCa::new();
    let untrusting = testkit::http_client()
        .tls_certs_only([reqwest::Certificate::from_pem(other.cert_pem().as_bytes()).expect("CA")])
        .build()
        .expect("client");
    assert!(
        untrusting
            .get(format!("{url}/healthz"))
            .send()
            .await
            .is_err()
    );
    let plain = url.replacen("https://", "http://", 1);
    assert!(client.get(format!("{plain}/healthz")).send().await.is_err());
    assert!(terminate(&mut up).success());
}

#[test]
fn config_prints_the_effective_configuration_without_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("switchboard.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:9999\"\n[roles.support]\npermissions = [\"view_and_connect\"]\n",
    )
    .expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--config", file.to_str().expect("path"), "config"])
        .env("SWITCHBOARD_JWT_SECRET", "very-secret-jwt-key")
        .env("SWITCHBOARD_NATS_URL", "nats://ops:pa55word@127.0.0.1:4222")
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("listen = \"127.0.0.1:9999\""), "{stdout}");
    assert!(stdout.contains("[roles.support]"), "{stdout}");
    assert!(stdout.contains("<redacted>"), "{stdout}");
    for secret in ["very-secret-jwt-key", "pa55word", "ops:"] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
    }
}

#[test]
fn an_unknown_setting_is_refused_with_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("switchboard.toml");
    std::fs::write(&file, "[http]\nbody_limt = 10\n").expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--config", file.to_str().expect("path"), "up"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("body_limt"), "{stderr}");
    // And a role naming a permission that does not exist.
    std::fs::write(
        &file,
        "[roles.support]\npermissions = [\"view_everything\"]\n",
    )
    .expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--config", file.to_str().expect("path"), "--data-dir"])
        .arg(dir.path())
        .args(["up"])
        .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("view_everything"), "{stderr}");
}

const EVENTS: usize = 500;

async fn write_servers(data_dir: &Path) {
    let log = JsonlLog::open(&data_dir.join("events"), JsonlOptions::default())
        .await
        .expect("open log");
    for i in 0..EVENTS {
        let id = uuid::Uuid::now_v7().to_string();
        super::append_one(
            &log,
            &format!("server.{id}"),
            super::NOV_1 + i as i64,
            Event::ServerAdded(ServerAdded {
                server_id: id,
                name: format!("Server {i}"),
                slug: format!("server_{i}"),
                ..Default::default()
            }),
        )
        .await;
    }
    log.close().await;
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text.to_lowercase()
}

#[tokio::test]
async fn shutdown_under_load_finishes_in_flight_requests_and_restarts_from_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_servers(dir.path()).await;
    let (mut up, mut log, url) = serve(dir.path(), &[], &[]);
    let token = token(dir.path(), "auditor@example.com", "admin");
    // A new connection per request: once the server stops accepting, a new request is
    // refused at connect; a request the server accepted must get its whole answer.
    let client = testkit::http_client()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let answered = Arc::new(AtomicUsize::new(0));
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (client, url, token, answered, started) = (
            client.clone(),
            url.clone(),
            token.clone(),
            answered.clone(),
            started_tx.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let result = client
                    .get(format!("{url}/api/v1/audit/events?limit=200"))
                    .bearer_auth(&token)
                    .send()
                    .await;
                match result {
                    Ok(response) => {
                        assert_eq!(response.status(), 200);
                        let body: serde_json::Value = response
                            .json()
                            .await
                            .expect("a whole answer, never a cut one");
                        assert_eq!(body["events"].as_array().map(Vec::len), Some(200));
                        if answered.fetch_add(1, Ordering::SeqCst) == 100 {
                            let _ = started.try_send(());
                        }
                    }
                    Err(error) => {
                        // Refused at connect once the listener is closed, or dropped before
                        // any answer began (a connection still in the kernel's accept queue,
                        // or accepted but not yet read when shutdown began): the request was
                        // never handled. What may not happen is an answer cut short; that
                        // would fail the status or body checks above.
                        let chain = error_chain(&error);
                        assert!(
                            error.is_connect()
                                || chain.contains("connection reset")
                                || chain.contains("connection closed before message completed"),
                            "unexpected failure after shutdown: {chain}"
                        );
                        return;
                    }
                }
            }
        }));
    }
    drop(started_tx);
    started_rx.recv().await.expect("load is running");
    let status = tokio::task::spawn_blocking(move || terminate(&mut up))
        .await
        .expect("join");
    for worker in workers {
        worker
            .await
            .expect("worker saw only whole answers and refused connections");
    }
    assert!(status.success(), "{status:?}");
    let rest: Vec<String> = log.by_ref().map_while(Result::ok).collect();
    let rest = rest.join("\n");
    assert!(rest.contains("every connection finished"), "{rest}");
    // Every request the server began was answered, and every answer reached its client whole:
    // the clients' count of whole answers equals the server's count of requests started.
    let answered = answered.load(Ordering::SeqCst);
    assert!(answered > 100);
    assert!(
        rest.contains(&format!("requests started {answered}, answered {answered}")),
        "clients got {answered} whole answers:\n{rest}"
    );

    // The checkpoint saved at shutdown holds the whole log; a restart resumes from it.
    let checkpoint = std::fs::read(
        dir.path()
            .join("checkpoints/server_directory_v2.checkpoint"),
    )
    .expect("checkpoint saved at shutdown");
    assert_eq!(
        u64::from_be_bytes(checkpoint[..8].try_into().expect("8 bytes")),
        EVENTS as u64
    );
    let (mut again, _log, url) = serve(dir.path(), &[], &[]);
    let ready: serde_json::Value = testkit::http_client()
        .build()
        .expect("client")
        .get(format!("{url}/readyz"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON");
    assert_eq!(ready["projections"][0]["position"], EVENTS);
    assert!(terminate(&mut again).success());
}

#[tokio::test]
async fn up_keeps_serving_and_stops_cleanly_after_its_log_output_goes_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut up, log, url) = serve(dir.path(), &[], &[]);
    // The reading end of stderr closes: every later log line fails to write.
    drop(log);
    for _ in 0..3 {
        let health = testkit::http_client()
            .build()
            .expect("client")
            .get(format!("{url}/healthz"))
            .send()
            .await
            .expect("still serving");
        assert_eq!(health.status(), 200);
    }
    let status = tokio::task::spawn_blocking(move || terminate(&mut up))
        .await
        .expect("join");
    assert!(
        status.success(),
        "a closed stderr must not crash the process: {status:?}"
    );
}
