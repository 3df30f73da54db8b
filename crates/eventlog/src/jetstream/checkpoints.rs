//! Projection checkpoints in a JetStream KV bucket.
//!
//! One key per projection (the key is the projection name), history 1. The value is the
//! checkpoint's position as 8 bytes big-endian followed by the snapshot bytes.
//!
//! Size: a value is one NATS message, so it must fit the server's `max_payload` (1 MiB by
//! default, at most 64 MiB when raised in the server configuration) as well as the bucket's
//! [`MAX_CHECKPOINT_VALUE_SIZE`]. A bigger snapshot is refused with an `InvalidEvent` error
//! that says so; nothing is written and the previous checkpoint stays.
use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};

use crate::{
    EventLogError,
    projection::{Checkpoint, CheckpointStore},
};

/// The largest value the bucket accepts (8-byte position + snapshot).
pub const MAX_CHECKPOINT_VALUE_SIZE: usize = 8 * 1024 * 1024;
const POSITION_LEN: usize = 8;

/// Checkpoints in a JetStream KV bucket.
#[derive(Debug, Clone)]
pub struct KvCheckpointStore {
    store: kv::Store,
    client: async_nats::Client,
    bucket: String,
}

impl KvCheckpointStore {
    /// Opens (creating or updating) the bucket, with one replica.
    pub async fn open(js: &jetstream::Context, bucket: &str) -> Result<Self, EventLogError> {
        Self::open_with_replicas(js, bucket, 1).await
    }

    /// Opens (creating or updating) the bucket with `replicas` replicas (3 in a cluster).
    pub async fn open_with_replicas(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
    ) -> Result<Self, EventLogError> {
        let store = js
            .create_or_update_key_value(kv::Config {
                bucket: bucket.to_owned(),
                description: "Switchboard projection checkpoints".to_owned(),
                history: 1,
                max_value_size: MAX_CHECKPOINT_VALUE_SIZE as i32,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas.max(1),
                ..Default::default()
            })
            .await
            .map_err(|err| {
                EventLogError::unavailable(format!(
                    "cannot open checkpoint bucket {bucket:?} (names are A-Z a-z 0-9 _ -): {err}"
                ))
            })?;
        Ok(KvCheckpointStore {
            store,
            client: js.client(),
            bucket: bucket.to_owned(),
        })
    }

    fn key(&self, name: &str) -> Result<(), EventLogError> {
        let valid = !name.is_empty()
            && name.len() <= 200
            && !name.starts_with('.')
            && !name.ends_with('.')
            && name.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'/' | b'=' | b'.')
            });
        if valid {
            Ok(())
        } else {
            Err(EventLogError::InvalidEvent {
                reason: format!(
                    "projection name {:?} is not a valid checkpoint key (1 to 200 of A-Z a-z 0-9 \
                     _ - / = and inner dots)",
                    name.chars().take(200).collect::<String>()
                ),
            })
        }
    }
}

#[async_trait]
impl CheckpointStore for KvCheckpointStore {
    async fn load(&self, name: &str) -> Result<Option<Checkpoint>, EventLogError> {
        self.key(name)?;
        let value = self.store.get(name).await.map_err(|err| {
            EventLogError::unavailable(format!(
                "cannot load checkpoint {name} from bucket {}: {err}",
                self.bucket
            ))
        })?;
        let Some(value) = value else {
            return Ok(None);
        };
        if value.len() < POSITION_LEN {
            return Err(EventLogError::Corrupt {
                location: format!("checkpoint {name} in bucket {}", self.bucket),
                reason: format!(
                    "value of {} bytes is shorter than its position",
                    value.len()
                ),
            });
        }
        let mut position = [0u8; POSITION_LEN];
        position.copy_from_slice(&value[..POSITION_LEN]);
        Ok(Some(Checkpoint {
            position: u64::from_be_bytes(position),
            snapshot: value.slice(POSITION_LEN..),
        }))
    }

    async fn save(&self, name: &str, checkpoint: &Checkpoint) -> Result<(), EventLogError> {
        self.key(name)?;
        let size = POSITION_LEN + checkpoint.snapshot.len();
        let limit = self.client.max_payload().min(MAX_CHECKPOINT_VALUE_SIZE);
        // The KV put carries no headers, but leave room for the protocol's own.
        if size + 512 > limit {
            return Err(EventLogError::InvalidEvent {
                reason: format!(
                    "checkpoint {name} is {size} bytes, more than fits one message ({limit} \
                     bytes: the server's max_payload, capped at {MAX_CHECKPOINT_VALUE_SIZE}); \
                     raise max_payload in the nats-server configuration or keep a smaller \
                     snapshot. The previous checkpoint is kept."
                ),
            });
        }
        let mut value = BytesMut::with_capacity(size);
        value.put_u64(checkpoint.position);
        value.put_slice(&checkpoint.snapshot);
        let value: Bytes = value.freeze();
        self.store.put(name, value).await.map_err(|err| {
            EventLogError::unavailable(format!(
                "cannot save checkpoint {name} to bucket {}: {err}",
                self.bucket
            ))
        })?;
        Ok(())
    }
}
