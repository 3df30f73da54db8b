//! The store port: where sealed values live. The vault only ever hands a store ciphertext.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::StoreError;
use crate::name::SecretName;

/// The revision of an entry: changes on every write. Compare-and-swap and take-once are
/// built on it. In the KV store it is the stream sequence; in the file store a counter. A
/// revision is never reused for a different write while the store is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(u64);

impl Revision {
    /// Wraps a store's revision number.
    pub const fn new(revision: u64) -> Revision {
        Revision(revision)
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A sealed value as stored, with its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredValue {
    /// The sealed bytes (never plaintext).
    pub value: Bytes,
    /// The entry's current revision.
    pub revision: Revision,
}

/// A place to keep sealed values by name, with revisions. Adapters: [`FileStore`] (embedded
/// default) and [`KvStore`] (JetStream KV, distributed).
///
/// `ttl` arguments are a hint that lets a store drop an entry by itself some time after it
/// expired; the expiry sealed into the value is what the vault enforces.
///
/// [`FileStore`]: crate::FileStore
/// [`KvStore`]: crate::KvStore
#[async_trait]
pub trait SecretStore: Send + Sync + fmt::Debug {
    /// The current value, or `None` if the entry does not exist.
    async fn get(&self, name: &SecretName) -> Result<Option<StoredValue>, StoreError>;

    /// Writes unconditionally.
    async fn put(&self, name: &SecretName, value: Bytes) -> Result<Revision, StoreError>;

    /// Writes only if the entry does not exist, else [`StoreError::Conflict`].
    async fn create(
        &self,
        name: &SecretName,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<Revision, StoreError>;

    /// Writes only if the entry's revision is `expected`, else [`StoreError::Conflict`].
    async fn update(
        &self,
        name: &SecretName,
        value: Bytes,
        expected: Revision,
        ttl: Option<Duration>,
    ) -> Result<Revision, StoreError>;

    /// Deletes the entry. With `expected`, only if that is its revision (else
    /// [`StoreError::Conflict`], also when it does not exist); without, deleting a missing
    /// entry succeeds.
    async fn delete(&self, name: &SecretName, expected: Option<Revision>)
    -> Result<(), StoreError>;

    /// Names of all existing entries, in no particular order.
    async fn names(&self) -> Result<Vec<SecretName>, StoreError>;

    /// Stored items that cannot be read as entries at all, so that their entry name is not
    /// known or not to be trusted (e.g. a file store entry whose own header or name is
    /// damaged), described by where they are and what is wrong, never by their content.
    /// `names` skips them; `Vault::check` reports them.
    async fn unreadable(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
}
