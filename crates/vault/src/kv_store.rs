//! The distributed store: a JetStream key-value bucket.

use std::fmt;
use std::time::Duration;

use async_nats::header::{self, HeaderMap, HeaderValue};
use async_nats::jetstream::{self, context::PublishErrorKind, kv};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt as _, TryStreamExt as _};

use crate::error::StoreError;
use crate::name::SecretName;
use crate::store::{Revision, SecretStore, StoredValue};

/// Reads in flight at once while listing names.
const LISTING_CONCURRENCY: usize = 16;

/// Bucket name used when none is configured.
pub const DEFAULT_BUCKET: &str = "switchboard_vault";

/// How a [`KvStore`] creates its bucket if it does not exist yet.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KvStoreConfig {
    /// Bucket name (`[A-Za-z0-9_-]+`); the stream is `KV_<bucket>`.
    pub bucket: String,
    /// Replicas of the bucket's stream in a JetStream cluster (1, 3 or 5).
    pub replicas: usize,
    /// How long the marker of a deleted or expired entry stays before the server removes it.
    pub marker_ttl: Duration,
}

impl KvStoreConfig {
    /// Defaults for `bucket`: one replica, markers kept for 15 minutes.
    pub fn new(bucket: impl Into<String>) -> KvStoreConfig {
        KvStoreConfig {
            bucket: bucket.into(),
            replicas: 1,
            marker_ttl: Duration::from_secs(15 * 60),
        }
    }

    /// Sets the number of replicas.
    pub fn with_replicas(mut self, replicas: usize) -> KvStoreConfig {
        self.replicas = replicas;
        self
    }
}

impl Default for KvStoreConfig {
    fn default() -> Self {
        KvStoreConfig::new(DEFAULT_BUCKET)
    }
}

/// The distributed store: a JetStream key-value bucket. Cheap to clone.
///
/// - Entry names are KV keys as they are ([`SecretName`] is a subset of valid keys).
/// - Revisions are stream sequences; compare-and-swap and create-only writes are publishes
///   with `Nats-Expected-Last-Subject-Sequence`, so the server decides who wins.
/// - The bucket keeps one message per key (history 1): an overwritten ciphertext (say, one
///   under a retired master key) is gone from the stream, not only hidden.
/// - The bucket is created with per-message TTLs and delete-marker TTLs (nats-server 2.11+).
///   A time-to-live entry is published with a `Nats-TTL` so the server drops it by itself
///   once it has expired (the expiry sealed in the value is what the vault enforces), and a
///   delete leaves a purge marker that also expires: short-lived entries such as OAuth
///   `state` do not leave a subject behind forever. On a bucket made without TTL support
///   the store works the same, without server-side clean-up.
#[derive(Clone)]
pub struct KvStore {
    js: jetstream::Context,
    kv: kv::Store,
    /// Subject prefix for writes: `$KV.<bucket>.`.
    subject_prefix: String,
    /// Whether the bucket accepts per-message TTLs.
    server_ttl: bool,
    marker_ttl: Duration,
}

impl fmt::Debug for KvStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvStore")
            .field("bucket", &self.kv.name)
            .field("server_ttl", &self.server_ttl)
            .finish_non_exhaustive()
    }
}

impl KvStore {
    /// Opens the bucket `bucket`, creating it with defaults if it does not exist.
    pub async fn open(js: jetstream::Context, bucket: &str) -> Result<KvStore, StoreError> {
        KvStore::open_with(js, KvStoreConfig::new(bucket)).await
    }

    /// Opens the bucket named in `config`, creating it with `config` if it does not exist.
    /// An existing bucket is used as it is.
    pub async fn open_with(
        js: jetstream::Context,
        config: KvStoreConfig,
    ) -> Result<KvStore, StoreError> {
        let kv = match js.get_key_value(config.bucket.as_str()).await {
            Ok(kv) => kv,
            Err(get_error) if get_error.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
                js.create_key_value(kv::Config {
                    bucket: config.bucket.clone(),
                    description: "Switchboard vault: sealed OAuth tokens and client secrets"
                        .to_owned(),
                    history: 1,
                    num_replicas: config.replicas,
                    limit_markers: Some(config.marker_ttl),
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    StoreError::backend(
                        "creating the vault KV bucket (needs nats-server 2.11 or later with JetStream)",
                        e,
                    )
                })?
            }
            Err(e) => return Err(StoreError::backend("opening the vault KV bucket", e)),
        };
        if kv.use_jetstream_prefix {
            return Err(StoreError::backend(
                "opening the vault KV bucket",
                "a JetStream context with a custom API prefix or domain is not supported by the vault",
            ));
        }
        let stream_config = &kv.stream.cached_info().config;
        if stream_config.max_messages_per_subject != 1 {
            tracing::warn!(
                bucket = %kv.name,
                history = stream_config.max_messages_per_subject,
                "the vault KV bucket keeps more than one revision per entry: overwritten \
                 ciphertexts (also those under retired master keys) stay in the stream; \
                 recreate it with history 1"
            );
        }
        let server_ttl = stream_config.allow_message_ttl;
        if !server_ttl {
            tracing::warn!(
                bucket = %kv.name,
                "the vault KV bucket has no per-message TTL support; expired and deleted entries \
                 leave markers behind until the bucket is recreated on nats-server 2.11+"
            );
        }
        Ok(KvStore {
            subject_prefix: kv.put_prefix.clone().unwrap_or_else(|| kv.prefix.clone()),
            js,
            kv,
            server_ttl,
            marker_ttl: config.marker_ttl,
        })
    }

    /// The bucket name.
    pub fn bucket(&self) -> &str {
        &self.kv.name
    }

    /// The name of the bucket's stream (`KV_<bucket>`).
    pub fn stream_name(&self) -> &str {
        &self.kv.stream_name
    }

    /// Publishes `value` for `name` if the key's last sequence is `expected` (0: no message).
    async fn publish_expecting(
        &self,
        name: &SecretName,
        value: Bytes,
        expected: u64,
        ttl: Option<Duration>,
    ) -> Result<u64, StoreError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            HeaderValue::from(expected),
        );
        if let Some(ttl) = ttl.filter(|_| self.server_ttl) {
            headers.insert(
                header::NATS_MESSAGE_TTL,
                HeaderValue::from(server_secs(ttl)),
            );
        }
        let subject = format!("{}{}", self.subject_prefix, name.as_str());
        let ack = self
            .js
            .publish_with_headers(subject, headers, value)
            .await
            .map_err(map_publish_error)?
            .await
            .map_err(map_publish_error)?;
        Ok(ack.sequence)
    }

    async fn entry(&self, name: &SecretName) -> Result<Option<kv::Entry>, StoreError> {
        self.kv
            .entry(name.as_str())
            .await
            .map_err(|e| StoreError::backend("reading from the vault KV bucket", e))
    }
}

/// Whole seconds for a server-side TTL, rounded up, at least one.
fn server_secs(ttl: Duration) -> u64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.max(1)
}

fn map_publish_error(error: jetstream::context::PublishError) -> StoreError {
    if error.kind() == PublishErrorKind::WrongLastSequence {
        StoreError::Conflict
    } else {
        StoreError::backend("writing to the vault KV bucket", error)
    }
}

fn map_update_error(operation: &'static str, error: kv::UpdateError) -> StoreError {
    if error.kind() == kv::UpdateErrorKind::WrongLastRevision {
        StoreError::Conflict
    } else {
        StoreError::backend(operation, error)
    }
}

#[async_trait]
impl SecretStore for KvStore {
    async fn get(&self, name: &SecretName) -> Result<Option<StoredValue>, StoreError> {
        Ok(self.entry(name).await?.and_then(|entry| {
            (entry.operation == kv::Operation::Put).then(|| StoredValue {
                value: entry.value,
                revision: Revision::new(entry.revision),
            })
        }))
    }

    async fn put(&self, name: &SecretName, value: Bytes) -> Result<Revision, StoreError> {
        self.kv
            .put(name.as_str(), value)
            .await
            .map(Revision::new)
            .map_err(|e| StoreError::backend("writing to the vault KV bucket", e))
    }

    async fn create(
        &self,
        name: &SecretName,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<Revision, StoreError> {
        // Not `kv::Store::create_with_ttl`: over a delete marker it re-publishes without the
        // TTL. A key that never existed (or whose marker expired) has last sequence 0; one
        // that was deleted has its marker as last message.
        let mut expected = 0;
        for _ in 0..3 {
            match self
                .publish_expecting(name, value.clone(), expected, ttl)
                .await
            {
                Ok(sequence) => return Ok(Revision::new(sequence)),
                Err(StoreError::Conflict) => {}
                Err(e) => return Err(e),
            }
            match self.entry(name).await? {
                Some(entry) if entry.operation == kv::Operation::Put => {
                    return Err(StoreError::Conflict);
                }
                Some(marker) => expected = marker.revision,
                None => expected = 0,
            }
        }
        // Three markers in a row replaced under our feet: another writer is busy here.
        Err(StoreError::Conflict)
    }

    async fn update(
        &self,
        name: &SecretName,
        value: Bytes,
        expected: Revision,
        ttl: Option<Duration>,
    ) -> Result<Revision, StoreError> {
        self.publish_expecting(name, value, expected.get(), ttl)
            .await
            .map(Revision::new)
    }

    async fn delete(
        &self,
        name: &SecretName,
        expected: Option<Revision>,
    ) -> Result<(), StoreError> {
        const OPERATION: &str = "deleting from the vault KV bucket";
        // A purge (not a delete marker) rolls up the key: no earlier message survives.
        let result = match (expected, self.server_ttl) {
            (Some(revision), true) => {
                self.kv
                    .purge_expect_revision_with_ttl(name.as_str(), revision.get(), self.marker_ttl)
                    .await
            }
            (Some(revision), false) => {
                self.kv
                    .purge_expect_revision(name.as_str(), Some(revision.get()))
                    .await
            }
            (None, true) => self.kv.purge_with_ttl(name.as_str(), self.marker_ttl).await,
            (None, false) => self.kv.purge(name.as_str()).await,
        };
        result.map_err(|e| map_update_error(OPERATION, e))
    }

    async fn names(&self) -> Result<Vec<SecretName>, StoreError> {
        const OPERATION: &str = "listing the vault KV bucket";
        // Not `kv::Store::keys`: its consumer can report "nothing pending" too early while
        // keys are being written, and end the listing with keys missing; a rotation would
        // then skip entries. The stream's subject list is a snapshot in one response (up to
        // 100,000 keys per page), complete for every key that had a message at that moment,
        // delete markers included.
        let subjects: Vec<(String, usize)> = self
            .kv
            .stream
            .info_with_subjects(format!("{}>", self.kv.prefix))
            .await
            .map_err(|e| StoreError::backend(OPERATION, e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(OPERATION, e))?;
        let candidates: Vec<SecretName> = subjects
            .into_iter()
            .filter_map(|(subject, _)| {
                let name = SecretName::parse(subject.strip_prefix(&self.kv.prefix)?);
                if name.is_err() {
                    tracing::warn!(
                        "skipping a key in the vault KV bucket that is not a valid entry name"
                    );
                }
                name.ok()
            })
            .collect();
        // Drop keys whose last message is a delete marker.
        let mut names: Vec<SecretName> = futures_util::stream::iter(candidates)
            .map(|name| async move {
                let entry = self.entry(&name).await?;
                let live = entry.is_some_and(|e| e.operation == kv::Operation::Put);
                Ok::<_, StoreError>(live.then_some(name))
            })
            .buffer_unordered(LISTING_CONCURRENCY)
            .try_filter_map(|name| async move { Ok(name) })
            .try_collect()
            .await?;
        names.sort_unstable();
        Ok(names)
    }
}
