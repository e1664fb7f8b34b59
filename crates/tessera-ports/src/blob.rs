//! Content-addressed blobs: bytes named by their BLAKE3 digest.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};

use async_trait::async_trait;
use bytes::Bytes;
use tessera_core::{Digest, DigestWriter};
use tokio::io::{AsyncRead, ReadBuf};

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The stored bytes no longer match their digest.
    #[error("blob {0} is corrupt: its bytes do not match its digest")]
    Corrupt(Digest),
    /// The blob is over the store's size limit.
    #[error("blob of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// File-system failure.
    #[error("blob store I/O at {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The backend failed.
    #[error("blob backend: {0}")]
    Backend(String),
}

/// Content-addressed bytes.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores bytes; returns their digest. Storing the same bytes twice is a no-op.
    async fn put(&self, bytes: Bytes) -> Result<Digest, BlobError>;
    /// Reads bytes by digest, verified.
    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, BlobError>;
    /// True when the blob is stored.
    async fn contains(&self, digest: &Digest) -> Result<bool, BlobError>;
    /// Removes a blob; returns whether it was there.
    async fn delete(&self, digest: &Digest) -> Result<bool, BlobError>;
    /// Bytes the store holds, by its own measure (for NATS, its streams' bytes, which
    /// include each message's headers): what retention keeps flat across rounds.
    async fn stored_bytes(&self) -> Result<u64, BlobError>;

    /// The blob's length in bytes when the store can tell without reading it; `None` when
    /// it is not stored or the store cannot tell (the default).
    ///
    /// # Errors
    /// The store's.
    async fn size(&self, _digest: &Digest) -> Result<Option<u64>, BlobError> {
        Ok(None)
    }

    /// Stores the file at `path` as the blob `digest` (which the caller computed: it is not
    /// read again to check). Stores that can stream do, in bounded memory; the default reads
    /// the file whole and [`put`](BlobStore::put)s it.
    ///
    /// # Errors
    /// [`BlobError::Io`] when the file cannot be read; [`BlobError::Corrupt`] when the
    /// default's read bytes are not `digest`; the store's errors.
    async fn put_file(&self, path: &Path, digest: &Digest) -> Result<(), BlobError> {
        let bytes = tokio::fs::read(path).await.map_err(|source| BlobError::Io { path: path.to_owned(), source })?;
        if &self.put(Bytes::from(bytes)).await? != digest {
            return Err(BlobError::Corrupt(*digest));
        }
        Ok(())
    }

    /// Writes the blob `digest` to a new file at `path`, verified (a blob whose bytes do not
    /// match leaves no file): false when the store does not hold it. Stores that can stream
    /// do, in bounded memory.
    ///
    /// # Errors
    /// [`BlobError::Corrupt`]; [`BlobError::Io`] when the file cannot be written; the
    /// store's errors.
    async fn get_file(&self, digest: &Digest, path: &Path) -> Result<bool, BlobError> {
        let Some(bytes) = self.get(digest).await? else { return Ok(false) };
        tokio::fs::write(path, &bytes).await.map_err(|source| BlobError::Io { path: path.to_owned(), source })?;
        Ok(true)
    }

    /// Stores the blob `digest`, `size` bytes read from `reader` to its end (a producer
    /// that writes as it goes: a large model encoded a chunk at a time). Stores that can
    /// stream do, in bounded memory: the local directory checks the bytes against `digest`,
    /// the NATS Object Store takes the caller's word as [`put_file`](BlobStore::put_file)
    /// does. The default reads the stream whole and [`put`](BlobStore::put)s it.
    ///
    /// # Errors
    /// [`BlobError::Io`] when `reader` fails; [`BlobError::Corrupt`] when the bytes are not
    /// `digest`'s (where checked); the store's errors.
    async fn put_stream(&self, digest: &Digest, size: u64, mut reader: BlobReader) -> Result<(), BlobError> {
        use tokio::io::AsyncReadExt;
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(4 << 30));
        reader
            .read_to_end(&mut bytes)
            .await
            .map_err(|source| BlobError::Io { path: PathBuf::from("(stream)"), source })?;
        if &self.put(Bytes::from(bytes)).await? != digest {
            return Err(BlobError::Corrupt(*digest));
        }
        Ok(())
    }

    /// Opens the blob `digest` for reading front to back; `None` when the store does not
    /// hold it. Stores that can stream do, in bounded memory; the default reads the blob
    /// whole ([`get`](BlobStore::get), verified) and serves it from memory.
    ///
    /// The bytes are checked against `digest` as they pass ([`Verified`]): the read that
    /// reaches the end fails with [`std::io::ErrorKind::InvalidData`] when they are not
    /// `digest`'s, so a reader trusts what it read only once it has read to the end.
    ///
    /// # Errors
    /// The store's errors in opening it.
    async fn reader(&self, digest: &Digest) -> Result<Option<BlobReader>, BlobError> {
        Ok(self.get(digest).await?.map(|b| Box::pin(std::io::Cursor::new(b)) as BlobReader))
    }

    /// The stored bytes of blob `digest` for reads at any position, without a copy: the
    /// memory store's shared buffer, the directory store's file. Not verified: a reader
    /// that needs the digest checked hashes what it reads. `None` when the blob is missing
    /// or the store has no such view (the default, and a network store's case: copy it to
    /// a local file with [`get_file`](BlobStore::get_file) then).
    ///
    /// # Errors
    /// The store's errors.
    async fn view(&self, _digest: &Digest) -> Result<Option<BlobView>, BlobError> {
        Ok(None)
    }
}

/// A stored blob's bytes, read at any position ([`BlobStore::view`]).
#[derive(Clone, Debug)]
pub enum BlobView {
    /// Bytes in memory, shared with the store: readable as long as the view is held.
    Bytes(Bytes),
    /// A file, opened for each read, so that a caller holding many views holds no file
    /// descriptor for them. The directory store never writes a blob in place (a temporary
    /// file is renamed over it), so a read sees the stored bytes; a blob deleted meanwhile
    /// fails the next read ([`std::io::ErrorKind::NotFound`]).
    Path(PathBuf),
}

impl BlobView {
    /// Fills `buf` from byte `offset` on (a positioned read of a file: blocking).
    ///
    /// # Errors
    /// [`std::io::ErrorKind::UnexpectedEof`] when the blob ends before `buf` is full (or
    /// [`std::io::ErrorKind::InvalidInput`] for an offset past what a file can have); the
    /// file's open and read errors.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            BlobView::Bytes(b) => {
                let end = usize::try_from(offset).ok().and_then(|o| o.checked_add(buf.len()).map(|e| (o, e)));
                match end {
                    Some((o, e)) if e <= b.len() => {
                        buf.copy_from_slice(&b[o..e]);
                        Ok(())
                    }
                    _ => Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{} bytes from {offset} of a blob of {}", buf.len(), b.len()),
                    )),
                }
            }
            BlobView::Path(p) => std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(p)?, buf, offset),
        }
    }

    /// The blob's length in bytes.
    ///
    /// # Errors
    /// The file's metadata errors.
    pub fn size(&self) -> std::io::Result<u64> {
        match self {
            BlobView::Bytes(b) => Ok(b.len() as u64),
            BlobView::Path(p) => Ok(std::fs::metadata(p)?.len()),
        }
    }
}

/// A blob read front to back ([`BlobStore::reader`]).
pub type BlobReader = Pin<Box<dyn AsyncRead + Send>>;

/// A reader that checks the bytes passing through against a digest: the read that finds
/// the end fails with [`std::io::ErrorKind::InvalidData`] when they do not match.
pub struct Verified<R> {
    inner: R,
    hasher: Option<DigestWriter>,
    digest: Digest,
    /// The end was reached and did not match: every later read fails too.
    corrupt: bool,
}

impl<R> Verified<R> {
    /// Checks what `inner` gives against `digest`.
    pub fn new(inner: R, digest: Digest) -> Self {
        Verified { inner, hasher: Some(DigestWriter::new()), digest, corrupt: false }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Verified<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let refuse = |digest: Digest| {
            Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                BlobError::Corrupt(digest).to_string(),
            )))
        };
        if this.corrupt {
            return refuse(this.digest);
        }
        let (before, room) = (buf.filled().len(), buf.remaining() > 0);
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            if let Some(h) = &mut this.hasher {
                h.update(new);
            }
        } else if room && let Some(h) = this.hasher.take() {
            // The end: every byte has passed.
            if h.finish() != this.digest {
                this.corrupt = true;
                return refuse(this.digest);
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The bytes a [`BlobRef`](tessera_core::wire::BlobRef) names: its inline bytes (checked
/// against its digest and size) when it carries them, otherwise the blob from `store`.
/// Every reader of a task's inputs or outputs goes through here, so a small blob may travel
/// in the message or through the store alike.
///
/// # Errors
/// [`BlobError::Corrupt`] when inline bytes do not match the digest; the store's errors.
pub async fn read_ref(store: &dyn BlobStore, r: &tessera_core::wire::BlobRef) -> Result<Option<Bytes>, BlobError> {
    match r.inline_bytes() {
        Ok(Some(b)) => Ok(Some(Bytes::copy_from_slice(b))),
        Ok(None) => store.get(&r.digest).await,
        Err(_) => Err(BlobError::Corrupt(r.digest)),
    }
}

/// Blobs in memory (the embedded default for run data).
#[derive(Default)]
pub struct MemoryBlobStore {
    blobs: Mutex<HashMap<Digest, Bytes>>,
}

impl MemoryBlobStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Bytes>> {
        self.blobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl BlobStore for MemoryBlobStore {
    async fn put(&self, bytes: Bytes) -> Result<Digest, BlobError> {
        let d = Digest::of(&bytes);
        self.lock().entry(d).or_insert(bytes);
        Ok(d)
    }
    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, BlobError> {
        Ok(self.lock().get(digest).cloned())
    }
    async fn contains(&self, digest: &Digest) -> Result<bool, BlobError> {
        Ok(self.lock().contains_key(digest))
    }
    async fn size(&self, digest: &Digest) -> Result<Option<u64>, BlobError> {
        Ok(self.lock().get(digest).map(|b| b.len() as u64))
    }
    async fn view(&self, digest: &Digest) -> Result<Option<BlobView>, BlobError> {
        Ok(self.lock().get(digest).cloned().map(BlobView::Bytes))
    }
    async fn delete(&self, digest: &Digest) -> Result<bool, BlobError> {
        Ok(self.lock().remove(digest).is_some())
    }
    async fn stored_bytes(&self) -> Result<u64, BlobError> {
        Ok(self.lock().values().map(|b| b.len() as u64).sum())
    }
}

/// Blobs as files in a directory, `<dir>/<first 2 hex>/<64 hex>`, written atomically
/// (temporary file, fsync, rename) and verified on every read.
pub struct FsBlobStore {
    dir: PathBuf,
}

impl FsBlobStore {
    /// A store rooted at `dir` (created if missing).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| BlobError::Io { path: dir.clone(), source })?;
        Ok(FsBlobStore { dir })
    }

    /// Where a blob lives (whether or not it is stored).
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        Self::path_under(&self.dir, digest)
    }

    /// Where a blob lives in a store rooted at `dir`, without opening (or making) it.
    pub fn path_under(dir: &Path, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        dir.join(&hex[..2]).join(hex)
    }

    /// The root directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves a file whose digest the caller has computed into the store (used for
    /// streamed uploads: the file was hashed while it was written). The file must be on
    /// the same file system as the store.
    pub fn adopt_file(&self, file: &Path, digest: &Digest) -> Result<PathBuf, BlobError> {
        let dest = self.path_of(digest);
        if dest.exists() {
            let _ = std::fs::remove_file(file);
            return Ok(dest);
        }
        let parent = dest.parent().expect("blob paths have a parent");
        std::fs::create_dir_all(parent).map_err(|source| BlobError::Io { path: parent.to_owned(), source })?;
        std::fs::rename(file, &dest).map_err(|source| BlobError::Io { path: dest.clone(), source })?;
        Ok(dest)
    }

    /// A temporary path inside the store's directory, for streamed writes: unique among
    /// every process writing to the directory, on this machine or another sharing it (the
    /// process id, a counter and 64 random bits: processes in containers often share ids).
    pub fn temp_path(&self) -> PathBuf {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).expect("the operating system's random source works");
        self.dir.join(format!(".tmp-{}-{n}-{:016x}", std::process::id(), u64::from_le_bytes(random)))
    }

    fn write_sync(&self, bytes: &[u8], digest: &Digest) -> Result<(), BlobError> {
        let dest = self.path_of(digest);
        if dest.exists() {
            return Ok(());
        }
        let tmp = self.temp_path();
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| BlobError::Io { path, source }
        };
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        self.adopt_file(&tmp, digest).map(|_| ())
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn put(&self, bytes: Bytes) -> Result<Digest, BlobError> {
        let digest = Digest::of(&bytes);
        let store = FsBlobStore { dir: self.dir.clone() };
        tokio::task::spawn_blocking(move || store.write_sync(&bytes, &digest))
            .await
            .map_err(|e| BlobError::Backend(e.to_string()))??;
        Ok(digest)
    }

    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, BlobError> {
        let path = self.path_of(digest);
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(BlobError::Io { path, source }),
        };
        if &Digest::of(&bytes) != digest {
            return Err(BlobError::Corrupt(*digest));
        }
        Ok(Some(Bytes::from(bytes)))
    }

    async fn contains(&self, digest: &Digest) -> Result<bool, BlobError> {
        Ok(tokio::fs::try_exists(self.path_of(digest)).await.unwrap_or(false))
    }

    async fn size(&self, digest: &Digest) -> Result<Option<u64>, BlobError> {
        let path = self.path_of(digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BlobError::Io { path, source }),
        }
    }

    async fn put_file(&self, path: &Path, digest: &Digest) -> Result<(), BlobError> {
        let file =
            tokio::fs::File::open(path).await.map_err(|source| BlobError::Io { path: path.to_owned(), source })?;
        let size = file.metadata().await.map_err(|source| BlobError::Io { path: path.to_owned(), source })?.len();
        self.put_stream(digest, size, Box::pin(file)).await
    }

    async fn put_stream(&self, digest: &Digest, _size: u64, reader: BlobReader) -> Result<(), BlobError> {
        use tokio::io::AsyncWriteExt;
        if tokio::fs::try_exists(self.path_of(digest)).await.unwrap_or(false) {
            return Ok(());
        }
        // Written beside the store's files, checked, then moved in; removed on any failure.
        let tmp = self.temp_path();
        let written: Result<(), BlobError> = async {
            let io = |source| BlobError::Io { path: tmp.clone(), source };
            let mut out = tokio::fs::File::create(&tmp).await.map_err(io)?;
            let mut checked = Verified::new(reader, *digest);
            match tokio::io::copy(&mut checked, &mut out).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Err(BlobError::Corrupt(*digest)),
                Err(e) => return Err(io(e)),
            }
            out.flush().await.map_err(io)?;
            out.sync_all().await.map_err(io)?;
            Ok(())
        }
        .await;
        let adopted = match written {
            Ok(()) => self.adopt_file(&tmp, digest).map(|_| ()),
            Err(e) => Err(e),
        };
        if adopted.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        adopted
    }

    async fn reader(&self, digest: &Digest) -> Result<Option<BlobReader>, BlobError> {
        let path = self.path_of(digest);
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(Some(Box::pin(Verified::new(file, *digest)))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BlobError::Io { path, source }),
        }
    }

    async fn view(&self, digest: &Digest) -> Result<Option<BlobView>, BlobError> {
        let path = self.path_of(digest);
        match tokio::fs::metadata(&path).await {
            Ok(_) => Ok(Some(BlobView::Path(path))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BlobError::Io { path, source }),
        }
    }

    async fn delete(&self, digest: &Digest) -> Result<bool, BlobError> {
        let path = self.path_of(digest);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(BlobError::Io { path, source }),
        }
    }

    async fn stored_bytes(&self) -> Result<u64, BlobError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut total = 0u64;
            // Blobs live one level down, in folders named by their digest's first two hex
            // digits; anything else (temporary files) is counted too.
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(source) => return Err(BlobError::Io { path: dir.clone(), source }),
            };
            for e in entries.flatten() {
                let Ok(meta) = e.metadata() else { continue };
                if meta.is_file() {
                    total += meta.len();
                } else if meta.is_dir() {
                    for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                        total += f.metadata().map(|m| if m.is_file() { m.len() } else { 0 }).unwrap_or(0);
                    }
                }
            }
            Ok(total)
        })
        .await
        .map_err(|e| BlobError::Backend(e.to_string()))?
    }
}
