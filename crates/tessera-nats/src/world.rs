//! World state on JetStream KV.

use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::kv::{self, Operation};
use async_trait::async_trait;
use bytes::Bytes;
use tessera_core::name::check_ident;
use tessera_ports::world::{MAX_VALUE_BYTES, check_world_key};
use tessera_ports::{Entry, ResultEntry, WorldError, WorldState};

use crate::{Nats, NatsError, kv_bucket};

/// World state on JetStream KV: globals in `tessera_world`, results in `tessera_results`.
pub struct NatsWorld {
    globals: kv::Store,
    results: kv::Store,
}

fn backend(e: impl std::fmt::Display) -> WorldError {
    WorldError::Backend(e.to_string())
}

fn check_value(v: &Bytes) -> Result<(), WorldError> {
    if v.len() > MAX_VALUE_BYTES {
        return Err(WorldError::TooLarge { size: v.len(), limit: MAX_VALUE_BYTES });
    }
    Ok(())
}

/// A key unique to this process and moment, for one added result.
fn unique() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let seed = format!("{t}-{}-{n}", std::process::id());
    tessera_core::Digest::of(seed.as_bytes()).hex()[..20].to_owned()
}

impl NatsWorld {
    /// Opens (creating if needed) the buckets.
    pub async fn open(nats: &Nats) -> Result<Self, NatsError> {
        Ok(NatsWorld {
            globals: kv_bucket(nats, "tessera_world", None).await?,
            results: kv_bucket(nats, "tessera_results", None).await?,
        })
    }

    async fn live(&self, key: &str) -> Result<Option<Entry>, WorldError> {
        match self.globals.entry(key).await.map_err(backend)? {
            Some(e) if e.operation == Operation::Put => Ok(Some(Entry { value: e.value, revision: e.revision })),
            _ => Ok(None),
        }
    }
}

#[async_trait]
impl WorldState for NatsWorld {
    async fn get(&self, key: &str) -> Result<Option<Entry>, WorldError> {
        check_world_key(key)?;
        self.live(key).await
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<u64, WorldError> {
        check_world_key(key)?;
        check_value(&value)?;
        self.globals.put(key, value).await.map_err(backend)
    }

    async fn compare_and_set(&self, key: &str, value: Bytes, expected: Option<u64>) -> Result<u64, WorldError> {
        check_world_key(key)?;
        check_value(&value)?;
        let result = match expected {
            None => self.globals.create(key, value).await.map_err(|e| e.to_string()),
            Some(rev) => self.globals.update(key, value, rev).await.map_err(|e| e.to_string()),
        };
        match result {
            Ok(rev) => Ok(rev),
            Err(why) => {
                let found = self.live(key).await?.map(|e| e.revision);
                if found != expected {
                    Err(WorldError::Conflict { key: key.to_owned(), expected, found })
                } else {
                    Err(WorldError::Backend(why))
                }
            }
        }
    }

    async fn delete(&self, key: &str) -> Result<(), WorldError> {
        check_world_key(key)?;
        if self.live(key).await?.is_some() {
            self.globals.delete(key).await.map_err(backend)?;
        }
        Ok(())
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>, WorldError> {
        Ok(crate::list_entries(&self.globals, prefix).await?.into_iter().map(|e| e.key).collect())
    }

    async fn add_result(&self, key: &str, node: &str, value: Bytes) -> Result<(), WorldError> {
        check_world_key(key)?;
        check_ident("node id", node).map_err(|e| WorldError::Key(e.to_string()))?;
        check_value(&value)?;
        self.results.put(format!("{key}/{node}/{}", unique()), value).await.map_err(backend)?;
        Ok(())
    }

    async fn select_results(&self, key: &str, node: Option<&str>) -> Result<Vec<ResultEntry>, WorldError> {
        check_world_key(key)?;
        let prefix = format!("{key}/");
        let mut out = Vec::new();
        for e in crate::list_entries(&self.results, &prefix).await? {
            // `<key>/<node>/<unique>`: exactly two segments after the key.
            let mut rest = e.key[prefix.len()..].split('/');
            let (Some(from), Some(_), None) = (rest.next(), rest.next(), rest.next()) else { continue };
            if node.is_some_and(|n| n != from) {
                continue;
            }
            out.push(ResultEntry { node: from.to_owned(), value: e.value, sequence: e.revision });
        }
        out.sort_by_key(|r| r.sequence);
        Ok(out)
    }

    async fn clear_results(&self, prefix: &str) -> Result<usize, WorldError> {
        let mut n = 0;
        for e in crate::list_entries(&self.results, prefix).await? {
            // Purged, not only deleted: nothing of it stays in the stream.
            self.results.purge(e.key.as_str()).await.map_err(backend)?;
            n += 1;
        }
        Ok(n)
    }
}
