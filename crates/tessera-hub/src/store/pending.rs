//! Blobs put in the shared store ahead of the write that names them
//! ([`HubStore::write_with_blob`], outside the write lock): each such put is noted in
//! `pending_blobs` first and the note removed once the write committed (or its refusal
//! took the blob away). A process that dies between the two leaves the note; the sweep
//! collects the blob of a note older than [`PENDING_GRACE_SECS`] unless something uses it.
//! A write that finds its blob gone under its lock (another process collected it: a write
//! still running past the grace, say) is refused and put again, noted, outside the lock (see
//! [`HubStore::adopt`]). A restore notes every blob of its dump before it puts them (see
//! `dump.rs`).

use tessera_core::Digest;

use super::db::params;
use super::{HubError, HubStore};

/// Seconds a note is left to its writer before the sweep collects its blob.
pub(crate) const PENDING_GRACE_SECS: u64 = 3600;

/// Most notes one sweep takes (each collection holds the write lock a moment).
const SWEEP_LIMIT: i64 = 64;

fn now_secs() -> i64 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    i64::try_from(secs).unwrap_or(i64::MAX)
}

impl HubStore {
    /// Notes that blob `digest` is about to be put in the shared store ahead of its write;
    /// gives the note's token for [`HubStore::forget_pending`].
    pub(crate) fn note_pending(&self, digest: &Digest) -> Result<String, HubError> {
        let mut random = [0u8; 16];
        getrandom::fill(&mut random).map_err(|e| HubError::Storage(format!("random source: {e}")))?;
        let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let tx = self.write_tx()?;
        tx.execute(
            "INSERT INTO pending_blobs (token, digest, since) VALUES (?1, ?2, ?3)",
            params![token, digest.to_string(), now_secs()],
        )?;
        tx.commit()?;
        Ok(token)
    }

    /// Removes a note: its write is over (committed, or refused and its blob collected).
    pub(crate) fn forget_pending(&self, token: &str) {
        let removed = self.write_tx().and_then(|tx| {
            tx.execute("DELETE FROM pending_blobs WHERE token = ?1", params![token])?;
            Ok(tx.commit()?)
        });
        if let Err(e) = removed {
            tracing::warn!(%token, error = %e, "a pending blob's note stays; the sweep removes it");
        }
    }

    /// Collects the blobs of notes older than `grace_secs` that nothing uses, and removes
    /// those notes (at most [`SWEEP_LIMIT`] a call); gives how many notes it removed. A
    /// blob that cannot be collected keeps its note for the next call.
    ///
    /// # Errors
    /// The database's, in reading the notes.
    pub fn collect_pending(&self, grace_secs: u64) -> Result<usize, HubError> {
        let cutoff = now_secs().saturating_sub(i64::try_from(grace_secs).unwrap_or(i64::MAX));
        let stale: Vec<(String, String)> = self
            .db()
            .prepare("SELECT token, digest FROM pending_blobs WHERE since <= ?1 ORDER BY since LIMIT ?2")?
            .query_map(params![cutoff, SWEEP_LIMIT], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut removed = 0;
        for (token, digest) in &stale {
            match super::parse_digest(digest) {
                Ok(d) => match self.collect_blob(&d) {
                    Ok(()) => {
                        tracing::info!(blob = %d, "a blob left by an unfinished write was collected unless in use")
                    }
                    Err(e) => {
                        tracing::warn!(blob = %d, error = %e, "a blob left by an unfinished write stays for now");
                        continue;
                    }
                },
                Err(_) => tracing::warn!(%digest, "a pending note names no digest; removed"),
            }
            self.forget_pending(token);
            removed += 1;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use tessera_ports::{BlobStore, MemoryBlobStore};

    use super::*;

    /// A hub in `dir` whose blobs are shared through `blobs`.
    fn shared_hub(dir: &std::path::Path, blobs: Arc<dyn BlobStore>) -> HubStore {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        HubStore::open(dir.join("hub")).unwrap().with_shared_blobs(blobs, rt).unwrap()
    }

    fn notes(store: &HubStore) -> i64 {
        store.db().query_row("SELECT COUNT(*) FROM pending_blobs", params![], |r| r.get(0)).unwrap()
    }

    /// A package of `test.echo@0.1.0`; `notes` makes other bytes of the same version.
    fn package(dir: &std::path::Path, notes: &str) -> Vec<u8> {
        let m = dir.join("pkg");
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(
            m.join("module.yaml"),
            "name: test.echo\nversion: 0.1.0\nkind: task\nruntime: builtin\nentry: echo\n",
        )
        .unwrap();
        std::fs::write(m.join("notes.txt"), notes).unwrap();
        tessera_package::pack_dir(&m, &tessera_package::Limits::default()).unwrap().bytes
    }

    /// A shared store whose file puts fail (a NATS server gone mid-upload).
    struct FailingPuts(MemoryBlobStore);

    #[async_trait::async_trait]
    impl BlobStore for FailingPuts {
        async fn put(&self, bytes: Bytes) -> Result<Digest, tessera_ports::BlobError> {
            self.0.put(bytes).await
        }
        async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, tessera_ports::BlobError> {
            self.0.get(digest).await
        }
        async fn contains(&self, digest: &Digest) -> Result<bool, tessera_ports::BlobError> {
            self.0.contains(digest).await
        }
        async fn delete(&self, digest: &Digest) -> Result<bool, tessera_ports::BlobError> {
            self.0.delete(digest).await
        }
        async fn stored_bytes(&self) -> Result<u64, tessera_ports::BlobError> {
            self.0.stored_bytes().await
        }
        async fn put_file(&self, _: &std::path::Path, _: &Digest) -> Result<(), tessera_ports::BlobError> {
            Err(tessera_ports::BlobError::Backend("the server went away".into()))
        }
    }

    /// A shared store that loses a blob once, right after it was first put: another hub
    /// process collected it between the put and the write's turn.
    struct CollectedOnce {
        inner: MemoryBlobStore,
        puts: std::sync::atomic::AtomicUsize,
        collected: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl BlobStore for CollectedOnce {
        async fn put(&self, bytes: Bytes) -> Result<Digest, tessera_ports::BlobError> {
            self.inner.put(bytes).await
        }
        async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, tessera_ports::BlobError> {
            self.inner.get(digest).await
        }
        async fn contains(&self, digest: &Digest) -> Result<bool, tessera_ports::BlobError> {
            use std::sync::atomic::Ordering::SeqCst;
            if self.puts.load(SeqCst) == 1 && !self.collected.swap(true, SeqCst) {
                self.inner.delete(digest).await?;
            }
            self.inner.contains(digest).await
        }
        async fn delete(&self, digest: &Digest) -> Result<bool, tessera_ports::BlobError> {
            self.inner.delete(digest).await
        }
        async fn stored_bytes(&self) -> Result<u64, tessera_ports::BlobError> {
            self.inner.stored_bytes().await
        }
        async fn put_file(&self, path: &std::path::Path, digest: &Digest) -> Result<(), tessera_ports::BlobError> {
            self.puts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.put_file(path, digest).await
        }
    }

    /// A write whose blob left the shared store before its turn puts it again, noted, and
    /// succeeds: the record names a blob the shared store holds, and no note is left.
    #[test]
    fn a_blob_collected_before_its_write_is_put_again() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(CollectedOnce {
            inner: MemoryBlobStore::new(),
            puts: Default::default(),
            collected: Default::default(),
        });
        let store = shared_hub(dir.path(), shared.clone());
        let pkg = package(dir.path(), "first");
        let published = store.publish(&pkg, None, None).unwrap().record;
        assert_eq!(shared.puts.load(std::sync::atomic::Ordering::SeqCst), 2, "put, lost, put again");
        let local = tokio::runtime::Runtime::new().unwrap();
        assert!(local.block_on(shared.inner.contains(&published.digest)).unwrap());
        assert_eq!(store.blob_bytes(&published.digest).unwrap(), pkg);
        assert_eq!(notes(&store), 0);
    }

    /// A refused write takes its blob away and leaves no note; a put that failed half-way
    /// leaves its note for the sweep.
    #[test]
    fn refused_writes_leave_nothing_and_failed_puts_leave_their_note() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(MemoryBlobStore::new());
        let store = shared_hub(dir.path(), shared.clone());
        let local = tokio::runtime::Runtime::new().unwrap();
        store.publish(&package(dir.path(), "first"), None, None).unwrap();
        // The same version with other bytes: refused after its blob went to the shared store.
        let other = package(dir.path(), "second");
        assert!(store.publish(&other, None, None).is_err());
        assert!(!local.block_on(shared.contains(&Digest::of(&other))).unwrap(), "the refused write's blob is gone");
        assert_eq!(notes(&store), 0);

        let dir = tempfile::tempdir().unwrap();
        let store = shared_hub(dir.path(), Arc::new(FailingPuts(MemoryBlobStore::new())));
        let e = store.publish(&package(dir.path(), "first"), None, None).unwrap_err();
        assert!(e.to_string().contains("went away"), "{e}");
        assert_eq!(notes(&store), 1, "the failed put's note stays for the sweep");
        assert_eq!(store.collect_pending(0).unwrap(), 1);
        assert_eq!(notes(&store), 0);
    }

    /// A process that put a blob in the shared store and died before its write leaves a
    /// note; past the grace, the sweep takes the blob away, and never one a record uses.
    #[test]
    fn a_blob_put_ahead_of_a_write_that_never_came_is_collected() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(MemoryBlobStore::new());
        let store = shared_hub(dir.path(), shared.clone());
        let local = tokio::runtime::Runtime::new().unwrap();

        // A publish through the shared store leaves no note behind.
        let pkg = package(dir.path(), "first");
        let published = store.publish(&pkg, None, None).unwrap().record;
        assert_eq!(notes(&store), 0);

        // The dead writer's blob, and a note for the published package's (a writer that
        // died after another process published the same bytes).
        let orphan = Bytes::from_static(b"bytes no record names");
        let d = Digest::of(&orphan);
        store.note_pending(&d).unwrap();
        local.block_on(shared.put(orphan)).unwrap();
        store.note_pending(&published.digest).unwrap();

        // Within the grace: the writer may still be at it.
        assert_eq!(store.collect_pending(PENDING_GRACE_SECS).unwrap(), 0);
        assert!(local.block_on(shared.contains(&d)).unwrap());
        // Past it: collected unless used, and the notes go.
        assert_eq!(store.collect_pending(0).unwrap(), 2);
        assert!(!local.block_on(shared.contains(&d)).unwrap(), "the orphan is gone");
        assert!(local.block_on(shared.contains(&published.digest)).unwrap(), "a used blob stays");
        assert_eq!(store.blob_bytes(&published.digest).unwrap(), pkg);
        assert_eq!(notes(&store), 0);
        assert_eq!(store.collect_pending(0).unwrap(), 0);
    }
}
