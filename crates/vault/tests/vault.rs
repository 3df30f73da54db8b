//! The vault's integration tests: one suite, run against both stores — the file store in a
//! temporary directory and the JetStream KV store on a real nats-server (testkit).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use bytes::Bytes;
use tempfile::TempDir;
use vault::{
    DEFAULT_STATE_TTL, FileStore, KeyFile, KeyId, KeyRing, KvStore, ManualClock, Secret,
    SecretName, SecretStore, Vault, VaultError,
};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

enum Backend {
    File {
        dir: PathBuf,
    },
    Kv {
        js: Box<jetstream::Context>,
        bucket: String,
        stream: String,
    },
}

/// A vault over one store, a manual clock, and a way to read every byte the store holds.
struct Harness {
    vault: Vault,
    store: Arc<dyn SecretStore>,
    clock: Arc<ManualClock>,
    backend: Backend,
    tmp: TempDir,
}

impl Harness {
    async fn file() -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vault");
        let store: Arc<dyn SecretStore> = Arc::new(FileStore::open(&dir).unwrap());
        Harness::build(store, Backend::File { dir }, tmp)
    }

    async fn kv() -> Harness {
        let client = async_nats::connect(testkit::shared_nats().url())
            .await
            .unwrap();
        let js = jetstream::new(client);
        let kv = KvStore::open(js.clone(), &testkit::unique_name("vault"))
            .await
            .unwrap();
        let backend = Backend::Kv {
            js: Box::new(js),
            bucket: kv.bucket().to_owned(),
            stream: kv.stream_name().to_owned(),
        };
        Harness::build(Arc::new(kv), backend, tempfile::tempdir().unwrap())
    }

    fn build(store: Arc<dyn SecretStore>, backend: Backend, tmp: TempDir) -> Harness {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let vault = Vault::with_clock(
            Arc::clone(&store),
            KeyRing::generate().unwrap(),
            clock.clone(),
        );
        Harness {
            vault,
            store,
            clock,
            backend,
            tmp,
        }
    }

    /// Another vault over the same store and clock, with other keys.
    fn vault_with(&self, keyring: KeyRing) -> Vault {
        Vault::with_clock(Arc::clone(&self.store), keyring, self.clock.clone())
    }

    /// Every byte at rest: each file of the file store, or each raw message (headers and
    /// payload) of the KV bucket's stream.
    async fn bytes_at_rest(&self) -> Vec<Vec<u8>> {
        match &self.backend {
            Backend::File { dir } => files_under(dir),
            Backend::Kv { js, stream, .. } => {
                let mut stream = js.get_stream(stream).await.unwrap();
                let state = stream.info().await.unwrap().state.clone();
                let mut messages = Vec::new();
                for sequence in state.first_sequence..=state.last_sequence {
                    // Sequences of removed messages are gaps.
                    let Ok(message) = stream.get_raw_message(sequence).await else {
                        continue;
                    };
                    let mut bytes = message.subject.as_bytes().to_vec();
                    for (name, values) in message.headers.iter() {
                        bytes.extend_from_slice(name.as_ref());
                        for value in values {
                            bytes.extend_from_slice(value.as_str().as_bytes());
                        }
                    }
                    bytes.extend_from_slice(&message.payload);
                    messages.push(bytes);
                }
                messages
            }
        }
    }

    async fn assert_not_at_rest(&self, needles: &[&[u8]]) {
        let haystacks = self.bytes_at_rest().await;
        assert!(!haystacks.is_empty(), "the scan found nothing to scan");
        for haystack in &haystacks {
            for needle in needles {
                assert!(
                    !contains(haystack, needle),
                    "found {:?} at rest",
                    String::from_utf8_lossy(needle)
                );
            }
        }
    }
}

fn files_under(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let Ok(listing) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in listing.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push(bytes);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn name(s: &str) -> SecretName {
    SecretName::parse(s).unwrap()
}

fn secret(s: &str) -> Secret {
    Secret::from(s.to_owned())
}

fn text(secret: &Secret) -> &str {
    secret.expose_str().unwrap()
}

/// Runs every listed suite test against both stores.
macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        mod file_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Harness::file().await).await;
                }
            )*
        }
        mod kv_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Harness::kv().await).await;
                }
            )*
        }
    };
}

suite!(
    put_get_delete_roundtrip,
    names_lists_live_entries,
    compare_and_swap_with_a_stale_revision_fails,
    concurrent_compare_and_swaps_have_exactly_one_winner,
    flipped_byte_is_refused_never_garbage,
    wrong_key_is_refused,
    value_moved_to_another_name_is_refused,
    stripped_time_to_live_is_refused,
    no_plaintext_is_stored,
    expired_entry_cannot_be_read,
    expired_entry_can_be_created_again,
    put_with_ttl_is_create_only,
    a_lease_released_late_leaves_its_successors_lease,
    a_renewed_lease_outlives_its_first_time_to_live,
    replayed_state_is_refused,
    concurrent_takers_get_the_state_exactly_once,
    check_reports_unopenable_entries_by_name,
    rotation_under_concurrent_reads_and_writes_loses_nothing,
    remove_expired_sweeps_only_expired_entries,
);

// ---------------------------------------------------------------------------------------------
// The shared suite
// ---------------------------------------------------------------------------------------------

async fn put_get_delete_roundtrip(h: Harness) {
    let n = name("token/github_prod/user-1");
    assert!(h.vault.get(&n).await.unwrap().is_none());
    let first = h.vault.put(&n, &secret("gho_first")).await.unwrap();
    let (value, revision) = h.vault.get(&n).await.unwrap().unwrap();
    assert_eq!(text(&value), "gho_first");
    assert_eq!(revision, first);

    let second = h.vault.put(&n, &secret("gho_second")).await.unwrap();
    assert_ne!(first, second);
    let (value, revision) = h.vault.get(&n).await.unwrap().unwrap();
    assert_eq!(text(&value), "gho_second");
    assert_eq!(revision, second);

    let empty = name("empty");
    h.vault.put(&empty, &Secret::default()).await.unwrap();
    assert!(h.vault.get(&empty).await.unwrap().unwrap().0.is_empty());

    h.vault.delete(&n).await.unwrap();
    assert!(h.vault.get(&n).await.unwrap().is_none());
    // Deleting what is not there is fine.
    h.vault.delete(&n).await.unwrap();
    h.vault.delete(&name("never/existed")).await.unwrap();
}

async fn names_lists_live_entries(h: Harness) {
    let names = [
        "a",
        "client_secret/srv-1",
        "token/s/u=1.x",
        "oauth_state/abc",
    ];
    for n in names {
        h.vault.put(&name(n), &secret("v")).await.unwrap();
    }
    h.vault.delete(&name("a")).await.unwrap();
    let mut listed: Vec<String> = h
        .vault
        .names()
        .await
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        ["client_secret/srv-1", "oauth_state/abc", "token/s/u=1.x"]
    );
}

async fn compare_and_swap_with_a_stale_revision_fails(h: Harness) {
    let n = name("token/x/u");
    let created = h
        .vault
        .compare_and_swap(&n, None, &secret("one"))
        .await
        .unwrap();
    // `None` means "must not exist".
    assert!(matches!(
        h.vault.compare_and_swap(&n, None, &secret("again")).await,
        Err(VaultError::Conflict { .. })
    ));
    let updated = h
        .vault
        .compare_and_swap(&n, Some(created), &secret("two"))
        .await
        .unwrap();
    let stale = h
        .vault
        .compare_and_swap(&n, Some(created), &secret("stale"))
        .await;
    assert!(
        matches!(&stale, Err(VaultError::Conflict { name }) if *name == n),
        "{stale:?}"
    );
    let (value, revision) = h.vault.get(&n).await.unwrap().unwrap();
    assert_eq!((text(&value), revision), ("two", updated));

    // After a delete, the old revision is stale and "must not exist" holds again.
    h.vault.delete(&n).await.unwrap();
    assert!(matches!(
        h.vault
            .compare_and_swap(&n, Some(updated), &secret("x"))
            .await,
        Err(VaultError::Conflict { .. })
    ));
    h.vault
        .compare_and_swap(&n, None, &secret("three"))
        .await
        .unwrap();
    assert_eq!(text(&h.vault.get(&n).await.unwrap().unwrap().0), "three");
}

async fn concurrent_compare_and_swaps_have_exactly_one_winner(h: Harness) {
    const CONTENDERS: usize = 8;
    let n = name("token/shared/refresh");
    let start = h.vault.put(&n, &secret("original")).await.unwrap();
    for round in 0..3 {
        let (_, revision) = h.vault.get(&n).await.unwrap().unwrap();
        assert!(round > 0 || revision == start);
        let tasks: Vec<_> = (0..CONTENDERS)
            .map(|i| {
                let vault = h.vault.clone();
                let n = n.clone();
                tokio::spawn(async move {
                    let value = format!("round{round}-replica{i}");
                    let outcome = vault
                        .compare_and_swap(&n, Some(revision), &Secret::from(value.clone()))
                        .await;
                    (value, outcome)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                (value, Ok(revision)) => winners.push((value, revision)),
                (_, Err(VaultError::Conflict { .. })) => {}
                (_, Err(other)) => panic!("unexpected error: {other}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let (value, revision) = h.vault.get(&n).await.unwrap().unwrap();
        assert_eq!(text(&value), winners[0].0);
        assert_eq!(revision, winners[0].1);
    }
}

/// Opening must fail with one of the "refused" errors, whose message never holds plaintext.
fn assert_refused(result: Result<Option<(Secret, vault::Revision)>, VaultError>, plaintext: &str) {
    match result {
        Err(
            error @ (VaultError::Tampered { .. }
            | VaultError::Malformed { .. }
            | VaultError::UnknownKey { .. }),
        ) => {
            let message = format!("{error} {error:?}");
            assert!(!message.contains(plaintext), "{message}");
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(value) => panic!("a modified value was accepted: {value:?}"),
    }
}

async fn flipped_byte_is_refused_never_garbage(h: Harness) {
    let plaintext = "ya29.flipped-byte-secret";
    let n = name("token/flip/u");
    h.vault
        .put_with_ttl(&n, &secret(plaintext), DEFAULT_STATE_TTL)
        .await
        .unwrap();
    let sealed = h.store.get(&n).await.unwrap().unwrap().value;
    // Magic, version, key id length, key id, nonce, flags, expiry, ciphertext, tag.
    let positions = [
        0,
        2,
        3,
        5,
        30,
        33,
        40,
        sealed.len() / 2 + 20,
        sealed.len() - 1,
    ];
    for position in positions {
        let mut forged = sealed.to_vec();
        forged[position] ^= 0x04;
        h.store.put(&n, Bytes::from(forged)).await.unwrap();
        assert_refused(h.vault.get(&n).await, plaintext);
        assert!(
            h.vault.take(&n).await.is_err(),
            "take accepted a flip at {position}"
        );
    }
    let mut truncated = sealed.to_vec();
    truncated.truncate(sealed.len() - 17);
    h.store.put(&n, Bytes::from(truncated)).await.unwrap();
    assert_refused(h.vault.get(&n).await, plaintext);

    h.store.put(&n, sealed).await.unwrap();
    assert_eq!(text(&h.vault.get(&n).await.unwrap().unwrap().0), plaintext);
}

async fn wrong_key_is_refused(h: Harness) {
    let n = name("token/wrong-key/u");
    h.vault
        .put(&n, &secret("sealed-under-the-right-key"))
        .await
        .unwrap();
    let current = h.vault.keyring().current_key_id().clone();

    // Same key id, different key bytes.
    let impostor = h.vault_with(KeyRing::generate_with_id(current.clone()).unwrap());
    let result = impostor.get(&n).await;
    assert!(
        matches!(&result, Err(VaultError::Tampered { name }) if *name == n),
        "{result:?}"
    );
    assert!(
        result
            .unwrap_err()
            .to_string()
            .contains("sealed under another name or key")
    );

    // A ring without the key id at all.
    let stranger = h.vault_with(KeyRing::generate().unwrap());
    match stranger.get(&n).await {
        Err(VaultError::UnknownKey { key_id, .. }) => assert_eq!(key_id, current.as_str()),
        other => panic!("expected UnknownKey, got {other:?}"),
    }
}

async fn value_moved_to_another_name_is_refused(h: Harness) {
    let alice = name("token/github/alice");
    let mallory = name("token/github/mallory");
    h.vault.put(&alice, &secret("alice-token")).await.unwrap();
    h.vault
        .put(&mallory, &secret("mallory-token"))
        .await
        .unwrap();
    let alices = h.store.get(&alice).await.unwrap().unwrap().value;
    h.store.put(&mallory, alices).await.unwrap();
    let result = h.vault.get(&mallory).await;
    assert!(
        matches!(&result, Err(VaultError::Tampered { name }) if *name == mallory),
        "{result:?}"
    );
    assert_refused(result, "alice-token");
}

async fn stripped_time_to_live_is_refused(h: Harness) {
    let n = name("oauth_state/strip");
    h.vault
        .put_with_ttl(&n, &secret("verifier"), Duration::from_secs(60))
        .await
        .unwrap();
    let sealed = h.store.get(&n).await.unwrap().unwrap().value;
    // Header: "SV", version, key id length, key id, 12-byte nonce, flags, 8-byte expiry.
    let flags_at = 4 + usize::from(sealed[3]) + 12;
    assert_eq!(sealed[flags_at], 1, "the entry carries an expiry");
    let mut stripped = sealed[..flags_at].to_vec();
    stripped.push(0);
    stripped.extend_from_slice(&sealed[flags_at + 9..]);
    h.store.put(&n, Bytes::from(stripped)).await.unwrap();
    h.clock.advance(Duration::from_secs(3600));
    assert_refused(h.vault.get(&n).await, "verifier");

    // Pushing the expiry out is refused as well.
    let mut extended = sealed.to_vec();
    extended[flags_at + 1] = 0x7f;
    h.store.put(&n, Bytes::from(extended)).await.unwrap();
    assert_refused(h.vault.get(&n).await, "verifier");
}

async fn no_plaintext_is_stored(h: Harness) {
    let secrets = [
        ("token/scan/access", "PLAINTEXT-ACCESS-7f3e9a"),
        ("token/scan/refresh", "PLAINTEXT-REFRESH-1b2c3d"),
        ("client_secret/scan", "PLAINTEXT-CLIENT-SECRET-55aa"),
    ];
    for (n, value) in secrets {
        h.vault.put(&name(n), &secret(value)).await.unwrap();
    }
    let state = name("oauth_state/scan");
    h.vault
        .put_with_ttl(
            &state,
            &secret("PLAINTEXT-PKCE-VERIFIER-9d8c"),
            DEFAULT_STATE_TTL,
        )
        .await
        .unwrap();
    let cas = name("token/scan/cas");
    let revision = h
        .vault
        .compare_and_swap(&cas, None, &secret("PLAINTEXT-CAS-1"))
        .await
        .unwrap();
    h.vault
        .compare_and_swap(&cas, Some(revision), &secret("PLAINTEXT-CAS-2"))
        .await
        .unwrap();

    let mut needles: Vec<&[u8]> = secrets.iter().map(|(_, v)| v.as_bytes()).collect();
    needles.extend([
        b"PLAINTEXT-PKCE-VERIFIER-9d8c".as_slice(),
        b"PLAINTEXT-CAS-1",
        b"PLAINTEXT-CAS-2",
        b"PLAINTEXT",
    ]);
    h.assert_not_at_rest(&needles).await;
    // The scan does see what is stored: entry names are not secret and are kept in clear.
    let all: Vec<u8> = h.bytes_at_rest().await.concat();
    assert!(contains(&all, b"token/scan/access"));

    if let Backend::Kv { .. } = h.backend {
        // Nor on the server's disk (its store holds every test's buckets; the markers are
        // unique to this test).
        let store_dir = testkit::shared_nats().store_dir();
        for file in files_under(store_dir) {
            for needle in &needles[..needles.len() - 1] {
                assert!(
                    !contains(&file, needle),
                    "plaintext on the nats-server's disk"
                );
            }
        }
    }
}

async fn expired_entry_cannot_be_read(h: Harness) {
    let n = name("oauth_state/expiring");
    h.vault
        .put_with_ttl(&n, &secret("verifier"), DEFAULT_STATE_TTL)
        .await
        .unwrap();
    h.clock.advance(DEFAULT_STATE_TTL - Duration::from_secs(1));
    assert_eq!(text(&h.vault.get(&n).await.unwrap().unwrap().0), "verifier");
    h.clock.advance(Duration::from_secs(1));
    assert!(h.vault.get(&n).await.unwrap().is_none());
    assert!(h.vault.take(&n).await.unwrap().is_none());
    // The expired entry was removed when it was read.
    assert!(h.store.get(&n).await.unwrap().is_none());
    assert!(!h.vault.names().await.unwrap().contains(&n));

    // `take` of an expired entry that nobody read before is refused too.
    let other = name("oauth_state/expiring-2");
    h.vault
        .put_with_ttl(&other, &secret("v2"), Duration::from_secs(5))
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(6));
    assert!(h.vault.take(&other).await.unwrap().is_none());
}

async fn expired_entry_can_be_created_again(h: Harness) {
    let n = name("oauth_state/reused");
    h.vault
        .put_with_ttl(&n, &secret("old"), Duration::from_secs(30))
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(31));
    // Nobody read the old one, so it is still stored; it does not block a new entry.
    assert!(h.store.get(&n).await.unwrap().is_some());
    h.vault
        .put_with_ttl(&n, &secret("new"), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(text(&h.vault.take(&n).await.unwrap().unwrap()), "new");
    // Same for compare-and-swap with "must not exist".
    let c = name("token/cas-after-expiry");
    h.vault
        .put_with_ttl(&c, &secret("old"), Duration::from_secs(1))
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(2));
    h.vault
        .compare_and_swap(&c, None, &secret("fresh"))
        .await
        .unwrap();
    assert_eq!(text(&h.vault.get(&c).await.unwrap().unwrap().0), "fresh");
}

/// A holder whose lease expired while it worked, releasing it after a successor took the
/// lease: the successor's lease stays.
async fn a_lease_released_late_leaves_its_successors_lease(h: Harness) {
    let n = name("lease/refresh");
    let first = h
        .vault
        .put_with_ttl(&n, &secret("refreshing"), Duration::from_secs(30))
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(31));
    let second = h
        .vault
        .put_with_ttl(&n, &secret("refreshing"), Duration::from_secs(30))
        .await
        .unwrap();
    assert_ne!(first, second);
    assert!(matches!(
        h.vault.delete_if_revision(&n, first).await,
        Err(VaultError::Conflict { .. })
    ));
    assert!(
        h.vault.get(&n).await.unwrap().is_some(),
        "the successor's lease stays"
    );
    h.vault.delete_if_revision(&n, second).await.unwrap();
    assert!(h.vault.get(&n).await.unwrap().is_none());
}

async fn a_renewed_lease_outlives_its_first_time_to_live(h: Harness) {
    let n = name("lease/renewed");
    let ttl = Duration::from_secs(30);
    let first = h
        .vault
        .put_with_ttl(&n, &secret("held"), ttl)
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(20));
    let renewed = h
        .vault
        .renew(&n, first, &secret("held"), ttl)
        .await
        .unwrap();
    assert_ne!(first, renewed);
    // Past the first time-to-live, within the renewed one: still held.
    h.clock.advance(Duration::from_secs(20));
    assert!(h.vault.get(&n).await.unwrap().is_some());
    assert!(matches!(
        h.vault.put_with_ttl(&n, &secret("other"), ttl).await,
        Err(VaultError::Conflict { .. })
    ));
    // Renewing with a revision that is not the entry's is refused.
    assert!(matches!(
        h.vault.renew(&n, first, &secret("held"), ttl).await,
        Err(VaultError::Conflict { .. })
    ));
    // Not renewed again: it lapses, and another holder takes the name.
    h.clock.advance(Duration::from_secs(31));
    assert!(h.vault.get(&n).await.unwrap().is_none());
    let successor = h
        .vault
        .put_with_ttl(&n, &secret("other"), ttl)
        .await
        .unwrap();
    assert!(matches!(
        h.vault.renew(&n, renewed, &secret("held"), ttl).await,
        Err(VaultError::Conflict { .. })
    ));
    h.vault.delete_if_revision(&n, successor).await.unwrap();
}

async fn put_with_ttl_is_create_only(h: Harness) {
    let n = name("oauth_state/once");
    h.vault
        .put_with_ttl(&n, &secret("first"), DEFAULT_STATE_TTL)
        .await
        .unwrap();
    assert!(matches!(
        h.vault
            .put_with_ttl(&n, &secret("second"), DEFAULT_STATE_TTL)
            .await,
        Err(VaultError::Conflict { .. })
    ));
    assert_eq!(text(&h.vault.take(&n).await.unwrap().unwrap()), "first");
}

async fn replayed_state_is_refused(h: Harness) {
    let n = name("oauth_state/replayed");
    h.vault
        .put_with_ttl(&n, &secret("pkce-verifier"), DEFAULT_STATE_TTL)
        .await
        .unwrap();
    assert_eq!(
        text(&h.vault.take(&n).await.unwrap().unwrap()),
        "pkce-verifier"
    );
    assert!(h.vault.take(&n).await.unwrap().is_none());
    assert!(h.vault.get(&n).await.unwrap().is_none());
}

async fn concurrent_takers_get_the_state_exactly_once(h: Harness) {
    const TAKERS: usize = 8;
    for round in 0..3 {
        let n = name(&format!("oauth_state/race-{round}"));
        h.vault
            .put_with_ttl(&n, &secret("the-verifier"), DEFAULT_STATE_TTL)
            .await
            .unwrap();
        let tasks: Vec<_> = (0..TAKERS)
            .map(|_| {
                let vault = h.vault.clone();
                let n = n.clone();
                tokio::spawn(async move { vault.take(&n).await })
            })
            .collect();
        let mut taken = 0;
        for task in tasks {
            if let Some(value) = task.await.unwrap().unwrap() {
                assert_eq!(text(&value), "the-verifier");
                taken += 1;
            }
        }
        assert_eq!(taken, 1, "round {round}");
    }
}

async fn check_reports_unopenable_entries_by_name(h: Harness) {
    for n in ["token/ok/1", "token/ok/2", "token/bad/tampered"] {
        h.vault
            .put(&name(n), &secret("CHECK-PLAINTEXT"))
            .await
            .unwrap();
    }
    let report = h.vault.check().await.unwrap();
    assert!(report.is_healthy(), "{report:?}");
    assert_eq!((report.examined, report.opened), (3, 3));

    let bad = name("token/bad/tampered");
    let mut sealed = h.store.get(&bad).await.unwrap().unwrap().value.to_vec();
    let last = sealed.len() - 1;
    sealed[last] ^= 0x80;
    h.store.put(&bad, Bytes::from(sealed)).await.unwrap();
    // And one sealed under a key this vault does not have.
    let foreign = name("token/bad/foreign-key");
    h.vault_with(KeyRing::generate_with_id(KeyId::parse("elsewhere").unwrap()).unwrap())
        .put(&foreign, &secret("CHECK-PLAINTEXT"))
        .await
        .unwrap();

    // And one whose key id was damaged in the store: it names a key nobody has.
    let flipped = name("token/bad/flipped-key-id");
    h.vault
        .put(&flipped, &secret("CHECK-PLAINTEXT"))
        .await
        .unwrap();
    let mut sealed = h.store.get(&flipped).await.unwrap().unwrap().value.to_vec();
    // "SV", format version, key id length, then the key id.
    sealed[4] = if sealed[4] == b'z' { b'y' } else { b'z' };
    h.store.put(&flipped, Bytes::from(sealed)).await.unwrap();

    let report = h.vault.check().await.unwrap();
    assert!(!report.is_healthy());
    assert_eq!((report.examined, report.opened), (5, 2));
    // Keys that are not loaded are not counted: one is real but missing here, the other is
    // a damaged header; both entries are reported.
    assert_eq!(report.by_key.get("elsewhere"), None);
    assert_eq!(
        report.by_key.keys().collect::<Vec<_>>(),
        [&h.vault.keyring().current_key_id().to_string()]
    );
    let unknown = report
        .problems
        .iter()
        .find(|p| p.name == flipped)
        .expect("the damaged key id is reported");
    assert!(
        unknown.error.to_string().contains("damaged"),
        "{}",
        unknown.error
    );
    let mut problems: Vec<(String, &'static str)> = report
        .problems
        .iter()
        .map(|p| (p.name.to_string(), p.error.code()))
        .collect();
    problems.sort();
    assert_eq!(
        problems,
        [
            ("token/bad/flipped-key-id".to_owned(), "vault_unknown_key"),
            ("token/bad/foreign-key".to_owned(), "vault_unknown_key"),
            ("token/bad/tampered".to_owned(), "vault_entry_tampered"),
        ]
    );
    let printed = format!("{report:?} {}", report.problems[0]);
    assert!(!printed.contains("CHECK-PLAINTEXT"), "{printed}");
}

async fn rotation_under_concurrent_reads_and_writes_loses_nothing(h: Harness) {
    const ENTRIES: usize = 24;
    /// Entries no writer touches: the rotation must re-seal each of them.
    const UNTOUCHED: usize = 6;
    const WRITERS: usize = 3;
    let key_path = h.tmp.path().join("vault.keys");
    let mut key_file = KeyFile::create(&key_path).unwrap();
    let old_key = key_file.current_key_id().clone();
    h.vault.set_keyring(key_file.keyring().unwrap());

    let names: Vec<SecretName> = (0..ENTRIES)
        .map(|i| name(&format!("token/rot/u{i}")))
        .collect();
    let untouched: Vec<SecretName> = (0..UNTOUCHED)
        .map(|i| name(&format!("token/rot/idle{i}")))
        .collect();
    for n in names.iter().chain(&untouched) {
        h.vault
            .put(n, &Secret::from(format!("{n}#0")))
            .await
            .unwrap();
    }
    let ttl_entry = name("oauth_state/rot");
    h.vault
        .put_with_ttl(&ttl_entry, &secret("rot-verifier"), DEFAULT_STATE_TTL)
        .await
        .unwrap();

    // Retiring a key that entries still use is refused.
    let new_key = key_file.add_new_key(true).unwrap();
    key_file.save().unwrap();
    let refused = h.vault.retire_key(&mut key_file, &old_key).await;
    assert!(
        matches!(refused, Err(VaultError::KeyConfig { .. })),
        "{refused:?}"
    );
    h.vault.set_keyring(key_file.keyring().unwrap());
    // Every entry is still under the old key when the rotation starts.
    assert_eq!(
        h.vault.check().await.unwrap().entries_using(&old_key),
        ENTRIES + UNTOUCHED + 1
    );

    // Writers each own a slice of the entries and keep rewriting them from the moment the
    // rotation starts until it ends, so the rotation's re-seal races their writes: a writer's
    // compare-and-swap can lose to the re-seal, and the re-seal's to a writer. Readers read
    // all of them meanwhile.
    let rotating = Arc::new(AtomicBool::new(true));
    let start = Arc::new(tokio::sync::Barrier::new(WRITERS + 1));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let vault = h.vault.clone();
            let rotating = Arc::clone(&rotating);
            let start = Arc::clone(&start);
            let mine: Vec<SecretName> = names.iter().skip(w).step_by(WRITERS).cloned().collect();
            tokio::spawn(async move {
                let mut last = HashMap::new();
                let mut writes_during_rotation = 0;
                let mut round = 1;
                start.wait().await;
                while round <= 2 || rotating.load(Ordering::SeqCst) {
                    for n in &mine {
                        let value = format!("{n}#{round}");
                        if round % 2 == 0 {
                            vault.put(n, &Secret::from(value.clone())).await.unwrap();
                        } else {
                            // Read-modify-write: the rotation's re-seal can win first; then
                            // re-read and try again, as a token refresh would.
                            loop {
                                let (_, revision) = vault.get(n).await.unwrap().unwrap();
                                match vault
                                    .compare_and_swap(
                                        n,
                                        Some(revision),
                                        &Secret::from(value.clone()),
                                    )
                                    .await
                                {
                                    Ok(_) => break,
                                    Err(VaultError::Conflict { .. }) => continue,
                                    Err(other) => panic!("{other}"),
                                }
                            }
                        }
                        if rotating.load(Ordering::SeqCst) {
                            writes_during_rotation += 1;
                        }
                        last.insert(n.clone(), value);
                    }
                    round += 1;
                }
                (last, writes_during_rotation)
            })
        })
        .collect();
    let reader = {
        let vault = h.vault.clone();
        let rotating = Arc::clone(&rotating);
        let names = names.clone();
        tokio::spawn(async move {
            let mut reads = 0;
            while reads < 3 * ENTRIES || rotating.load(Ordering::SeqCst) {
                let n = &names[reads % names.len()];
                let (value, _) = vault.get(n).await.unwrap().expect("entry vanished");
                assert!(text(&value).starts_with(n.as_str()));
                reads += 1;
            }
        })
    };

    start.wait().await;
    let report = h.vault.rotate().await.unwrap();
    rotating.store(false, Ordering::SeqCst);
    reader.await.unwrap();
    let mut expected = HashMap::new();
    let mut writes_during_rotation = 0;
    for writer in writers {
        let (last, writes) = writer.await.unwrap();
        expected.extend(last);
        writes_during_rotation += writes;
    }
    assert_eq!(expected.len(), ENTRIES);
    assert!(
        writes_during_rotation > 0,
        "the writers wrote while the rotation ran"
    );

    // The report accounts for every entry: each was re-sealed by the rotation or had already
    // been rewritten under the new key by a writer; none is missing or left behind.
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(report.current_key, new_key);
    assert_eq!(report.examined, ENTRIES + UNTOUCHED + 1, "{report:?}");
    assert_eq!(
        report.reencrypted + report.already_current,
        report.examined,
        "{report:?}"
    );
    assert!(
        report.reencrypted > UNTOUCHED,
        "the untouched and the time-to-live entries were re-sealed: {report:?}"
    );
    assert_eq!(
        (
            report.expired_removed,
            report.vanished,
            report.problems.len()
        ),
        (0, 0, 0),
        "{report:?}"
    );
    for n in &untouched {
        expected.insert(n.clone(), format!("{n}#0"));
    }

    // Every entry holds its last write, all under the new key.
    let check = h.vault.check().await.unwrap();
    assert!(check.is_healthy(), "{check:?}");
    assert_eq!(check.entries_using(&old_key), 0);
    assert_eq!(check.entries_using(&new_key), ENTRIES + UNTOUCHED + 1);

    // The old key can go; everything still opens, also for a vault that never had it.
    h.vault.retire_key(&mut key_file, &old_key).await.unwrap();
    assert_eq!(
        KeyFile::load(&key_path).unwrap().key_ids(),
        vec![new_key.clone()]
    );
    let fresh = h.vault_with(KeyRing::load_from_env_or_file(&key_path).unwrap());
    assert!(!fresh.keyring().contains(old_key.as_str()));
    for (n, value) in &expected {
        let (stored, _) = fresh.get(n).await.unwrap().unwrap();
        assert_eq!(text(&stored), value);
    }
    assert_eq!(
        text(&fresh.take(&ttl_entry).await.unwrap().unwrap()),
        "rot-verifier"
    );
    assert!(fresh.check().await.unwrap().is_healthy());
    // No ciphertext under the old key is left at rest.
    h.assert_not_at_rest(&[old_key.as_str().as_bytes()]).await;
}

async fn remove_expired_sweeps_only_expired_entries(h: Harness) {
    h.vault
        .put(&name("token/keep"), &secret("k"))
        .await
        .unwrap();
    h.vault
        .put_with_ttl(
            &name("oauth_state/live"),
            &secret("l"),
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    for i in 0..3 {
        h.vault
            .put_with_ttl(
                &name(&format!("oauth_state/old{i}")),
                &secret("o"),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    h.clock.advance(Duration::from_secs(61));
    assert_eq!(h.vault.remove_expired().await.unwrap(), 3);
    let mut names: Vec<String> = h
        .vault
        .names()
        .await
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["oauth_state/live", "token/keep"]);
}

// ---------------------------------------------------------------------------------------------
// Store-specific and store-independent tests
// ---------------------------------------------------------------------------------------------

#[test]
fn debug_of_a_secret_is_redacted() {
    let value = secret("gho_do-not-print-me");
    for printed in [
        format!("{value:?}"),
        format!("{value:#?}"),
        format!("{:?}", Some((value.clone(), 1))),
    ] {
        assert!(!printed.contains("do-not-print-me"), "{printed}");
        assert!(printed.contains("<redacted, 19 bytes>"), "{printed}");
    }
    let ring = KeyRing::generate().unwrap();
    let printed = format!("{ring:?}");
    assert!(printed.contains(ring.current_key_id().as_str()));
}

#[cfg(unix)]
#[tokio::test]
async fn file_store_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::file().await;
    let Backend::File { dir } = &h.backend else {
        unreachable!()
    };
    h.vault
        .put(&name("token/mode"), &secret("x"))
        .await
        .unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir), 0o700);
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        files += 1;
    }
    assert_eq!(files, 2, "the lock file and one entry");
}

#[tokio::test]
async fn file_store_names_never_become_paths() {
    let h = Harness::file().await;
    let Backend::File { dir } = &h.backend else {
        unreachable!()
    };
    let long = "x/".repeat(127) + "y";
    for n in ["a/b/c", "token/.x/y", "=/-_.z", long.as_str()] {
        h.vault.put(&name(n), &secret("v")).await.unwrap();
    }
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        assert!(entry.file_type().unwrap().is_file(), "no subdirectories");
    }
    assert_eq!(h.vault.names().await.unwrap().len(), 4);
    assert!(SecretName::parse("../escape").is_err());
}

#[tokio::test]
async fn file_store_directory_has_one_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vault");
    let first = FileStore::open(&dir).unwrap();
    let second = FileStore::open(&dir);
    assert!(
        matches!(second, Err(vault::StoreError::Locked { .. })),
        "{second:?}"
    );
    drop(first);
    FileStore::open(&dir).unwrap();
}

#[tokio::test]
async fn file_store_recovers_from_an_interrupted_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vault");
    let key_file = KeyFile::create(tmp.path().join("vault.keys")).unwrap();
    let n = name("token/crash");
    let revision = {
        let vault = Vault::new(
            Arc::new(FileStore::open(&dir).unwrap()),
            key_file.keyring().unwrap(),
        );
        vault.put(&n, &secret("before-crash")).await.unwrap()
    };
    // A crash mid-write leaves a temporary file beside the entry.
    let entry = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "entry"))
        .unwrap();
    let mut tmp_path = entry.into_os_string();
    tmp_path.push(".tmp");
    std::fs::write(&tmp_path, b"half a wri").unwrap();

    let store = FileStore::open(&dir).unwrap();
    assert!(
        !Path::new(&tmp_path).exists(),
        "leftover temporary file removed"
    );
    let stored = store.get(&n).await.unwrap().unwrap();
    assert_eq!(stored.revision, revision);
    // Revisions keep growing across a restart.
    let next = store.put(&n, stored.value.clone()).await.unwrap();
    assert!(next > revision);
    let vault = Vault::new(Arc::new(store), key_file.keyring().unwrap());
    assert_eq!(
        text(&vault.get(&n).await.unwrap().unwrap().0),
        "before-crash"
    );
}

#[tokio::test]
async fn kv_store_hands_expiry_and_delete_markers_to_the_server() {
    let h = Harness::kv().await;
    let Backend::Kv { js, bucket, stream } = &h.backend else {
        unreachable!()
    };
    let stream = js.get_stream(stream).await.unwrap();
    let last_header = async |n: &SecretName, header: &str| {
        let message = stream
            .get_last_raw_message_by_subject(&format!("$KV.{bucket}.{n}"))
            .await
            .unwrap();
        message.headers.get(header).map(|v| v.as_str().to_owned())
    };

    let state = name("oauth_state/server-ttl");
    h.vault
        .put_with_ttl(&state, &secret("v"), DEFAULT_STATE_TTL)
        .await
        .unwrap();
    assert_eq!(
        last_header(&state, "Nats-TTL").await.as_deref(),
        Some("600")
    );

    let token = name("token/no-ttl");
    h.vault.put(&token, &secret("v")).await.unwrap();
    assert_eq!(last_header(&token, "Nats-TTL").await, None);

    // A deleted entry leaves a purge marker that the server removes by itself later.
    h.vault.delete(&token).await.unwrap();
    assert_eq!(
        last_header(&token, "KV-Operation").await.as_deref(),
        Some("PURGE")
    );
    assert_eq!(
        last_header(&token, "Nats-TTL").await.as_deref(),
        Some("900")
    );
}

#[tokio::test]
async fn check_reports_an_entry_file_too_damaged_to_name() {
    let h = Harness::file().await;
    let Backend::File { dir } = &h.backend else {
        unreachable!()
    };
    h.vault
        .put(&name("token/damaged"), &secret("x"))
        .await
        .unwrap();
    h.vault
        .put(&name("token/fine"), &secret("y"))
        .await
        .unwrap();
    let damaged = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "entry")
                && contains(&std::fs::read(p).unwrap(), b"token/damaged")
        })
        .expect("the entry file");
    // Overwrite the file's own header (magic and version), so its name cannot be read.
    let mut bytes = std::fs::read(&damaged).unwrap();
    bytes[..5].copy_from_slice(b"XXXXX");
    std::fs::write(&damaged, bytes).unwrap();

    let report = h.vault.check().await.unwrap();
    assert!(!report.is_healthy());
    assert_eq!(report.opened, 1);
    let file_name = damaged.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(report.unreadable.len(), 1, "{report:?}");
    assert!(report.unreadable[0].starts_with(&file_name), "{report:?}");
}

/// One byte flipped in each of several entry files, in each part of the file: the check
/// accounts for every file, reports every damaged one, and counts no key that does not exist.
#[tokio::test]
async fn check_accounts_for_every_damaged_entry_file() {
    const ENTRIES: usize = 10;
    let h = Harness::file().await;
    let Backend::File { dir } = &h.backend else {
        unreachable!()
    };
    let names: Vec<SecretName> = (0..ENTRIES)
        .map(|i| name(&format!("token/dmg/u{i}")))
        .collect();
    for n in &names {
        h.vault.put(n, &secret("DAMAGE-PLAINTEXT")).await.unwrap();
    }
    let key_id = h.vault.keyring().current_key_id().to_string();
    let file_of = |n: &SecretName| {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.extension().is_some_and(|e| e == "entry")
                    && contains(&std::fs::read(p).unwrap(), n.as_str().as_bytes())
            })
            .expect("the entry file")
    };
    // Layout: "SBVE", version, revision (8), name length (2), name, sealed value, checksum.
    let name_start = 4 + 1 + 8 + 2;
    let flip = |n: &SecretName, at: &dyn Fn(&[u8]) -> usize| {
        let path = file_of(n);
        let mut bytes = std::fs::read(&path).unwrap();
        let i = at(&bytes);
        bytes[i] = match bytes[i] {
            b'0'..=b'8' => bytes[i] + 1,
            b'a'..=b'y' => bytes[i] + 1,
            other => other ^ 0x01,
        };
        std::fs::write(&path, bytes).unwrap();
        path.file_name().unwrap().to_string_lossy().into_owned()
    };
    let value_start = |n: &SecretName| name_start + n.as_str().len();
    // The name's length byte, a digit of the name, and the magic: the entry is unknown.
    let unnamed = [
        flip(&names[1], &|_| name_start - 1),
        flip(&names[2], &|_| value_start(&names[2]) - 1),
        flip(&names[6], &|_| 0),
    ];
    // The revision, the sealed value's key id, its ciphertext: reported by name.
    flip(&names[3], &|_| 12);
    flip(&names[4], &|_| value_start(&names[4]) + 4);
    flip(&names[5], &|bytes| bytes.len() - 16 - 3);
    // And the checksum itself.
    flip(&names[7], &|bytes| bytes.len() - 1);

    let report = h.vault.check().await.unwrap();
    assert!(!report.is_healthy());
    assert_eq!(
        report.examined + report.unreadable.len(),
        ENTRIES,
        "every file is accounted for: {report:?}"
    );
    assert_eq!(report.opened, ENTRIES - 7, "{report:?}");
    let mut problems: Vec<(String, &str)> = report
        .problems
        .iter()
        .map(|p| (p.name.to_string(), p.error.code()))
        .collect();
    problems.sort();
    assert_eq!(
        problems,
        [
            "token/dmg/u3",
            "token/dmg/u4",
            "token/dmg/u5",
            "token/dmg/u7"
        ]
        .map(|n| (n.to_owned(), "vault_entry_malformed"))
    );
    let mut unreadable = report.unreadable.clone();
    unreadable.sort();
    let mut expected = unnamed.to_vec();
    expected.sort();
    assert_eq!(unreadable.len(), 3, "{report:?}");
    for (reported, file) in unreadable.iter().zip(&expected) {
        assert!(reported.starts_with(file.as_str()), "{reported} / {file}");
    }
    assert_eq!(
        report.by_key.keys().collect::<Vec<_>>(),
        [&key_id],
        "no key is invented from a damaged header"
    );
    let printed = format!("{report:?}");
    assert!(!printed.contains("DAMAGE-PLAINTEXT"));
}

/// Files written before entry files had a checksum (version 1) still open, and get one when
/// they are next written.
#[tokio::test]
async fn an_entry_file_without_a_checksum_still_opens() {
    let h = Harness::file().await;
    let Backend::File { dir } = &h.backend else {
        unreachable!()
    };
    let n = name("token/old/format");
    h.vault.put(&n, &secret("old")).await.unwrap();
    let path = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "entry"))
        .expect("the entry file");
    let mut bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes[4], 2);
    bytes[4] = 1;
    bytes.truncate(bytes.len() - 16);
    std::fs::write(&path, &bytes).unwrap();

    assert_eq!(text(&h.vault.get(&n).await.unwrap().unwrap().0), "old");
    assert!(h.vault.check().await.unwrap().is_healthy());
    h.vault.put(&n, &secret("new")).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap()[4], 2);
    assert_eq!(text(&h.vault.get(&n).await.unwrap().unwrap().0), "new");
}
