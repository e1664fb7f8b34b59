//! Node membership on a JetStream KV bucket whose entries expire.

use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use async_trait::async_trait;
use bytes::Bytes;
use tessera_core::name::check_ident;
use tessera_ports::{Membership, WorldError};

use crate::{Nats, NatsError, kv_bucket};

/// Members in the KV bucket `tessera_members`, expiring after the time-to-live. The bucket
/// keeps the time-to-live it was created with: every process on one NATS must use the same.
pub struct NatsMembership {
    kv: kv::Store,
    ttl: Duration,
}

fn backend(e: impl std::fmt::Display) -> WorldError {
    WorldError::Backend(e.to_string())
}

impl NatsMembership {
    /// Opens (creating if needed) the bucket.
    pub async fn open(nats: &Nats, ttl: Duration) -> Result<Self, NatsError> {
        let bucket = format!("tessera_members_{}", ttl.as_millis());
        Ok(NatsMembership { kv: kv_bucket(nats, &bucket, Some(ttl)).await?, ttl })
    }
}

fn check_member(id: &str) -> Result<(), WorldError> {
    check_ident("member id", id).map_err(|e| WorldError::Key(e.to_string()))
}

#[async_trait]
impl Membership for NatsMembership {
    async fn announce(&self, id: &str, record: Bytes) -> Result<(), WorldError> {
        check_member(id)?;
        self.kv.put(id, record).await.map_err(backend)?;
        Ok(())
    }

    async fn withdraw(&self, id: &str) -> Result<(), WorldError> {
        check_member(id)?;
        if self.kv.entry(id).await.map_err(backend)?.is_some_and(|e| e.operation == Operation::Put) {
            self.kv.delete(id).await.map_err(backend)?;
        }
        Ok(())
    }

    async fn members(&self) -> Result<Vec<(String, Bytes)>, WorldError> {
        Ok(crate::list_entries(&self.kv, "").await?.into_iter().map(|e| (e.key, e.value)).collect())
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }
}
