//! Secrets at rest for Switchboard: OAuth access and refresh tokens, OAuth client secrets
//! and in-flight PKCE verifiers. Secrets never enter the event stream; they live here.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use vault::{FileStore, KeyRing, Secret, SecretName, Vault, DEFAULT_STATE_TTL};
//!
//! let keys = KeyRing::load_or_generate("data/vault.keys".as_ref())?;
//! let vault = Vault::new(Arc::new(FileStore::open("data/vault")?), keys);
//!
//! let name = SecretName::parse("token/github_prod/user-42")?;
//! let revision = vault.put(&name, &Secret::from("gho_…".to_owned())).await?;
//! let (token, _revision) = vault.get(&name).await?.expect("just stored");
//!
//! let state = SecretName::parse("oauth_state/Zk3…")?;
//! vault.put_with_ttl(&state, &Secret::from("pkce verifier".to_owned()), DEFAULT_STATE_TTL).await?;
//! let verifier = vault.take(&state).await?; // Some once, None for a replay
//! # let _ = (revision, token, verifier); Ok(()) }
//! ```
//!
//! # Decisions
//!
//! - **Sealing.** AES-256-GCM from `ring` with a random 96-bit nonce per write
//!   (`SystemRandom`). The sealed value is a small versioned binary format (see `seal.rs`):
//!   magic `SV`, format version, master key id, nonce, optional expiry, ciphertext + tag.
//!   The associated data is the entry name plus that whole header, so a value moved to
//!   another name, a changed key id, a stripped or extended time-to-live and every flipped
//!   byte make opening fail with [`VaultError::Tampered`] (or [`VaultError::Malformed`] /
//!   [`VaultError::UnknownKey`] when the header itself is unreadable or names a key that is
//!   not loaded), never with garbage. With random nonces a key should seal fewer than 2³²
//!   values; rotate long before that.
//! - **Master keys** come from `SWITCHBOARD_VAULT_KEYS` or a key file (format in
//!   [`keyring`](crate::keyring#key-file-format)): `key <id> <base64>` lines and one
//!   `current <id>`. The embedded default generates the file (mode 0600) on first start and
//!   warns loudly ([`KeyRing::load_or_generate`]). The AES key schedules are prepared once
//!   per [`KeyRing`]; a running [`Vault`] swaps rings with [`Vault::set_keyring`].
//! - **Store port.** [`SecretStore`] is an object-safe async trait (`async-trait`) over
//!   sealed bytes with revisions: get, put, create-if-absent, update-if-revision,
//!   delete(-if-revision), list. [`Vault`] holds an `Arc<dyn SecretStore>`, so services do not
//!   know the adapter. Adapters: [`FileStore`] (embedded: one file per entry, atomic
//!   write-and-rename, 0600/0700, an exclusive lock file so one process owns the directory)
//!   and [`KvStore`] (JetStream KV, history 1, server-side compare-and-swap). Both pass the
//!   same test suite.
//! - **Revisions and compare-and-swap.** Every write returns a [`Revision`];
//!   [`Vault::compare_and_swap`] writes only if the revision is unchanged (`None`: only if
//!   absent) and otherwise fails with [`VaultError::Conflict`]. Two replicas refreshing one
//!   token: exactly one wins; the other re-reads the winner's token.
//! - **Time-to-live.** [`Vault::put_with_ttl`] is create-only and seals the expiry into the
//!   value, where it is authenticated; it is enforced on every read against an injectable
//!   [`Clock`]. Expired entries read as absent and are removed lazily (the KV store also lets
//!   the server drop them). [`Vault::take`] is get + delete-if-revision, so it succeeds at most
//!   once per write: a replayed OAuth `state` gets `None`.
//! - **Rotation** ([`Vault::rotate`]) re-seals every entry not under the current key with a
//!   compare-and-swap on the revision it read; on a conflict it re-reads (the concurrent writer
//!   used the current key), so nothing is lost while services keep running.
//!   [`Vault::check`] opens everything and reports problems by name;
//!   [`Vault::retire_key`] removes an old key only when no entry uses it. The command line:
//!   1. `vault rotate --new-key`: [`KeyFile::load`], [`KeyFile::add_new_key`]`(true)`,
//!      [`KeyFile::save`], [`Vault::set_keyring`]`(key_file.keyring()?)`, [`Vault::rotate`];
//!   2. `vault rotate --retire <id>`: [`Vault::retire_key`];
//!   3. `vault check`: [`Vault::check`], exit non-zero unless [`CheckReport::is_healthy`].
//!
//!   With several replicas, first roll out the new key as non-current (`add_new_key(false)`),
//!   then make it current everywhere, then rotate, then retire: a replica never meets a key id
//!   it lacks.
//! - **Plaintext hygiene.** [`Secret`] wipes its bytes on drop (`zeroize`), prints
//!   `Secret(<redacted, N bytes>)` as `Debug`, and has no `Display` or `Serialize`. Opening
//!   decrypts in place into a zeroizing buffer; sealing encrypts in place in the output
//!   buffer. Key material read from files or the environment is wiped after parsing. Errors
//!   and reports carry names, key ids and causes, never values or keys. Entry names are not
//!   secret: never put a token into a name.
//!
//! # Sealed value format
//!
//! What a store holds for one entry (format version 1):
//!
//! ```text
//! offset  size  field
//! 0       2     magic "SV"
//! 2       1     format version (1)
//! 3       1     key id length L (1..=64)
//! 4       L     key id (ASCII)
//! 4+L     12    nonce (random per write)
//! 16+L    1     flags: bit 0 = an expiry follows
//! 17+L    8     expires at, unix milliseconds, big endian (only with flag bit 0)
//! ...     n+16  AES-256-GCM ciphertext of the n plaintext bytes, then the 16-byte tag
//! ```
//!
//! Associated data: the entry name's length (u16, big endian), the name, then the whole
//! header above (magic through expiry).

mod clock;
mod error;
mod file_store;
mod fsutil;
pub mod keyring;
mod kv_store;
mod name;
mod seal;
mod secret;
mod store;
mod vault;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{BoxError, StoreError, VaultError};
pub use file_store::FileStore;
pub use keyring::{KEYS_ENV_VAR, KeyFile, KeyId, KeyRing};
pub use kv_store::{DEFAULT_BUCKET, KvStore, KvStoreConfig};
pub use name::SecretName;
pub use secret::Secret;
pub use store::{Revision, SecretStore, StoredValue};
pub use vault::{CheckReport, DEFAULT_STATE_TTL, EntryProblem, RotationReport, Vault};
