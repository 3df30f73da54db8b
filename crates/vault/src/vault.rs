//! The vault: sealing and opening on top of a [`SecretStore`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use ring::rand::SystemRandom;

use crate::clock::{Clock, SystemClock, unix_ms};
use crate::error::{StoreError, VaultError};
use crate::keyring::{KeyFile, KeyId, KeyRing};
use crate::name::SecretName;
use crate::seal::{self, Header};
use crate::secret::Secret;
use crate::store::{Revision, SecretStore, StoredValue};

/// Time-to-live of an OAuth `state` entry (with its PKCE verifier) unless told otherwise.
pub const DEFAULT_STATE_TTL: Duration = Duration::from_secs(10 * 60);

/// How often an operation that races other writers re-reads before giving up.
const MAX_ATTEMPTS: usize = 5;

/// Secrets at rest: named entries sealed with AES-256-GCM under the current master key.
///
/// Cheap to clone (an `Arc` inside), `Send + Sync`; services hold a `Vault` without knowing
/// which store is underneath. See the [crate docs](crate) for the guarantees.
#[derive(Clone)]
pub struct Vault {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn SecretStore>,
    keyring: RwLock<Arc<KeyRing>>,
    clock: Arc<dyn Clock>,
    rng: SystemRandom,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("store", &self.inner.store)
            .field("current_key", self.keyring().current_key_id())
            .finish_non_exhaustive()
    }
}

/// What happened to one entry during [`Vault::rotate`] or [`Vault::check`] that needs a
/// person's attention. Carries the entry name and the error, never a value.
#[derive(Debug)]
pub struct EntryProblem {
    /// The entry.
    pub name: SecretName,
    /// Why it could not be opened (or re-sealed).
    pub error: VaultError,
}

impl fmt::Display for EntryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The error names the entry already.
        write!(f, "{}", self.error)
    }
}

/// The outcome of [`Vault::rotate`].
#[derive(Debug)]
#[non_exhaustive]
pub struct RotationReport {
    /// The key every entry was re-sealed under.
    pub current_key: KeyId,
    /// Entries looked at.
    pub examined: usize,
    /// Entries re-sealed under the current key by this run.
    pub reencrypted: usize,
    /// Entries already under the current key (new writes, or an earlier run).
    pub already_current: usize,
    /// Expired entries that were removed instead of re-sealed.
    pub expired_removed: usize,
    /// Entries that disappeared while the rotation ran.
    pub vanished: usize,
    /// Entries that could not be re-sealed; they still use their old key.
    pub problems: Vec<EntryProblem>,
}

impl RotationReport {
    /// Whether every entry is now sealed under the current key.
    pub fn is_complete(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The outcome of [`Vault::check`].
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct CheckReport {
    /// Entries looked at.
    pub examined: usize,
    /// Entries that opened.
    pub opened: usize,
    /// Entries that opened but have expired (they read as absent).
    pub expired: usize,
    /// How many entries each loaded key seals (from the entries' headers, opened or not).
    /// An entry naming a key id that is not loaded is not counted: it is reported in
    /// `problems` (the key is missing, or the header is damaged).
    pub by_key: BTreeMap<String, usize>,
    /// Entries that could not be opened.
    pub problems: Vec<EntryProblem>,
    /// Stored items so damaged that their entry name is unknown or wrong (see
    /// [`SecretStore::unreadable`]), by location and what is wrong with them.
    pub unreadable: Vec<String>,
}

impl CheckReport {
    /// Whether every entry opened.
    pub fn is_healthy(&self) -> bool {
        self.problems.is_empty() && self.unreadable.is_empty()
    }

    /// How many entries are sealed under `key`.
    pub fn entries_using(&self, key: &KeyId) -> usize {
        self.by_key.get(key.as_str()).copied().unwrap_or(0)
    }
}

enum RotateOutcome {
    Reencrypted,
    AlreadyCurrent,
    ExpiredRemoved,
    Vanished,
    Problem(VaultError),
}

impl Vault {
    /// A vault over `store`, sealing with `keyring`'s current key.
    pub fn new(store: Arc<dyn SecretStore>, keyring: KeyRing) -> Vault {
        Vault::with_clock(store, keyring, Arc::new(SystemClock))
    }

    /// Like [`Vault::new`], with the clock used for time-to-live (tests pass a
    /// [`ManualClock`](crate::ManualClock)).
    pub fn with_clock(
        store: Arc<dyn SecretStore>,
        keyring: KeyRing,
        clock: Arc<dyn Clock>,
    ) -> Vault {
        Vault {
            inner: Arc::new(Inner {
                store,
                keyring: RwLock::new(Arc::new(keyring)),
                clock,
                rng: SystemRandom::new(),
            }),
        }
    }

    /// The keys in use now.
    pub fn keyring(&self) -> Arc<KeyRing> {
        Arc::clone(&self.inner.keyring.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Swaps the keys at run time, e.g. after a new key was added to the key file. Writes
    /// that start afterwards seal under the new ring's current key.
    pub fn set_keyring(&self, keyring: KeyRing) {
        let keyring = Arc::new(keyring);
        tracing::info!(current_key = %keyring.current_key_id(), "vault master keys replaced");
        *self
            .inner
            .keyring
            .write()
            .unwrap_or_else(|e| e.into_inner()) = keyring;
    }

    /// The store underneath (it holds only sealed values).
    pub fn store(&self) -> &Arc<dyn SecretStore> {
        &self.inner.store
    }

    fn now_ms(&self) -> u64 {
        unix_ms(self.inner.clock.now())
    }

    fn seal(
        &self,
        keyring: &KeyRing,
        name: &SecretName,
        plaintext: &[u8],
        expires_at_ms: Option<u64>,
    ) -> Result<Bytes, VaultError> {
        seal::seal(
            keyring.current(),
            &self.inner.rng,
            name,
            plaintext,
            expires_at_ms,
        )
        .map(Bytes::from)
    }

    /// Stores `secret` under `name`, replacing any value.
    pub async fn put(&self, name: &SecretName, secret: &Secret) -> Result<Revision, VaultError> {
        let sealed = self.seal(&self.keyring(), name, secret.expose(), None)?;
        self.inner
            .store
            .put(name, sealed)
            .await
            .map_err(|e| VaultError::from_store(name, e))
    }

    /// Stores `secret` under `name` for `ttl`, only if no live entry has that name (else
    /// [`VaultError::Conflict`]). After `ttl` the entry reads as absent. Meant for OAuth
    /// `state` + PKCE verifier: create with [`DEFAULT_STATE_TTL`], consume with
    /// [`Vault::take`].
    pub async fn put_with_ttl(
        &self,
        name: &SecretName,
        secret: &Secret,
        ttl: Duration,
    ) -> Result<Revision, VaultError> {
        let sealed = self.seal_for(name, secret, ttl)?;
        self.create(name, sealed, Some(ttl)).await
    }

    /// `secret` sealed for `name`, to expire `ttl` from now.
    fn seal_for(
        &self,
        name: &SecretName,
        secret: &Secret,
        ttl: Duration,
    ) -> Result<Bytes, VaultError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let expires_at = self.now_ms().saturating_add(ttl_ms);
        self.seal(&self.keyring(), name, secret.expose(), Some(expires_at))
    }

    /// Create-only write where an expired entry counts as absent.
    async fn create(
        &self,
        name: &SecretName,
        sealed: Bytes,
        ttl: Option<Duration>,
    ) -> Result<Revision, VaultError> {
        let store = &self.inner.store;
        match store.create(name, sealed.clone(), ttl).await {
            Err(StoreError::Conflict) => {}
            other => return other.map_err(|e| VaultError::from_store(name, e)),
        }
        // Something is there: if it has expired, clear it away and try once more.
        let Some(existing) = self.store_get(name).await? else {
            return store
                .create(name, sealed, ttl)
                .await
                .map_err(|e| VaultError::from_store(name, e));
        };
        let header = seal::header_of(name, &existing.value)?;
        if !header.is_expired(self.now_ms()) {
            return Err(VaultError::Conflict { name: name.clone() });
        }
        self.remove_expired_entry(name, &existing, &header).await?;
        store
            .create(name, sealed, ttl)
            .await
            .map_err(|e| VaultError::from_store(name, e))
    }

    async fn store_get(&self, name: &SecretName) -> Result<Option<StoredValue>, VaultError> {
        self.inner
            .store
            .get(name)
            .await
            .map_err(|e| VaultError::from_store(name, e))
    }

    /// Deletes an expired entry if it is still the one that was read. The entry is opened
    /// first: its expiry is only trusted once the tag has verified it, so a forged expiry
    /// is reported as tampering instead of silently deleting a live entry.
    async fn remove_expired_entry(
        &self,
        name: &SecretName,
        stored: &StoredValue,
        header: &Header<'_>,
    ) -> Result<bool, VaultError> {
        seal::open(&self.keyring(), name, &stored.value, header)?;
        match self.inner.store.delete(name, Some(stored.revision)).await {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict) => Ok(false),
            Err(e) => Err(VaultError::from_store(name, e)),
        }
    }

    /// The secret under `name` and its revision; `None` if there is none or it expired.
    pub async fn get(&self, name: &SecretName) -> Result<Option<(Secret, Revision)>, VaultError> {
        let Some(stored) = self.store_get(name).await? else {
            return Ok(None);
        };
        let header = seal::header_of(name, &stored.value)?;
        if header.is_expired(self.now_ms()) {
            self.remove_expired_entry(name, &stored, &header).await?;
            return Ok(None);
        }
        let secret = seal::open(&self.keyring(), name, &stored.value, &header)?;
        Ok(Some((secret, stored.revision)))
    }

    /// Deletes the entry (no error if it does not exist).
    pub async fn delete(&self, name: &SecretName) -> Result<(), VaultError> {
        self.inner
            .store
            .delete(name, None)
            .await
            .map_err(|e| VaultError::from_store(name, e))
    }

    /// Deletes the entry only if its revision is still `revision`: releasing a lease deletes
    /// the holder's own entry, never the one a successor created after the holder's expired.
    /// Another revision, or no entry: [`VaultError::Conflict`].
    pub async fn delete_if_revision(
        &self,
        name: &SecretName,
        revision: Revision,
    ) -> Result<(), VaultError> {
        self.inner
            .store
            .delete(name, Some(revision))
            .await
            .map_err(|e| VaultError::from_store(name, e))
    }

    /// Writes `secret` only if the entry's revision is still `expected` (`None`: only if no
    /// live entry exists). If another writer got there first: [`VaultError::Conflict`]; re-read
    /// and decide again. This is how two replicas refreshing one token agree on a single
    /// winner.
    pub async fn compare_and_swap(
        &self,
        name: &SecretName,
        expected: Option<Revision>,
        secret: &Secret,
    ) -> Result<Revision, VaultError> {
        let sealed = self.seal(&self.keyring(), name, secret.expose(), None)?;
        match expected {
            None => self.create(name, sealed, None).await,
            Some(revision) => self
                .inner
                .store
                .update(name, sealed, revision, None)
                .await
                .map_err(|e| VaultError::from_store(name, e)),
        }
    }

    /// Rewrites a time-to-live entry with a fresh `ttl`, only if its revision is still
    /// `revision` (else [`VaultError::Conflict`]: it expired and another holder took the
    /// name, or it was rewritten). How a lease held longer than its time-to-live is kept.
    pub async fn renew(
        &self,
        name: &SecretName,
        revision: Revision,
        secret: &Secret,
        ttl: Duration,
    ) -> Result<Revision, VaultError> {
        let sealed = self.seal_for(name, secret, ttl)?;
        self.inner
            .store
            .update(name, sealed, revision, Some(ttl))
            .await
            .map_err(|e| VaultError::from_store(name, e))
    }

    /// Reads and deletes the entry in one step that succeeds at most once: of two callers
    /// taking the same entry, one gets it and the other gets `None`, as does anyone after
    /// them or after it expired. A replayed OAuth `state` is refused this way.
    pub async fn take(&self, name: &SecretName) -> Result<Option<Secret>, VaultError> {
        for _ in 0..MAX_ATTEMPTS {
            let Some(stored) = self.store_get(name).await? else {
                return Ok(None);
            };
            let header = seal::header_of(name, &stored.value)?;
            if header.is_expired(self.now_ms()) {
                self.remove_expired_entry(name, &stored, &header).await?;
                return Ok(None);
            }
            let secret = seal::open(&self.keyring(), name, &stored.value, &header)?;
            match self.inner.store.delete(name, Some(stored.revision)).await {
                Ok(()) => return Ok(Some(secret)),
                // Taken or rewritten meanwhile: look again.
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(VaultError::from_store(name, e)),
            }
        }
        Err(VaultError::Conflict { name: name.clone() })
    }

    /// Names of all entries (including expired ones not yet removed).
    pub async fn names(&self) -> Result<Vec<SecretName>, VaultError> {
        self.inner.store.names().await.map_err(VaultError::Store)
    }

    /// Removes every expired entry; returns how many. Worth running now and then on the file
    /// store, where nothing else drops abandoned OAuth `state` entries.
    pub async fn remove_expired(&self) -> Result<usize, VaultError> {
        let mut removed = 0;
        for name in self.names().await? {
            let Some(stored) = self.store_get(&name).await? else {
                continue;
            };
            let Ok(header) = seal::parse_header(&stored.value) else {
                continue;
            };
            if header.is_expired(self.now_ms())
                && matches!(
                    self.remove_expired_entry(&name, &stored, &header).await,
                    Ok(true)
                )
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Re-seals every entry that is not under the current key, while other tasks and
    /// replicas keep reading and writing.
    ///
    /// Load the new key first ([`Vault::set_keyring`]) so that new writes already use it;
    /// then every entry is read, opened with whichever key sealed it, and written back under
    /// the current key with a compare-and-swap on the revision that was read. If a writer
    /// got there first, its value was sealed under the current key, so the entry is re-read
    /// and nothing is lost. Expired entries are removed instead. Entries that cannot be
    /// opened are listed in the report and left alone; a store failure aborts (re-running is
    /// safe).
    pub async fn rotate(&self) -> Result<RotationReport, VaultError> {
        let keyring = self.keyring();
        let mut report = RotationReport {
            current_key: keyring.current_key_id().clone(),
            examined: 0,
            reencrypted: 0,
            already_current: 0,
            expired_removed: 0,
            vanished: 0,
            problems: Vec::new(),
        };
        for name in self.names().await? {
            report.examined += 1;
            match self.rotate_entry(&keyring, &name).await? {
                RotateOutcome::Reencrypted => report.reencrypted += 1,
                RotateOutcome::AlreadyCurrent => report.already_current += 1,
                RotateOutcome::ExpiredRemoved => report.expired_removed += 1,
                RotateOutcome::Vanished => report.vanished += 1,
                RotateOutcome::Problem(error) => {
                    tracing::warn!(entry = %name, %error, "vault entry not re-sealed");
                    report.problems.push(EntryProblem { name, error });
                }
            }
        }
        tracing::info!(
            current_key = %report.current_key,
            examined = report.examined,
            reencrypted = report.reencrypted,
            problems = report.problems.len(),
            "vault rotation finished"
        );
        Ok(report)
    }

    async fn rotate_entry(
        &self,
        keyring: &KeyRing,
        name: &SecretName,
    ) -> Result<RotateOutcome, VaultError> {
        let current = keyring.current_key_id().as_str();
        for _ in 0..MAX_ATTEMPTS {
            let Some(stored) = self.store_get(name).await? else {
                return Ok(RotateOutcome::Vanished);
            };
            let header = match seal::header_of(name, &stored.value) {
                Ok(header) => header,
                Err(problem) => return Ok(RotateOutcome::Problem(problem)),
            };
            if header.key_id == current {
                return Ok(RotateOutcome::AlreadyCurrent);
            }
            let now = self.now_ms();
            let secret = match seal::open(keyring, name, &stored.value, &header) {
                Ok(secret) => secret,
                Err(problem) => return Ok(RotateOutcome::Problem(problem)),
            };
            if header.is_expired(now) {
                match self.inner.store.delete(name, Some(stored.revision)).await {
                    Ok(()) => return Ok(RotateOutcome::ExpiredRemoved),
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(VaultError::from_store(name, e)),
                }
            }
            let sealed = self.seal(keyring, name, secret.expose(), header.expires_at_ms)?;
            drop(secret);
            let ttl = header
                .expires_at_ms
                .map(|at| Duration::from_millis(at.saturating_sub(now)));
            match self
                .inner
                .store
                .update(name, sealed, stored.revision, ttl)
                .await
            {
                Ok(_) => return Ok(RotateOutcome::Reencrypted),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(VaultError::from_store(name, e)),
            }
        }
        Ok(RotateOutcome::Problem(VaultError::Conflict {
            name: name.clone(),
        }))
    }

    /// Opens every entry and reports, by name, those that cannot be opened, and how many
    /// entries each key seals. Never returns a value. A store failure aborts.
    pub async fn check(&self) -> Result<CheckReport, VaultError> {
        let keyring = self.keyring();
        let mut report = CheckReport::default();
        for name in self.names().await? {
            let stored = match self.inner.store.get(&name).await {
                Ok(Some(stored)) => stored,
                // Deleted since it was listed.
                Ok(None) => continue,
                // A damaged stored item is this entry's problem, not the end of the check.
                Err(StoreError::Corrupt { reason, .. }) => {
                    report.examined += 1;
                    report.problems.push(EntryProblem {
                        error: VaultError::Malformed {
                            name: name.clone(),
                            reason,
                        },
                        name,
                    });
                    continue;
                }
                Err(error) => return Err(VaultError::from_store(&name, error)),
            };
            report.examined += 1;
            let header = match seal::header_of(&name, &stored.value) {
                Ok(header) => header,
                Err(error) => {
                    report.problems.push(EntryProblem { name, error });
                    continue;
                }
            };
            // Only keys this vault has are counted: an id no loaded key has may be a damaged
            // header, and counting it would invent a key (the entry is reported below).
            if keyring.contains(header.key_id) {
                *report.by_key.entry(header.key_id.to_owned()).or_default() += 1;
            }
            match seal::open(&keyring, &name, &stored.value, &header) {
                Ok(_) => {
                    report.opened += 1;
                    if header.is_expired(self.now_ms()) {
                        report.expired += 1;
                    }
                }
                Err(error) => report.problems.push(EntryProblem { name, error }),
            }
        }
        report.unreadable = self
            .inner
            .store
            .unreadable()
            .await
            .map_err(VaultError::Store)?;
        Ok(report)
    }

    /// Removes `key_id` from `key_file` (saving it) and from this vault's keys, but only if
    /// no entry is sealed under it any more; otherwise [`VaultError::KeyConfig`] says how many
    /// still are. Returns the check that proved it.
    ///
    /// With several replicas, run this only after every replica seals under the new key:
    /// one that still seals under the old key could write between the check and the removal.
    pub async fn retire_key(
        &self,
        key_file: &mut KeyFile,
        key_id: &KeyId,
    ) -> Result<CheckReport, VaultError> {
        if key_file.current_key_id() == key_id {
            return Err(VaultError::key_config(format!(
                "key `{key_id}` is the current key; add a new current key and rotate before retiring it"
            )));
        }
        let report = self.check().await?;
        let still_using = report.entries_using(key_id);
        if still_using > 0 {
            return Err(VaultError::key_config(format!(
                "{still_using} vault entries are still sealed under key `{key_id}`; \
                 run `switchboard vault rotate` (and fix the entries it reports) first"
            )));
        }
        key_file.remove_key(key_id)?;
        key_file.save()?;
        self.set_keyring(key_file.keyring()?);
        tracing::info!(%key_id, path = %key_file.path().display(), "vault master key retired");
        Ok(report)
    }
}
