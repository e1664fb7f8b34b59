//! A file written from a stream of byte chunks at disk speed: the chunks are gathered into
//! batches of [`BATCH`] bytes, and each batch is hashed and written on a blocking thread
//! while the next one arrives, so receiving (a socket, on the async runtime) and hashing
//! plus writing run at once on two cores. A thread is held only while a batch is written,
//! never while the sender waits for bytes (a slow client holds none).
//!
//! While the bytes arrive, the write-back of what is written starts every
//! [`WRITE_BACK_EVERY`] bytes (on Linux, `posix_fadvise(POSIX_FADV_DONTNEED)` over the
//! range just written, which starts writing its dirty pages back without waiting for them),
//! so the caller's final `sync` has little left to wait for. The same call drops from the
//! page cache whatever of that range is already on disk, so a large file written here is
//! not all kept in the page cache. RocksDB's `bytes_per_sync` does the same with
//! `sync_file_range`, which no safe binding offers.
//!
//! The sink neither names nor syncs the file at the end: that is the caller's (which checks
//! the digest first).

use std::fs::File;
use std::io::Write;

use bytes::Bytes;
use tessera_core::DigestWriter;

/// Bytes gathered before a batch is handed to a writing thread: 1 MiB (at most two batches,
/// the one being written and the one gathering, are held).
pub const BATCH: usize = 1 << 20;

/// Bytes written between two starts of write-back: 32 MiB.
pub const WRITE_BACK_EVERY: u64 = 32 << 20;

/// What a finished sink hands back.
pub struct Written {
    /// The file, positioned at its end.
    pub file: File,
    /// The hashers, fed every byte in order.
    pub hashers: Vec<DigestWriter>,
    /// Bytes written.
    pub len: u64,
}

/// What a batch's writing thread owns while it writes.
struct State {
    file: File,
    hashers: Vec<DigestWriter>,
    len: u64,
    /// The file's end.
    pos: u64,
    /// Where the bytes whose write-back has not been started begin.
    flushed: u64,
    /// Dropped only with the state: after the last write.
    _keep: Box<dyn Send>,
}

/// A file being appended to from chunks; see the module's documentation.
///
/// Dropping it unfinished lets the batch being written land: the file may grow a little
/// after the drop. Whatever must not happen meanwhile (another writer of the same file)
/// waits on the value given to [`FileSink::start_keeping`], dropped only after the last
/// write.
pub struct FileSink {
    /// The state, when no batch is being written.
    idle: Option<State>,
    /// The batch being written, which hands the state back.
    writing: Option<tokio::task::JoinHandle<std::io::Result<State>>>,
    gathering: Vec<Bytes>,
    gathered: usize,
}

impl FileSink {
    /// Starts appending to `file` (from its end, whatever its position), feeding every chunk
    /// to each of `hashers` first.
    ///
    /// # Errors
    /// The I/O error of finding the file's end.
    pub fn start(file: File, hashers: Vec<DigestWriter>) -> std::io::Result<FileSink> {
        Self::start_keeping(file, hashers, ())
    }

    /// [`FileSink::start`], holding `keep` until the last write has ended (a lock on the
    /// file, say), even when the sink is dropped unfinished.
    ///
    /// # Errors
    /// The I/O error of finding the file's end.
    pub fn start_keeping<K: Send + 'static>(
        mut file: File,
        hashers: Vec<DigestWriter>,
        keep: K,
    ) -> std::io::Result<FileSink> {
        use std::io::Seek;
        let end = file.seek(std::io::SeekFrom::End(0))?;
        Ok(FileSink {
            idle: Some(State { file, hashers, len: 0, pos: end, flushed: end, _keep: Box::new(keep) }),
            writing: None,
            gathering: Vec::new(),
            gathered: 0,
        })
    }

    /// Adds a chunk; once a batch is gathered, waits for the batch before it to be written
    /// and hands this one to a writing thread. Must be called on a Tokio runtime.
    ///
    /// # Errors
    /// The I/O error of writing an earlier batch (the sink is then unusable).
    pub async fn write(&mut self, chunk: Bytes) -> std::io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.gathered += chunk.len();
        self.gathering.push(chunk);
        if self.gathered >= BATCH {
            self.dispatch().await?;
        }
        Ok(())
    }

    /// Writes what is gathered and waits for every write; returns the file, the hashers and
    /// the length.
    ///
    /// # Errors
    /// The first I/O error of a write.
    pub async fn finish(mut self) -> std::io::Result<Written> {
        if !self.gathering.is_empty() {
            self.dispatch().await?;
        }
        let state = self.settle().await?;
        Ok(Written { file: state.file, hashers: state.hashers, len: state.len })
    }

    /// The state, once the batch being written (if any) has landed.
    async fn settle(&mut self) -> std::io::Result<State> {
        if let Some(w) = self.writing.take() {
            return w.await.map_err(std::io::Error::other)?;
        }
        self.idle.take().ok_or_else(|| std::io::Error::other("the file sink stopped on an earlier error"))
    }

    async fn dispatch(&mut self) -> std::io::Result<()> {
        let mut state = self.settle().await?;
        let batch = std::mem::take(&mut self.gathering);
        self.gathered = 0;
        self.writing = Some(tokio::task::spawn_blocking(move || {
            for chunk in &batch {
                for h in &mut state.hashers {
                    h.update(chunk);
                }
                state.file.write_all(chunk)?;
                state.len += chunk.len() as u64;
                state.pos += chunk.len() as u64;
            }
            if state.pos - state.flushed >= WRITE_BACK_EVERY {
                start_write_back(&state.file, state.flushed, state.pos - state.flushed);
                state.flushed = state.pos;
            }
            Ok(state)
        }));
        Ok(())
    }
}

/// Starts writing `len` bytes of the file from `offset` to disk, without waiting for them
/// (see the module's documentation). A failure is not reported here: the caller's sync
/// meets it.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn start_write_back(file: &File, offset: u64, len: u64) {
    if let Err(e) = rustix::fs::fadvise(file, offset, std::num::NonZeroU64::new(len), rustix::fs::Advice::DontNeed) {
        tracing::debug!("starting write-back: {e}");
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn start_write_back(_file: &File, _offset: u64, _len: u64) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_land_in_order_hashed_and_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"head:").unwrap();
        // Positioned at the start: the sink appends all the same.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut sink = FileSink::start(file, vec![DigestWriter::new(), DigestWriter::new()]).unwrap();
        let mut expected = Vec::new();
        // Enough to pass WRITE_BACK_EVERY twice, in uneven chunks.
        let mut i = 0u32;
        while (expected.len() as u64) < 2 * WRITE_BACK_EVERY + 12345 {
            let chunk: Vec<u8> = (0..(1000 + (i % 7) * 70_001)).map(|j| (j ^ i) as u8).collect();
            expected.extend_from_slice(&chunk);
            sink.write(Bytes::from(chunk)).await.unwrap();
            sink.write(Bytes::new()).await.unwrap();
            i += 1;
        }
        let w = sink.finish().await.unwrap();
        assert_eq!(w.len, expected.len() as u64);
        let want = tessera_core::Digest::of(&expected);
        assert!(w.hashers.iter().all(|h| h.finish() == want && h.len() == w.len));
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[..5], b"head:");
        assert!(on_disk[5..] == expected[..], "the file holds the chunks in order");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        // A file opened read-only: every write fails.
        let mut sink = FileSink::start(File::open(&path).unwrap(), Vec::new()).unwrap();
        let mut error = None;
        for _ in 0..8 {
            if let Err(e) = sink.write(Bytes::from(vec![1u8; BATCH])).await {
                error = Some(e);
                break;
            }
        }
        let error = error.expect("the second batch meets the first one's error");
        assert_eq!(error.raw_os_error(), Some(9), "EBADF from the write, got {error}");
        assert!(sink.write(Bytes::from(vec![1u8; BATCH])).await.is_err(), "unusable after an error");
        assert!(sink.finish().await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_sink_releases_what_it_keeps_after_its_last_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let keep = Arc::new(());
        let mut sink = FileSink::start_keeping(file, Vec::new(), keep.clone()).unwrap();
        // Big batches, so one is still being written when the sink is dropped.
        for _ in 0..4 {
            sink.write(Bytes::from(vec![7u8; 16 * BATCH])).await.unwrap();
        }
        assert_eq!(Arc::strong_count(&keep), 2, "kept while writing");
        drop(sink);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while Arc::strong_count(&keep) > 1 {
            assert!(std::time::Instant::now() < deadline, "never released");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Released: no write comes after.
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, 4 * 16 * BATCH as u64, "the batch in flight landed whole");
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    }
}
