//! A hub process's blob directory as a bounded cache of the shared blob store.
//!
//! With a shared store (`--blobs`), every blob is there and the data directory only holds
//! the ones this process has received or served. Without a bound that directory would grow
//! to the whole store on every process. Here it is kept under [`CacheLimit::max_bytes`]:
//! least recently used blobs go first (a blob's modification time is set each time it is
//! handed out, like a web cache's access time), a blob used within [`CacheLimit::recent`]
//! stays (the file just handed out is being read), and a blob the shared store does not
//! hold is removed only when no record uses it and it was last used more than
//! [`PENDING_GRACE_SECS`](super::pending::PENDING_GRACE_SECS) ago (a restore or an upload
//! not yet put there is younger; an older one is a copy of a blob deleted meanwhile).
//! Without a shared store the directory is the store itself: nothing is evicted.
//!
//! A streamed download copies the blob into the directory as it serves it, one copy of a
//! blob at a time ([`CacheLimit::filling`]; the other downloads of it meanwhile are served
//! without one). The copy goes at its client's pace: a client that reads slowly keeps the
//! others from copying the blob until it is done.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tessera_core::Digest;
use tessera_ports::BlobReader;
use tessera_ports::sink::FileSink;
use tokio::sync::mpsc::Sender;

use super::{HubError, HubStore, remove_leftover};

/// The default bound of a process's blob directory with a shared store: 10 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 10 << 30;

/// How long a blob handed out stays whatever the bound: 5 minutes.
pub const RECENT: Duration = Duration::from_secs(300);

/// The bound of a blob directory that caches a shared store.
pub(crate) struct CacheLimit {
    /// Bytes the directory's blobs may take before the least recently used go.
    pub max_bytes: u64,
    /// A blob used this recently stays.
    pub recent: Duration,
    /// Held while a blob is marked used and while one is removed, so that no blob is
    /// removed between being marked and being opened (in this process: processes that share
    /// one data directory can remove a blob another has just handed out, which then fails
    /// that one download).
    pub lock: Mutex<()>,
    /// Held by the one eviction at a time (another finds it taken and leaves the work to it).
    pub evicting: Mutex<()>,
    /// Blobs being copied into the directory by a streamed download: one copy of a blob at
    /// a time (the other downloads of it are served without one).
    pub filling: Mutex<std::collections::HashSet<Digest>>,
}

impl Default for CacheLimit {
    fn default() -> Self {
        CacheLimit {
            max_bytes: DEFAULT_CACHE_BYTES,
            recent: RECENT,
            lock: Mutex::new(()),
            evicting: Mutex::new(()),
            filling: Mutex::new(std::collections::HashSet::new()),
        }
    }
}

/// The one copy of a blob being written by a streamed download ([`CacheLimit::filling`]),
/// given up when dropped.
struct Filling<'a> {
    digest: Digest,
    cache: &'a CacheLimit,
}

impl<'a> Filling<'a> {
    /// The claim on copying `digest`, unless another download is copying it.
    fn claim(cache: &'a CacheLimit, digest: Digest) -> Option<Self> {
        let mut filling = cache.filling.lock().unwrap_or_else(|p| p.into_inner());
        // Made only when claimed: a `Filling` dropped here would give up another's claim.
        filling.insert(digest).then(|| Filling { digest, cache })
    }
}

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        self.cache.filling.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.digest);
    }
}

/// A cached blob file: its digest, size and last use.
struct Entry {
    digest: Digest,
    path: PathBuf,
    len: u64,
    used: SystemTime,
}

/// Marks `path` used now; false when it is not there.
fn mark_used(path: &Path) -> bool {
    match std::fs::File::open(path) {
        Ok(f) => {
            if let Err(e) = f.set_modified(SystemTime::now()) {
                tracing::warn!(path = %path.display(), error = %e, "a cached blob's use was not recorded");
            }
            true
        }
        Err(_) => false,
    }
}

/// What a download of a blob serves.
pub enum Download {
    /// A file of this process's directory.
    File(PathBuf),
    /// A blob this process has not cached, served from the shared store as it arrives.
    Shared(SharedDownload),
}

impl Download {
    /// The blob's length in bytes.
    ///
    /// # Errors
    /// I/O errors reading the file's metadata.
    pub fn size(&self) -> Result<u64, HubError> {
        match self {
            Download::File(path) => Ok(std::fs::metadata(path)?.len()),
            Download::Shared(s) => Ok(s.len),
        }
    }
}

/// A download of a blob from the shared store: its length is known before a byte is read
/// (a `HEAD` or an unsatisfiable range needs nothing more), and [`SharedDownload::stream`]
/// reads it.
pub struct SharedDownload {
    store: Arc<HubStore>,
    digest: Digest,
    len: u64,
}

/// Chunks of a streamed download held between the shared store and the client.
const STREAMED_AHEAD: usize = 4;

impl SharedDownload {
    /// The blob's length in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.len
    }

    /// Reads the blob from the shared store, front to back, and hands the bytes of `part`
    /// (first and last byte offsets, inclusive; the whole blob when `None`) to the returned
    /// channel as they arrive, while the whole blob is copied into this process's directory
    /// (unless another download of it is copying it).
    /// The last chunk given is held back until the whole blob has been read and verified,
    /// so a part ends no sooner than the blob's read does; an item is an error when the
    /// bytes turn out not to be the blob's (the client's body is then cut short).
    /// Synchronous: call it off the server's runtime.
    ///
    /// # Errors
    /// [`HubError::Storage`] when the shared store no longer holds the blob or cannot be
    /// read; [`HubError::BadRequest`] when `part` does not lie within the blob.
    pub fn stream(
        self,
        part: Option<(u64, u64)>,
    ) -> Result<tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>, HubError> {
        if let Some((first, last)) = part
            && (first > last || last >= self.len)
        {
            return Err(HubError::BadRequest(format!(
                "bytes {first}-{last} do not lie within a blob of {} bytes",
                self.len
            )));
        }
        let Some(shared) = self.store.shared.as_ref() else {
            return Err(HubError::Storage("a shared download without a shared store".into()));
        };
        let reader = shared.run(shared.blobs.reader(&self.digest))?.ok_or_else(|| {
            HubError::Storage(format!("blob {} is recorded but the shared store does not hold it", self.digest))
        })?;
        let (tx, body) = tokio::sync::mpsc::channel(STREAMED_AHEAD);
        let (store, digest) = (Arc::clone(&self.store), self.digest);
        let part = part.unwrap_or((0, u64::MAX));
        shared.spawn(async move { store.tee(digest, reader, part, tx).await });
        Ok(body)
    }
}

impl HubStore {
    /// What serves a download of blob `digest`, which a record must use: this process's
    /// file; or, for a blob this process has not cached, the shared store's bytes as they
    /// arrive ([`SharedDownload::stream`]: serving and fetching at once rather than one
    /// after the other). A shared store that cannot tell a blob's size has it fetched into
    /// the directory first.
    ///
    /// # Errors
    /// [`HubError::NotFound`] when no record uses the blob; the shared store's.
    pub fn blob_download(self: &Arc<Self>, digest: &Digest) -> Result<Download, HubError> {
        let Some(shared) = self.shared.as_ref() else {
            return Ok(Download::File(self.blob_path(digest)?));
        };
        if !Self::blob_in_use(&self.db(), digest)? {
            return Err(HubError::NotFound(digest.to_string()));
        }
        if let Some(path) = self.cached_copy(shared, digest) {
            return Ok(Download::File(path));
        }
        match shared.run(shared.blobs.size(digest))? {
            Some(len) => Ok(Download::Shared(SharedDownload { store: Arc::clone(self), digest: *digest, len })),
            None => Ok(Download::File(self.blob_path(digest)?)),
        }
    }

    /// The length of blob `digest` and its first bytes, at most `max` of them, read without
    /// fetching the blob into this process's directory: from its file when there is one,
    /// from the front of the shared store's object otherwise. The bytes of a blob read from
    /// the shared store are not checked against its digest (that takes all of them):
    /// what they describe is served as the store holds it, while every download of the
    /// blob is checked.
    ///
    /// # Errors
    /// [`HubError::NotFound`] when no record uses the blob; I/O and the shared store's.
    pub fn blob_prefix(&self, digest: &Digest, max: u64) -> Result<(u64, Vec<u8>), HubError> {
        use std::io::Read;
        let local = |path: &Path| -> Result<(u64, Vec<u8>), HubError> {
            let f = std::fs::File::open(path)?;
            let len = f.metadata()?.len();
            let mut head = Vec::with_capacity(usize::try_from(max.min(len)).unwrap_or(0));
            f.take(max).read_to_end(&mut head)?;
            Ok((len, head))
        };
        let Some(shared) = self.shared.as_ref() else { return local(&self.blob_path(digest)?) };
        if !Self::blob_in_use(&self.db(), digest)? {
            return Err(HubError::NotFound(digest.to_string()));
        }
        if let Some(path) = self.cached_copy(shared, digest) {
            return local(&path);
        }
        let read = shared.run(async {
            use tokio::io::AsyncReadExt;
            let Some(len) = shared.blobs.size(digest).await? else { return Ok(None) };
            let Some(reader) = shared.blobs.reader(digest).await? else { return Ok(None) };
            let mut head = Vec::with_capacity(usize::try_from(max.min(len)).unwrap_or(0));
            reader
                .take(max)
                .read_to_end(&mut head)
                .await
                .map_err(|e| HubError::Storage(format!("blob {digest}: {e}")))?;
            Ok::<_, HubError>(Some((len, head)))
        })?;
        match read {
            Some(found) => Ok(found),
            // A store that cannot tell the size: fetched first.
            None => local(&self.blob_path(digest)?),
        }
    }

    /// Hands the bytes `part.0..=part.1` of `reader` (the whole of blob `digest`) to `tx`
    /// and, unless another download is copying the blob, writes all of them into the
    /// directory as `digest`; the file takes its name once all arrived verified (`reader`
    /// checks them), and the cache is trimmed. The last chunk given is held back until the
    /// bytes are verified: a client whose bytes turn out not to be the blob's gets a body cut
    /// short (an error), never all of it. A copy that fails (a full disk) is dropped and the
    /// download goes on; a client that goes away stops both.
    async fn tee(
        self: Arc<Self>,
        digest: Digest,
        mut reader: BlobReader,
        part: (u64, u64),
        tx: Sender<std::io::Result<Bytes>>,
    ) {
        use tokio::io::AsyncReadExt;
        let tmp = self.blobs.temp_path();
        let filling = self.shared.as_ref().and_then(|s| Filling::claim(&s.cache, digest));
        let mut sink = filling.as_ref().and_then(|_| {
            std::fs::File::create(&tmp)
                .and_then(|f| FileSink::start(f, Vec::new()))
                .inspect_err(|e| tracing::warn!(blob = %digest, error = %e, "a streamed download is not kept"))
                .ok()
        });
        // No copy after all: the claim is given up, another download may make one.
        let filling = filling.filter(|_| sink.is_some());
        let (first, end) = (part.0, part.1.saturating_add(1));
        let mut held: Option<Bytes> = None;
        let streamed: std::io::Result<()> = async {
            let mut at = 0u64;
            loop {
                let mut chunk = bytes::BytesMut::with_capacity(1 << 20);
                let n = tokio::select! {
                    n = reader.read_buf(&mut chunk) => n?,
                    () = tx.closed() => return Err(std::io::Error::other("the client went away")),
                };
                if n == 0 {
                    break;
                }
                let chunk = chunk.freeze();
                if let Some(s) = sink.as_mut()
                    && let Err(e) = s.write(chunk.clone()).await
                {
                    tracing::warn!(blob = %digest, error = %e, "a streamed download is not kept");
                    sink = None;
                }
                let (lo, hi) = (first.max(at), end.min(at + n as u64));
                if lo < hi {
                    let given =
                        chunk.slice(usize::try_from(lo - at).unwrap_or(0)..usize::try_from(hi - at).unwrap_or(0));
                    if let Some(previous) = held.replace(given)
                        && tx.send(Ok(previous)).await.is_err()
                    {
                        return Err(std::io::Error::other("the client went away"));
                    }
                }
                at += n as u64;
            }
            // Verified: the last chunk goes.
            if let Some(last) = held.take() {
                let _ = tx.send(Ok(last)).await;
            }
            Ok(())
        }
        .await;
        if let Err(e) = &streamed {
            tracing::debug!(blob = %digest, error = %e, "a streamed download stopped");
            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
        drop(tx);
        let kept: std::io::Result<Option<std::fs::File>> = match (streamed, sink) {
            (Ok(()), Some(s)) => s.finish().await.map(|w| Some(w.file)),
            _ => Ok(None),
        };
        let store = Arc::clone(&self);
        let adopted = tokio::task::spawn_blocking(move || -> Result<(), HubError> {
            let file = match kept {
                Ok(Some(file)) => file,
                Ok(None) => {
                    remove_leftover(&tmp);
                    return Ok(());
                }
                Err(e) => {
                    remove_leftover(&tmp);
                    return Err(e.into());
                }
            };
            if let Err(e) = file.sync_all() {
                remove_leftover(&tmp);
                return Err(e.into());
            }
            store.adopt_cached(&tmp, &digest)?;
            store.evict_cached();
            Ok(())
        })
        .await;
        drop(filling);
        match adopted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(blob = %digest, error = %e, "a streamed download is not kept"),
            Err(e) => tracing::warn!(blob = %digest, error = %e, "a streamed download's copy failed"),
        }
    }

    /// Bounds this process's blob directory at `max_bytes` (see the module's
    /// documentation): it is a cache of the shared store given to
    /// [`HubStore::with_shared_blobs`], whose default bound is [`DEFAULT_CACHE_BYTES`].
    ///
    /// # Errors
    /// [`HubError::BadRequest`] without a shared store: the directory is then the only copy
    /// of the blobs.
    pub fn with_cache_limit(mut self, max_bytes: u64) -> Result<Self, HubError> {
        let Some(shared) = &mut self.shared else {
            return Err(HubError::BadRequest(
                "a cache limit bounds the copy of a shared blob store; without one the data directory holds the only copy"
                    .into(),
            ));
        };
        shared.cache.max_bytes = max_bytes;
        Ok(self)
    }

    /// The directory's file of `digest`, marked used: this process's copy, or the shared
    /// store's fetched into the directory (streamed, verified) when it has none; `None`
    /// when neither holds it.
    pub(crate) fn local_blob(&self, digest: &Digest) -> Result<Option<PathBuf>, HubError> {
        let Some(shared) = &self.shared else {
            let path = self.blobs.path_of(digest);
            return Ok(path.exists().then_some(path));
        };
        if let Some(path) = self.cached_copy(shared, digest) {
            return Ok(Some(path));
        }
        let tmp = self.blobs.temp_path();
        let began = std::time::Instant::now();
        match shared.run(shared.blobs.get_file(digest, &tmp)) {
            Ok(true) => {
                tracing::info!(blob = %digest, seconds = began.elapsed().as_secs_f64(), "fetched from the shared store");
                let path = self.adopt_cached(&tmp, digest)?;
                self.evict_cached();
                // Deleted while it was fetched.
                path.map(Some).ok_or_else(|| HubError::NotFound(digest.to_string()))
            }
            Ok(false) => Ok(None),
            Err(e) => {
                remove_leftover(&tmp);
                Err(e.into())
            }
        }
    }

    /// This process's copy of blob `digest`, marked used under the cache's lock (so that
    /// eviction cannot remove it between the mark and its opening); `None` when there is none.
    fn cached_copy(&self, shared: &super::Shared, digest: &Digest) -> Option<PathBuf> {
        let path = self.blobs.path_of(digest);
        let _marking = shared.cache.lock.lock().unwrap_or_else(|p| p.into_inner());
        mark_used(&path).then_some(path)
    }

    /// Names the verified copy `tmp` of blob `digest` in the directory, marked used, and
    /// gives its path; unless no record uses the blob any more (it was deleted while it was
    /// being copied), when the copy is removed and `None` is given. The records are looked
    /// at before the cache's lock is taken (the database is never waited for under it): a
    /// blob deleted between the look and the naming leaves a copy that eviction removes
    /// once it is older than the pending grace.
    ///
    /// # Errors
    /// The directory's and the database's.
    fn adopt_cached(&self, tmp: &Path, digest: &Digest) -> Result<Option<PathBuf>, HubError> {
        let Some(shared) = &self.shared else { return Ok(Some(self.blobs.adopt_file(tmp, digest)?)) };
        if !Self::blob_in_use(&self.db(), digest)? {
            remove_leftover(tmp);
            return Ok(None);
        }
        let _marking = shared.cache.lock.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.blobs.adopt_file(tmp, digest)?;
        mark_used(&path);
        Ok(Some(path))
    }

    /// Removes the least recently used blobs of the directory until it is under its bound,
    /// logging what fails (the next eviction retries); the bytes removed. Nothing without a
    /// shared store.
    pub(crate) fn evict_cached(&self) -> u64 {
        match self.evict() {
            Ok(freed) => freed,
            Err(e) => {
                tracing::warn!(error = %e, "the blob cache was not trimmed");
                0
            }
        }
    }

    fn evict(&self) -> Result<u64, HubError> {
        let Some(shared) = &self.shared else { return Ok(0) };
        let _evicting = match shared.cache.evicting.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(0),
        };
        let mut entries = self.cached_entries()?;
        let mut total: u64 = entries.iter().map(|e| e.len).sum();
        if total <= shared.cache.max_bytes {
            return Ok(0);
        }
        entries.sort_by_key(|e| e.used);
        let mut freed = 0;
        for e in entries {
            // Sorted by last use: the rest are as recent.
            if total <= shared.cache.max_bytes || e.used.elapsed().unwrap_or_default() < shared.cache.recent {
                break;
            }
            // Another process may be what holds it; it is looked up outside the lock. One the
            // shared store lacks goes only when no record uses it and it is older than a put
            // or a restore can be: a copy of a blob deleted meanwhile.
            if !shared.run(shared.blobs.contains(&e.digest))? {
                let grace = Duration::from_secs(super::pending::PENDING_GRACE_SECS);
                if e.used.elapsed().unwrap_or_default() < grace || Self::blob_in_use(&self.db(), &e.digest)? {
                    continue;
                }
            }
            let _removing = shared.cache.lock.lock().unwrap_or_else(|p| p.into_inner());
            // Looked at again under the lock: it may have been handed out since.
            let used = std::fs::metadata(&e.path).and_then(|m| m.modified());
            match used {
                Ok(t) if t.elapsed().unwrap_or_default() >= shared.cache.recent => {}
                _ => continue,
            }
            match std::fs::remove_file(&e.path) {
                Ok(()) => {
                    tracing::debug!(blob = %e.digest, bytes = e.len, "evicted from the blob cache");
                    total -= e.len;
                    freed += e.len;
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => total -= e.len,
                Err(err) => return Err(err.into()),
            }
        }
        if freed > 0 {
            tracing::info!(freed, kept = total, "blob cache trimmed");
        }
        Ok(freed)
    }

    /// Removes temporary files (`.tmp-<pid>-…`, a fetch or a copy under way) left by a
    /// process that is gone, an hour after their last write; gives how many. On systems
    /// without `/proc` the owner is not looked at and a day is waited instead.
    pub(crate) fn sweep_temporaries(&self) -> usize {
        let Ok(files) = std::fs::read_dir(self.blobs.dir()) else { return 0 };
        let proc = Path::new("/proc/self").exists();
        let mut removed = 0;
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(".tmp-").and_then(|r| r.split('-').next()) else { continue };
            let alive = proc && Path::new("/proc").join(pid).exists();
            let wait = if proc { Duration::from_secs(3600) } else { Duration::from_secs(86_400) };
            let age = f.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if !alive && age.is_some_and(|a| a >= wait) && std::fs::remove_file(f.path()).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "temporary files of processes that are gone removed");
        }
        removed
    }

    /// The blob files of the directory (`<2 hex>/<64 hex>`; temporary files are not blobs).
    fn cached_entries(&self) -> Result<Vec<Entry>, HubError> {
        let mut out = Vec::new();
        for shard in std::fs::read_dir(self.blobs.dir())?.flatten() {
            if !shard.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(files) = std::fs::read_dir(shard.path()) else { continue };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let Ok(digest) = Digest::from_hex(&name) else { continue };
                let Ok(meta) = f.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                out.push(Entry {
                    digest,
                    path: f.path(),
                    len: meta.len(),
                    used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tessera_ports::{BlobStore, MemoryBlobStore};

    use super::*;

    /// A hub in `dir` sharing `blobs`, its directory bounded at `max` bytes, nothing kept for
    /// being recent.
    fn shared_hub(dir: &Path, blobs: Arc<dyn BlobStore>, max: u64) -> HubStore {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let mut store = HubStore::open(dir.join("hub"))
            .unwrap()
            .with_shared_blobs(blobs, rt)
            .unwrap()
            .with_cache_limit(max)
            .unwrap();
        store.shared.as_mut().unwrap().cache.recent = Duration::ZERO;
        store
    }

    /// A package of `test.echo@0.1.<patch>` of about 10 KB (incompressible notes).
    fn package(dir: &Path, patch: u32) -> Vec<u8> {
        let m = dir.join(format!("pkg{patch}"));
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(
            m.join("module.yaml"),
            format!("name: test.echo\nversion: 0.1.{patch}\nkind: task\nruntime: builtin\nentry: echo\n"),
        )
        .unwrap();
        let mut x = u64::from(patch) + 1;
        let notes: Vec<u8> = (0..10_000)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        std::fs::write(m.join("notes.bin"), notes).unwrap();
        tessera_package::pack_dir(&m, &tessera_package::Limits::default()).unwrap().bytes
    }

    fn cached(store: &HubStore, d: &Digest) -> bool {
        store.blobs.path_of(d).exists()
    }

    fn cached_bytes(store: &HubStore) -> u64 {
        store.cached_entries().unwrap().iter().map(|e| e.len).sum()
    }

    /// The directory stays under its bound by removing the least recently used blobs (not
    /// the oldest written); a removed blob is fetched again when it is asked for; blobs
    /// used recently, and blobs the shared store lacks used within the pending grace, stay
    /// whatever the bound.
    #[test]
    fn the_cache_keeps_the_recently_used_under_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(MemoryBlobStore::new());
        let mut store = shared_hub(dir.path(), shared.clone(), 25_000);
        let pkgs: Vec<Vec<u8>> = (0..3).map(|i| package(dir.path(), i)).collect();
        let d: Vec<Digest> = pkgs.iter().map(|p| Digest::of(p)).collect();
        assert!(pkgs.iter().all(|p| (10_000..12_500).contains(&p.len())));
        store.publish(&pkgs[0], None, None).unwrap();
        store.publish(&pkgs[1], None, None).unwrap();
        // The first is used after the second was written: the second is the least recent.
        std::thread::sleep(Duration::from_millis(20));
        store.blob_path(&d[0]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        store.publish(&pkgs[2], None, None).unwrap();
        assert!(cached(&store, &d[0]) && !cached(&store, &d[1]) && cached(&store, &d[2]));
        assert!(cached_bytes(&store) <= 25_000);

        // Asked for again: fetched, and the least recent now (the first) goes.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(std::fs::read(store.blob_path(&d[1]).unwrap()).unwrap(), pkgs[1]);
        assert!(!cached(&store, &d[0]) && cached(&store, &d[1]) && cached(&store, &d[2]));
        assert_eq!(store.blob_bytes(&d[0]).unwrap(), pkgs[0], "served from the shared store");

        // An upload of bytes the shared store holds but this directory evicted adopts nothing.
        store.evict_cached();
        let evicted = *d.iter().find(|x| !cached(&store, x)).unwrap();
        store.adopt(&dir.path().join("no-such-upload"), &evicted).unwrap();

        // Used recently: kept over the bound.
        store.shared.as_mut().unwrap().cache.recent = Duration::from_secs(3600);
        for x in &d {
            store.blob_path(x).unwrap();
        }
        assert!(d.iter().all(|x| cached(&store, x)), "recent blobs stay");
        assert_eq!(store.evict_cached(), 0);

        // A blob only this directory holds, used within the pending grace (a restore's or
        // an upload's, not yet shared), stays whatever the bound.
        store.shared.as_mut().unwrap().cache.recent = Duration::ZERO;
        let only_here = Digest::of(b"not in the shared store");
        let path = store.blobs.path_of(&only_here);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, vec![7u8; 30_000]).unwrap();
        let ten_minutes_ago = SystemTime::now() - Duration::from_secs(600);
        std::fs::File::open(&path).unwrap().set_modified(ten_minutes_ago).unwrap();
        store.evict_cached();
        assert!(path.exists());
        assert!(d.iter().all(|x| !cached(&store, x)), "the shared ones went instead");
        let local = tokio::runtime::Runtime::new().unwrap();
        assert!(d.iter().all(|x| local.block_on(shared.contains(x)).unwrap()));
    }

    /// A temporary file of a process that is gone goes once it is an hour old; one of a
    /// live process, or a recent one, stays.
    #[test]
    fn temporaries_of_processes_that_are_gone_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = HubStore::open(dir.path().join("hub")).unwrap();
        let blobs = dir.path().join("hub/blobs");
        let old = SystemTime::now() - Duration::from_secs(7200);
        let write = |name: &str, when: SystemTime| {
            std::fs::write(blobs.join(name), b"partial").unwrap();
            std::fs::File::options().write(true).open(blobs.join(name)).unwrap().set_modified(when).unwrap();
        };
        // No process has pid 4294967 (above Linux's largest).
        write(".tmp-4294967-0-00", old);
        write(&format!(".tmp-{}-0-00", std::process::id()), old);
        write(".tmp-4294967-1-00", SystemTime::now());
        assert_eq!(store.sweep_temporaries(), 1);
        assert!(!blobs.join(".tmp-4294967-0-00").exists());
        assert!(blobs.join(format!(".tmp-{}-0-00", std::process::id())).exists());
        assert!(blobs.join(".tmp-4294967-1-00").exists());
    }

    /// Temporary files in the directory.
    fn temporaries(store: &HubStore) -> usize {
        std::fs::read_dir(store.blobs.dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .count()
    }

    /// Two downloads at once of a blob this process has not cached: both get its bytes,
    /// one copy is written (not one each), and it is kept.
    #[test]
    fn concurrent_downloads_of_a_blob_write_one_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(shared_hub(dir.path(), Arc::new(MemoryBlobStore::new()), 1 << 30));
        let weights: Vec<u8> = (0..(12u32 << 20)).map(|i| (i % 253) as u8).collect();
        let (m, _) = store.put_model("big.w", "1.0.0", &weights, None).unwrap();
        let d = m.digest.unwrap();
        std::fs::remove_file(store.blobs.path_of(&d)).unwrap();
        let open = || match store.blob_download(&d).unwrap() {
            Download::Shared(s) => s.stream(None).unwrap(),
            Download::File(_) => panic!("the blob is not cached"),
        };
        let (mut a, mut b) = (open(), open());
        // Neither read: the first download's copy waits on its client, the second has none.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(temporaries(&store), 1, "one copy is written");
        let drain = |rx: &mut tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>| {
            let mut all = Vec::new();
            while let Some(chunk) = rx.blocking_recv() {
                all.extend_from_slice(&chunk.unwrap());
            }
            all
        };
        let got_b = std::thread::scope(|s| {
            let b = s.spawn(|| drain(&mut b));
            assert!(drain(&mut a) == weights);
            b.join().unwrap()
        });
        assert!(got_b == weights);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cached(&store, &d) {
            assert!(std::time::Instant::now() < deadline, "the copy is kept");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(temporaries(&store), 0);
    }

    /// A copy of a blob that no record uses any more (deleted while it was copied) is not
    /// kept: the cache would never remove it.
    #[test]
    fn a_copy_of_a_blob_deleted_meanwhile_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = shared_hub(dir.path(), Arc::new(MemoryBlobStore::new()), 1 << 30);
        let (m, _) = store.put_model("kept.w", "1.0.0", b"in use", None).unwrap();
        let used = m.digest.unwrap();
        let copy = |bytes: &[u8]| {
            let tmp = store.blobs.temp_path();
            std::fs::write(&tmp, bytes).unwrap();
            store.adopt_cached(&tmp, &Digest::of(bytes)).unwrap()
        };
        assert_eq!(copy(b"in use"), Some(store.blobs.path_of(&used)));
        // A model deleted (and its blob collected) while a download was copying it.
        let (m, _) = store.put_model("gone.w", "1.0.0", b"deleted while copied", None).unwrap();
        store.delete_model("gone.w", "1.0.0", None).unwrap();
        assert!(!cached(&store, &m.digest.unwrap()));
        assert_eq!(copy(b"deleted while copied"), None);
        assert!(!cached(&store, &m.digest.unwrap()), "its copy is not kept");
        assert_eq!(temporaries(&store), 0);
    }

    /// A copy in the directory of a blob that neither the shared store nor any record has
    /// is evicted once it is older than a put or a restore can be, not before.
    #[test]
    fn an_orphan_copy_is_evicted_once_older_than_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let store = shared_hub(dir.path(), Arc::new(MemoryBlobStore::new()), 1);
        let place = |bytes: &[u8], age: Duration| {
            let d = Digest::of(bytes);
            let path = store.blobs.path_of(&d);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
            std::fs::File::open(&path).unwrap().set_modified(SystemTime::now() - age).unwrap();
            d
        };
        let orphan = place(b"deleted meanwhile", Duration::from_secs(2 * 3600));
        let young = place(b"a restore in progress", Duration::from_secs(600));
        store.evict().unwrap();
        assert!(!cached(&store, &orphan), "an old copy nothing uses is removed");
        assert!(cached(&store, &young), "a young one may be a put or a restore under way");
    }

    /// Without a shared store the directory is the only copy: no bound is accepted.
    #[test]
    fn a_hub_without_a_shared_store_takes_no_cache_limit() {
        let dir = tempfile::tempdir().unwrap();
        let e = HubStore::open(dir.path().join("hub")).unwrap().with_cache_limit(1).err().unwrap();
        assert!(e.to_string().contains("only copy"), "{e}");
    }
}
