//! Who is there: members (nodes) announce themselves and refresh the announcement; one not
//! refreshed within the time-to-live disappears.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tessera_core::name::check_ident;
use tokio::time::Instant;

use crate::WorldError;

/// Members with a time-to-live.
#[async_trait]
pub trait Membership: Send + Sync + 'static {
    /// Announces or refreshes member `id` with its record.
    async fn announce(&self, id: &str, record: Bytes) -> Result<(), WorldError>;
    /// Withdraws member `id` (absent is fine).
    async fn withdraw(&self, id: &str) -> Result<(), WorldError>;
    /// The members announced within the time-to-live, by id.
    async fn members(&self) -> Result<Vec<(String, Bytes)>, WorldError>;
    /// How long an announcement lasts.
    fn ttl(&self) -> Duration;
}

fn check_member(id: &str) -> Result<(), WorldError> {
    check_ident("member id", id).map_err(|e| WorldError::Key(e.to_string()))
}

/// Members in memory (the embedded default).
pub struct MemoryMembership {
    ttl: Duration,
    members: Mutex<BTreeMap<String, (Bytes, Instant)>>,
}

impl MemoryMembership {
    /// Members that last `ttl` unless refreshed.
    pub fn new(ttl: Duration) -> Self {
        MemoryMembership { ttl, members: Mutex::new(BTreeMap::new()) }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Bytes, Instant)>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Membership for MemoryMembership {
    async fn announce(&self, id: &str, record: Bytes) -> Result<(), WorldError> {
        check_member(id)?;
        self.lock().insert(id.to_owned(), (record, Instant::now()));
        Ok(())
    }
    async fn withdraw(&self, id: &str) -> Result<(), WorldError> {
        check_member(id)?;
        self.lock().remove(id);
        Ok(())
    }
    async fn members(&self) -> Result<Vec<(String, Bytes)>, WorldError> {
        let now = Instant::now();
        let mut g = self.lock();
        g.retain(|_, (_, at)| now.duration_since(*at) < self.ttl);
        Ok(g.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect())
    }
    fn ttl(&self) -> Duration {
        self.ttl
    }
}
