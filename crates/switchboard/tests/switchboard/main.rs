//! The binary end to end: `audit replay` over a real event log, `vault rotate` and `vault check`
//! over a real vault.
use std::{path::Path, process::Command, sync::Arc};

use eventlog::{
    EventLog, ExpectedVersion, Subject,
    jsonl::{JsonlLog, JsonlOptions},
};
use proto::v1::{Envelope, ServerAdded, ServerDisabled, envelope::Event};

mod demo;
mod http;
mod invocations;
mod story;
mod walkthrough;

/// The global flags that put a command on the shared nats-server, under a fresh prefix.
fn on_shared_jetstream(prefix: &str) -> [String; 4] {
    [
        "--nats".to_owned(),
        testkit::shared_nats().url(),
        "--nats-prefix".to_owned(),
        testkit::unique_name(prefix),
    ]
}

fn switchboard(data_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("SWITCHBOARD_VAULT_KEYS")
        .env_remove("SWITCHBOARD_NATS_URL")
        .output()
        .expect("run switchboard")
}

/// Starts `switchboard up` on `data_dir` and returns it with its log lines, after it has
/// logged that its stores are open (synchronising on its output, not on time); the lines read
/// so far come back too.
fn start_up(
    data_dir: &Path,
    extra_args: &[&str],
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStderr>>,
    String,
) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra_args)
        .arg("up")
        .env_remove("SWITCHBOARD_VAULT_KEYS")
        .env_remove("SWITCHBOARD_NATS_URL")
        .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start switchboard up");
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let seen = read_until(&mut lines, "stores open");
    (child, lines, seen)
}

/// Reads log lines until `up` says where it listens; returns everything read and the URL.
fn read_listening_url(
    lines: &mut std::io::Lines<std::io::BufReader<std::process::ChildStderr>>,
) -> (String, String) {
    let seen = read_until(lines, "listening on ");
    let url = seen
        .lines()
        .find_map(|line| line.split("listening on ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the URL")
        .to_owned();
    (seen, url)
}

/// A bearer token for `user` with `role`, minted by `switchboard token` on `data_dir`.
fn token(data_dir: &Path, user: &str, role: &str) -> String {
    let output = switchboard(
        data_dir,
        &["token", "--user", user, "--role", role, "--ttl", "30m"],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("UTF-8")
        .trim()
        .to_owned()
}

/// Reads log lines until one contains `needle`; returns everything read.
fn read_until(
    lines: &mut std::io::Lines<std::io::BufReader<std::process::ChildStderr>>,
    needle: &str,
) -> String {
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.expect("read stderr");
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(needle) {
            return seen;
        }
    }
    panic!("switchboard up never logged {needle:?}:\n{seen}");
}

fn envelope(seconds: i64, event: Event) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::now_v7().to_string(),
        occurred_at: Some(proto::Timestamp { seconds, nanos: 0 }),
        actor: None,
        correlation_id: String::new(),
        causation_id: String::new(),
        schema_version: proto::SCHEMA_VERSION,
        write_id: String::new(),
        event: Some(event),
    }
}

/// Appends one event at `seconds` to the aggregate `subject`.
async fn append_one(log: &dyn EventLog, subject: &str, seconds: i64, event: Event) {
    log.append(
        &Subject::parse(subject).expect("subject"),
        ExpectedVersion::Any,
        &[envelope(seconds, event)],
    )
    .await
    .expect("append");
}

/// 2026-11-01T00:00:00Z
const NOV_1: i64 = 1_793_491_200;

async fn write_history(data_dir: &Path) {
    let log = JsonlLog::open(&data_dir.join("events"), JsonlOptions::default())
        .await
        .expect("open log");
    for (i, server) in ["s1", "s2"].iter().enumerate() {
        append_one(
            &log,
            &format!("server.{server}"),
            NOV_1 + i as i64 * 86_400,
            Event::ServerAdded(ServerAdded {
                server_id: (*server).to_owned(),
                name: format!("Server {server}"),
                ..Default::default()
            }),
        )
        .await;
    }
    append_one(
        &log,
        "server.s1",
        NOV_1 + 3 * 86_400,
        Event::ServerDisabled(ServerDisabled {
            server_id: "s1".to_owned(),
            reason: "maintenance".to_owned(),
        }),
    )
    .await;
}

fn json_lines(output: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(
        output.status.success(),
        "switchboard failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

#[tokio::test]
async fn audit_replay_prints_the_history_filtered_by_subject_type_and_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_history(dir.path()).await;

    let all = json_lines(&switchboard(dir.path(), &["audit", "replay"]));
    let types: Vec<_> = all
        .iter()
        .map(|l| l["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types, ["ServerAdded", "ServerAdded", "ServerDisabled"]);
    assert_eq!(all[0]["seq"], 1);
    assert_eq!(all[0]["subject"], "server.s1");
    assert_eq!(all[0]["envelope"]["serverAdded"]["name"], "Server s1");
    assert_eq!(all[2]["occurredAt"], "2026-11-04T00:00:00.000Z");

    let s1 = json_lines(&switchboard(
        dir.path(),
        &["audit", "replay", "--subject", "server.s1"],
    ));
    assert_eq!(s1.len(), 2);
    assert!(s1.iter().all(|l| l["subject"] == "server.s1"));

    let disabled = json_lines(&switchboard(
        dir.path(),
        &["audit", "replay", "--type", "ServerDisabled"],
    ));
    assert_eq!(disabled.len(), 1);
    let typo = switchboard(dir.path(), &["audit", "replay", "--type", "ServerDisabeld"]);
    assert!(
        typo.status.success(),
        "an unknown type may be a newer version's"
    );
    assert!(typo.stdout.is_empty());
    assert!(String::from_utf8_lossy(&typo.stderr).contains("not an event type this version knows"));

    let window = json_lines(&switchboard(
        dir.path(),
        &[
            "audit",
            "replay",
            "--since",
            "2026-11-02T00:00:00Z",
            "--until",
            "2026-11-04T00:00:00Z",
        ],
    ));
    assert_eq!(window.len(), 1);
    assert_eq!(window[0]["subject"], "server.s2");

    let table = switchboard(dir.path(), &["audit", "replay", "--format", "table"]);
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout);
    assert_eq!(
        table.lines().count(),
        4,
        "a header and three rows:\n{table}"
    );
    assert!(
        table.contains("ServerDisabled") && table.contains("maintenance"),
        "{table}"
    );
}

#[tokio::test]
async fn audit_replay_shows_events_of_unknown_types() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_history(dir.path()).await;
    // An event written by a newer Switchboard, appended as that version would write it.
    let future = serde_json::json!({
        "seq": 4,
        "subject": "server.s1",
        "type": "ServerRenamedByRobots",
        "envelope": {
            "eventId": uuid::Uuid::now_v7().to_string(),
            "occurredAt": "2026-11-05T00:00:00Z",
            "schemaVersion": 2,
            "serverRenamedByRobots": {"serverId": "s1", "robot": "r2"}
        }
    });
    let path = dir.path().join("events").join("config.jsonl");
    let mut content = std::fs::read_to_string(&path).expect("read log");
    content.push_str(&future.to_string());
    // Its write group's commit mark: without it the record would be an unfinished write.
    content.push_str("\n\n{\"commit\":4}\n");
    std::fs::write(&path, content).expect("write log");

    let lines = json_lines(&switchboard(dir.path(), &["audit", "replay"]));
    assert_eq!(lines.len(), 4, "the unknown event is shown, not dropped");
    assert_eq!(lines[3]["type"], "ServerRenamedByRobots");
    assert_eq!(lines[3]["known"], false);
    assert_eq!(lines[3]["envelope"]["serverRenamedByRobots"]["robot"], "r2");

    let table = switchboard(dir.path(), &["audit", "replay", "--format", "table"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("ServerRenamedByRobots"));
}

/// `--invocation` follows one invocation (its request names the server and the user, its
/// later events only the invocation); `--user` and `--server` narrow as the HTTP audit does.
#[tokio::test]
async fn audit_replay_follows_one_invocation_and_narrows_by_user_and_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = "0190f3c4-0000-7000-8000-0000000000aa";
    {
        let log = JsonlLog::open(&dir.path().join("events"), JsonlOptions::default())
            .await
            .expect("open log");
        let alice = domain::UserId::parse("alice@example.com")
            .expect("user")
            .key();
        let subject = format!("invocation.{alice}");
        for (i, id) in ["toolu_1", "toolu_2"].iter().enumerate() {
            append_one(
                &log,
                &subject,
                NOV_1 + i as i64,
                Event::InvocationRequested(proto::v1::InvocationRequested {
                    invocation_id: (*id).to_owned(),
                    user_id: "alice@example.com".to_owned(),
                    server_id: server.to_owned(),
                    ..Default::default()
                }),
            )
            .await;
        }
        append_one(
            &log,
            &subject,
            NOV_1 + 2,
            Event::InvocationFailed(proto::v1::InvocationFailed {
                invocation_id: "toolu_1".to_owned(),
                error_code: "server_unreachable".to_owned(),
                ..Default::default()
            }),
        )
        .await;
    }
    let one = json_lines(&switchboard(
        dir.path(),
        &["audit", "replay", "--invocation", "toolu_1"],
    ));
    let types: Vec<_> = one
        .iter()
        .map(|l| l["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types, ["InvocationRequested", "InvocationFailed"]);
    let alices = json_lines(&switchboard(
        dir.path(),
        &["audit", "replay", "--user", "alice@example.com"],
    ));
    assert_eq!(alices.len(), 3);
    let bobs = json_lines(&switchboard(
        dir.path(),
        &["audit", "replay", "--user", "bob@example.com"],
    ));
    assert!(bobs.is_empty());
    let requests = json_lines(&switchboard(
        dir.path(),
        &["audit", "replay", "--server", server],
    ));
    assert_eq!(requests.len(), 2, "the server's invocation requests");
}

#[test]
fn audit_replay_explains_bad_filters() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("events")).expect("mkdir");
    let output = switchboard(dir.path(), &["audit", "replay", "--since", "yesterday"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("RFC 3339"));
    let output = switchboard(dir.path(), &["audit", "replay", "--subject", "server.a b"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid subject"));
    let output = switchboard(dir.path(), &["audit", "replay", "--server", "s1"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--server"));
}

#[tokio::test]
async fn vault_rotate_reencrypts_everything_and_retires_the_old_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("vault.keys");
    let secret_text = "gho_plaintext_token_that_must_not_leak";
    let old_key = {
        let keys = vault::KeyRing::load_or_generate(&key_file).expect("key file");
        let old_key = keys.current_key_id().to_string();
        let store = vault::FileStore::open(dir.path().join("vault")).expect("store");
        let v = vault::Vault::new(Arc::new(store), keys);
        for i in 0..5 {
            let name = vault::SecretName::parse(format!("token/s1/user{i}")).expect("name");
            v.put(&name, &vault::Secret::from(secret_text.to_owned()))
                .await
                .expect("put");
        }
        old_key
    };

    let check = switchboard(dir.path(), &["vault", "check"]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let rotate = switchboard(
        dir.path(),
        &["vault", "rotate", "--new-key", "--retire", &old_key],
    );
    let stderr = String::from_utf8_lossy(&rotate.stderr);
    assert!(rotate.status.success(), "{stderr}");
    assert!(stderr.contains("5 re-encrypted"), "{stderr}");
    assert!(!stderr.contains(secret_text));
    let keys = std::fs::read_to_string(&key_file).expect("key file");
    assert!(
        !keys.contains(&old_key),
        "the old key is gone from the key file"
    );

    let check = switchboard(dir.path(), &["vault", "check"]);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "{stderr}");
    assert!(stderr.contains("5 opened"), "{stderr}");
}

#[test]
fn vault_check_reports_an_entry_that_cannot_be_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let keys = vault::KeyRing::load_or_generate(&dir.path().join("vault.keys")).expect("keys");
        let store = vault::FileStore::open(dir.path().join("vault")).expect("store");
        let v = vault::Vault::new(Arc::new(store), keys);
        let name = vault::SecretName::parse("token/s1/alice").expect("name");
        v.put(&name, &vault::Secret::from("x".repeat(40)))
            .await
            .expect("put");
    });
    // Flip one byte of the sealed value at rest.
    let entry = std::fs::read_dir(dir.path().join("vault"))
        .expect("vault dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.') && !n.ends_with(".tmp"))
        })
        .expect("an entry file");
    let mut bytes = std::fs::read(&entry).expect("read entry");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&entry, bytes).expect("write entry");

    let check = switchboard(dir.path(), &["vault", "check"]);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success());
    assert!(
        stderr.contains("token/s1/alice"),
        "the entry is named: {stderr}"
    );
}

#[tokio::test]
async fn audit_servers_shows_the_server_list_as_of_a_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kept, deleted) = (
        uuid::Uuid::now_v7().to_string(),
        uuid::Uuid::now_v7().to_string(),
    );
    {
        let log = JsonlLog::open(&dir.path().join("events"), JsonlOptions::default())
            .await
            .expect("open log");
        for (i, (id, name)) in [(&kept, "Kept"), (&deleted, "Deleted later")]
            .into_iter()
            .enumerate()
        {
            append_one(
                &log,
                &format!("server.{id}"),
                NOV_1 + i as i64,
                Event::ServerAdded(ServerAdded {
                    server_id: id.clone(),
                    name: name.to_owned(),
                    slug: name.to_lowercase().replace(' ', "_"),
                    enabled: true,
                    ..Default::default()
                }),
            )
            .await;
        }
        append_one(
            &log,
            &format!("server.{deleted}"),
            NOV_1 + 10,
            Event::ServerDeleted(proto::v1::ServerDeleted {
                server_id: deleted.clone(),
                ..Default::default()
            }),
        )
        .await;
        log.close().await;
    }

    let before = json_lines(&switchboard(dir.path(), &["audit", "servers", "--at", "2"]));
    let mut names: Vec<_> = before
        .iter()
        .map(|l| l["name"].as_str().unwrap_or(""))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["Deleted later", "Kept"]);
    assert!(before.iter().all(|l| l["asOfSeq"] == 2));

    let now = json_lines(&switchboard(dir.path(), &["audit", "servers"]));
    assert_eq!(now.len(), 1);
    assert_eq!(now[0]["serverId"], kept.as_str());
    assert_eq!(now[0]["asOfSeq"], 3);
}

#[test]
fn up_on_the_embedded_default_creates_its_key_file_and_says_so() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, _lines, seen) = start_up(dir.path(), &[]);
    child.kill().expect("stop switchboard");
    let _ = child.wait();

    let key_file = dir.path().join("vault.keys");
    let mode = std::fs::metadata(&key_file)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        seen.to_lowercase().contains("generated") || seen.to_lowercase().contains("new master key"),
        "the first start says loudly that it made a key:\n{seen}"
    );
    assert!(dir.path().join("events").join("config.jsonl").exists());
}

#[tokio::test]
async fn audit_replay_reads_the_history_from_jetstream() {
    use eventlog::jetstream::{JetStreamConfig, JetStreamLog};

    let nats = testkit::shared_nats();
    let prefix = testkit::unique_name("a");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let log = JetStreamLog::connect(client, JetStreamConfig::with_prefix(&prefix))
        .await
        .expect("jetstream log");
    for (i, server) in ["s1", "s2"].iter().enumerate() {
        append_one(
            &log,
            &format!("server.{server}"),
            NOV_1 + i as i64,
            Event::ServerAdded(ServerAdded {
                server_id: (*server).to_owned(),
                ..Default::default()
            }),
        )
        .await;
    }
    append_one(
        &log,
        "invocation.u_alice",
        NOV_1 + 5,
        Event::InvocationStarted(proto::v1::InvocationStarted {
            invocation_id: "i1".to_owned(),
        }),
    )
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let lines = json_lines(&switchboard(
        dir.path(),
        &[
            "--nats",
            &nats.url(),
            "--nats-prefix",
            &prefix,
            "audit",
            "replay",
        ],
    ));
    let got: Vec<_> = lines
        .iter()
        .map(|l| {
            (
                l["log"].as_str().unwrap_or(""),
                l["seq"].as_u64().unwrap_or(0),
                l["type"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("config", 1, "ServerAdded"),
            ("config", 2, "ServerAdded"),
            ("invocations", 1, "InvocationStarted")
        ]
    );
}

/// The embedded vault belongs to the running `up`; rotation reaches it through the key file
/// and SIGHUP, and services keep running meanwhile.
#[tokio::test]
async fn a_running_embedded_instance_rotates_its_vault_on_sighup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_text = "xoxb-a-slack-token-that-must-not-leak";
    let old_key = {
        let keys = vault::KeyRing::load_or_generate(&dir.path().join("vault.keys")).expect("keys");
        let old_key = keys.current_key_id().to_string();
        let store = vault::FileStore::open(dir.path().join("vault")).expect("store");
        let v = vault::Vault::new(Arc::new(store), keys);
        for i in 0..4 {
            let name = vault::SecretName::parse(format!("token/s1/user{i}")).expect("name");
            v.put(&name, &vault::Secret::from(secret_text.to_owned()))
                .await
                .expect("put");
        }
        old_key
    };

    let (mut up, mut log, _) = start_up(dir.path(), &[]);

    // While up runs: check and retire are refused with a way forward, --new-key works.
    let check = switchboard(dir.path(), &["vault", "check"]);
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("SIGHUP"));
    let rotate = switchboard(dir.path(), &["vault", "rotate", "--new-key"]);
    let stderr = String::from_utf8_lossy(&rotate.stderr);
    assert!(rotate.status.success(), "{stderr}");
    assert!(stderr.contains("SIGHUP"), "{stderr}");

    let hup = Command::new("kill")
        .args(["-HUP", &up.id().to_string()])
        .status()
        .expect("send SIGHUP");
    assert!(hup.success());
    let rotated = read_until(&mut log, "re-encrypted");
    assert!(rotated.contains("reencrypted=4"), "{rotated}");
    assert!(!rotated.contains(secret_text));
    up.kill().expect("stop switchboard up");
    let _ = up.wait();

    let retire = switchboard(dir.path(), &["vault", "rotate", "--retire", &old_key]);
    assert!(
        retire.status.success(),
        "{}",
        String::from_utf8_lossy(&retire.stderr)
    );
    let check = switchboard(dir.path(), &["vault", "check"]);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "{stderr}");
    assert!(stderr.contains("4 opened"), "{stderr}");
}

#[tokio::test]
async fn audit_under_a_mistyped_prefix_says_so_and_creates_nothing() {
    let nats = testkit::shared_nats();
    let prefix = testkit::unique_name("missing");
    let dir = tempfile::tempdir().expect("tempdir");
    let output = switchboard(
        dir.path(),
        &[
            "--nats",
            &nats.url(),
            "--nats-prefix",
            &prefix,
            "audit",
            "replay",
        ],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--nats-prefix"), "{stderr}");

    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stream = eventlog::jetstream::JetStreamConfig::with_prefix(&prefix)
        .stream_name(eventlog::LogKind::Config);
    assert!(
        js.get_stream(&stream).await.is_err(),
        "the auditor created stream {stream}"
    );
}

#[tokio::test]
async fn up_on_jetstream_creates_its_streams_and_vault_bucket() {
    let nats = testkit::shared_nats();
    let prefix = testkit::unique_name("up");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut up, _lines, seen) = start_up(
        dir.path(),
        &["--nats", &nats.url(), "--nats-prefix", &prefix],
    );
    up.kill().expect("stop switchboard up");
    let _ = up.wait();
    assert!(seen.contains("switchboard is up on JetStream"), "{seen}");

    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let config = eventlog::jetstream::JetStreamConfig::with_prefix(&prefix);
    for log in eventlog::LogKind::ALL {
        let mut stream = js
            .get_stream(config.stream_name(log))
            .await
            .expect("stream exists");
        let info = stream.info().await.expect("stream info");
        assert!(info.config.deny_delete && info.config.deny_purge);
    }
    js.get_key_value(format!("{prefix}_vault"))
        .await
        .expect("the vault bucket exists");

    // An entry sealed with this host's key: another host without the key must not make up
    // one of its own for the shared bucket.
    let store = vault::KvStore::open(js.clone(), &format!("{prefix}_vault"))
        .await
        .expect("vault bucket");
    let keys = vault::KeyRing::load_from_env_or_file(&dir.path().join("vault.keys"))
        .expect("the first host's key file");
    vault::Vault::new(std::sync::Arc::new(store), keys)
        .put(
            &vault::SecretName::parse("probe/entry").expect("name"),
            &vault::Secret::from_slice(b"sealed"),
        )
        .await
        .expect("put");
    let other_host = tempfile::tempdir().expect("tempdir");
    // Bounded by coreutils' `timeout`: an `up` that started would serve until stopped.
    let refused = Command::new("timeout")
        .arg("60")
        .arg(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--data-dir")
        .arg(other_host.path())
        .args(["--nats", &nats.url(), "--nats-prefix", &prefix, "up"])
        .env_remove("SWITCHBOARD_VAULT_KEYS")
        .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run switchboard up");
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("holds 1 entries and this host has no vault key"),
        "{said}"
    );
    assert!(
        !other_host.path().join("vault.keys").exists(),
        "no key was made up"
    );
}

/// Credentials written into the NATS URL never reach a log line, the NATS client library's own
/// debug lines included (they go through the connect options, not the URL).
#[test]
fn credentials_in_the_nats_url_never_appear_in_the_log() {
    use std::io::BufRead;
    let nats = testkit::shared_nats();
    let prefix = testkit::unique_name("cred");
    let dir = tempfile::tempdir().expect("tempdir");
    let url = nats.url().replacen("nats://", "nats://ops:pa55-w0rd-x@", 1);
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--nats", &url, "--nats-prefix", &prefix, "-vv", "up"])
        .env_remove("SWITCHBOARD_VAULT_KEYS")
        .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_LOG_FORMAT", "text")
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start switchboard up");
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = read_until(&mut lines, "listening on ");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    for line in lines.map_while(Result::ok) {
        seen.push_str(&line);
        seen.push('\n');
    }
    assert!(child.wait().expect("wait").success());
    assert!(seen.contains("switchboard is up on JetStream"), "{seen}");
    assert!(
        seen.to_lowercase().contains("nats"),
        "debug lines of the NATS client are on"
    );
    for secret in ["pa55-w0rd-x", "ops:"] {
        assert!(
            !seen.contains(secret),
            "{secret} appears in the log:\n{seen}"
        );
    }
}
