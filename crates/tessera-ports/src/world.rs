//! World state: what a run shares across nodes.
//!
//! Globals are key-value entries with revisions: every write gets a new, higher revision,
//! and [`WorldState::compare_and_set`] writes only when the entry is still at the revision
//! the caller saw. Results are appended per key by nodes and selected per key (optionally
//! per node).

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use tessera_core::name::{check_ident, check_key};

/// Why a world-state operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorldError {
    /// The key is not valid.
    #[error("invalid key: {0}")]
    Key(String),
    /// Compare-and-set lost: the entry is at another revision.
    #[error("{key} changed: expected revision {expected:?}, found {found:?}")]
    Conflict {
        /// The key.
        key: String,
        /// The revision the caller expected (`None`: absent).
        expected: Option<u64>,
        /// The revision found (`None`: absent).
        found: Option<u64>,
    },
    /// The value is over the size limit.
    #[error("value of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The backend failed.
    #[error("world-state backend: {0}")]
    Backend(String),
}

/// A global's value and revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Bytes,
    /// Its revision.
    pub revision: u64,
}

/// One result a node added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultEntry {
    /// The node that added it.
    pub node: String,
    /// The value.
    pub value: Bytes,
    /// Order of arrival across the store.
    pub sequence: u64,
}

/// Largest value stored in world state (bigger things go to the blob store).
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// A run's shared state.
#[async_trait]
pub trait WorldState: Send + Sync + 'static {
    /// Reads a global.
    async fn get(&self, key: &str) -> Result<Option<Entry>, WorldError>;
    /// Writes a global unconditionally; returns its new revision.
    async fn put(&self, key: &str, value: Bytes) -> Result<u64, WorldError>;
    /// Writes a global only if its revision is `expected` (`None`: only if absent).
    async fn compare_and_set(&self, key: &str, value: Bytes, expected: Option<u64>) -> Result<u64, WorldError>;
    /// Deletes a global (absent is fine).
    async fn delete(&self, key: &str) -> Result<(), WorldError>;
    /// Keys of globals starting with `prefix`, sorted.
    async fn keys(&self, prefix: &str) -> Result<Vec<String>, WorldError>;
    /// Appends a result under `key` from `node`.
    async fn add_result(&self, key: &str, node: &str, value: Bytes) -> Result<(), WorldError>;
    /// Results under `key` in arrival order, from every node or only `node`.
    async fn select_results(&self, key: &str, node: Option<&str>) -> Result<Vec<ResultEntry>, WorldError>;
    /// Deletes every result whose key starts with `prefix` (what a finished iteration
    /// left); returns how many there were.
    async fn clear_results(&self, prefix: &str) -> Result<usize, WorldError>;
}

/// Checks a world key.
pub fn check_world_key(key: &str) -> Result<(), WorldError> {
    check_key("world key", key).map_err(|e| WorldError::Key(e.to_string()))
}

fn check_value(v: &Bytes) -> Result<(), WorldError> {
    if v.len() > MAX_VALUE_BYTES {
        return Err(WorldError::TooLarge { size: v.len(), limit: MAX_VALUE_BYTES });
    }
    Ok(())
}

#[derive(Default)]
struct Inner {
    globals: BTreeMap<String, Entry>,
    results: BTreeMap<String, Vec<ResultEntry>>,
    revision: u64,
}

/// The in-process world state (the embedded default).
#[derive(Default)]
pub struct MemoryWorld {
    inner: Mutex<Inner>,
}

impl MemoryWorld {
    /// An empty world.
    pub fn new() -> Self {
        Self::default()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl WorldState for MemoryWorld {
    async fn get(&self, key: &str) -> Result<Option<Entry>, WorldError> {
        check_world_key(key)?;
        Ok(self.lock().globals.get(key).cloned())
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<u64, WorldError> {
        check_world_key(key)?;
        check_value(&value)?;
        let mut g = self.lock();
        g.revision += 1;
        let revision = g.revision;
        g.globals.insert(key.to_owned(), Entry { value, revision });
        Ok(revision)
    }

    async fn compare_and_set(&self, key: &str, value: Bytes, expected: Option<u64>) -> Result<u64, WorldError> {
        check_world_key(key)?;
        check_value(&value)?;
        let mut g = self.lock();
        let found = g.globals.get(key).map(|e| e.revision);
        if found != expected {
            return Err(WorldError::Conflict { key: key.to_owned(), expected, found });
        }
        g.revision += 1;
        let revision = g.revision;
        g.globals.insert(key.to_owned(), Entry { value, revision });
        Ok(revision)
    }

    async fn delete(&self, key: &str) -> Result<(), WorldError> {
        check_world_key(key)?;
        self.lock().globals.remove(key);
        Ok(())
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>, WorldError> {
        Ok(self
            .lock()
            .globals
            .range(prefix.to_owned()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }

    async fn add_result(&self, key: &str, node: &str, value: Bytes) -> Result<(), WorldError> {
        check_world_key(key)?;
        check_ident("node id", node).map_err(|e| WorldError::Key(e.to_string()))?;
        check_value(&value)?;
        let mut g = self.lock();
        g.revision += 1;
        let sequence = g.revision;
        g.results.entry(key.to_owned()).or_default().push(ResultEntry { node: node.to_owned(), value, sequence });
        Ok(())
    }

    async fn select_results(&self, key: &str, node: Option<&str>) -> Result<Vec<ResultEntry>, WorldError> {
        check_world_key(key)?;
        let g = self.lock();
        Ok(g.results
            .get(key)
            .map(|v| v.iter().filter(|r| node.is_none_or(|n| r.node == n)).cloned().collect())
            .unwrap_or_default())
    }

    async fn clear_results(&self, prefix: &str) -> Result<usize, WorldError> {
        let mut g = self.lock();
        let doomed: Vec<String> = g.results.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
        let mut n = 0;
        for k in doomed {
            n += g.results.remove(&k).map_or(0, |v| v.len());
        }
        Ok(n)
    }
}
