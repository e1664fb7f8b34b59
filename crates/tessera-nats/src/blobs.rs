//! Blobs in a JetStream Object Store.

use async_nats::jetstream::object_store::{self, ObjectStore};
use async_nats::jetstream::stream::StorageType;
use async_trait::async_trait;
use bytes::Bytes;
use tessera_core::Digest;
use tessera_ports::{BlobError, BlobStore};
use tokio::io::AsyncReadExt;

use crate::{Nats, NatsError};

const BUCKET: &str = "tessera_blobs";

/// Blobs named by their digest's hex in the Object Store `tessera_blobs`, verified on read.
pub struct NatsBlobs {
    store: ObjectStore,
}

fn backend(e: impl std::fmt::Display) -> BlobError {
    BlobError::Backend(e.to_string())
}

impl NatsBlobs {
    /// Opens (creating if needed) the object store.
    pub async fn open(nats: &Nats) -> Result<Self, NatsError> {
        let store = match nats.js.get_object_store(BUCKET).await {
            Ok(s) => s,
            Err(_) => nats
                .js
                .create_object_store(object_store::Config {
                    bucket: BUCKET.into(),
                    storage: StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| NatsError::Setup { what: format!("object store {BUCKET}"), message: e.to_string() })?,
        };
        Ok(NatsBlobs { store })
    }
}

#[async_trait]
impl BlobStore for NatsBlobs {
    async fn put(&self, bytes: Bytes) -> Result<Digest, BlobError> {
        let digest = Digest::of(&bytes);
        if self.contains(&digest).await? {
            return Ok(digest);
        }
        let mut reader = &bytes[..];
        self.store.put(digest.hex().as_str(), &mut reader).await.map_err(backend)?;
        Ok(digest)
    }

    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, BlobError> {
        let mut object = match self.store.get(digest.hex()).await {
            Ok(o) => o,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(backend(e)),
        };
        let mut buf = Vec::new();
        object.read_to_end(&mut buf).await.map_err(backend)?;
        if &Digest::of(&buf) != digest {
            return Err(BlobError::Corrupt(*digest));
        }
        Ok(Some(Bytes::from(buf)))
    }

    async fn contains(&self, digest: &Digest) -> Result<bool, BlobError> {
        match self.store.info(digest.hex()).await {
            Ok(info) => Ok(!info.deleted),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(false),
            Err(e) => Err(backend(e)),
        }
    }

    async fn delete(&self, digest: &Digest) -> Result<bool, BlobError> {
        if !self.contains(digest).await? {
            return Ok(false);
        }
        self.store.delete(digest.hex()).await.map_err(backend)?;
        Ok(true)
    }
}
