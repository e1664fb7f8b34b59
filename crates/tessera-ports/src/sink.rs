//! A file written from a stream of byte chunks at disk speed: the chunks go through a
//! bounded channel to a thread of their own that hashes them and writes them, so receiving
//! (a socket, on the async runtime) and hashing plus writing run at once on two cores.
//!
//! While the bytes arrive, the write-back of what is written starts every
//! [`WRITE_BACK_EVERY`] bytes, as RocksDB's `bytes_per_sync` does, so the caller's final
//! `sync` has little left to wait for: `posix_fadvise(POSIX_FADV_DONTNEED)` over the range
//! just written, which on Linux starts writing its dirty pages back without waiting for
//! them (and drops none of them from the page cache, all being dirty).
//!
//! The sink neither names nor syncs the file at the end: that is the caller's (which checks
//! the digest first).

use std::fs::File;
use std::io::Write;

use bytes::Bytes;
use tessera_core::DigestWriter;
use tokio::sync::mpsc;

/// Chunks in flight between the receiver and the writing thread (with chunks of 8 KiB to
/// 1 MiB, at most a few MiB held).
const IN_FLIGHT: usize = 8;

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

/// A file being written from chunks; see the module's documentation.
///
/// Dropping it unfinished stops the writer after the chunks already queued: the file may
/// grow a little after the drop. Whatever must not happen meanwhile (another writer of the
/// same file) waits on the value given to [`FileSink::start_keeping`], dropped only when
/// the writing thread ends.
pub struct FileSink {
    tx: Option<mpsc::Sender<Bytes>>,
    worker: Option<tokio::task::JoinHandle<std::io::Result<Written>>>,
}

impl FileSink {
    /// Starts appending to `file` (from its end, whatever its position), feeding every chunk to each of
    /// `hashers` first. Must be called on a Tokio runtime (the writer is a blocking task).
    pub fn start(file: File, hashers: Vec<DigestWriter>) -> FileSink {
        Self::start_keeping(file, hashers, ())
    }

    /// [`FileSink::start`], holding `keep` until the writing thread ends (a lock on the
    /// file, say), even when the sink is dropped unfinished.
    pub fn start_keeping<K: Send + 'static>(file: File, hashers: Vec<DigestWriter>, keep: K) -> FileSink {
        let (tx, rx) = mpsc::channel::<Bytes>(IN_FLIGHT);
        let worker = tokio::task::spawn_blocking(move || {
            let written = write_all(file, hashers, rx);
            drop(keep);
            written
        });
        FileSink { tx: Some(tx), worker: Some(worker) }
    }

    /// Hands a chunk to the writer, waiting while [`IN_FLIGHT`] chunks are queued.
    ///
    /// # Errors
    /// The writer's I/O error when it stopped (the chunk is not written).
    pub async fn write(&mut self, chunk: Bytes) -> std::io::Result<()> {
        let Some(tx) = &self.tx else { return Err(std::io::Error::other("the file sink is finished")) };
        if chunk.is_empty() {
            return Ok(());
        }
        if tx.send(chunk).await.is_err() {
            // The writer stopped on an error: report it.
            self.tx = None;
            return Err(self.join().await.err().unwrap_or_else(|| std::io::Error::other("the file writer stopped")));
        }
        Ok(())
    }

    /// Waits for every chunk to be written; returns the file, the hashers and the length.
    ///
    /// # Errors
    /// The first I/O error of a write or of a write-back (`fdatasync`).
    pub async fn finish(mut self) -> std::io::Result<Written> {
        self.tx = None;
        self.join().await
    }

    async fn join(&mut self) -> std::io::Result<Written> {
        match self.worker.take() {
            Some(w) => w.await.map_err(std::io::Error::other)?,
            None => Err(std::io::Error::other("the file writer stopped on an error reported before")),
        }
    }
}

fn write_all(
    mut file: File,
    mut hashers: Vec<DigestWriter>,
    mut rx: mpsc::Receiver<Bytes>,
) -> std::io::Result<Written> {
    use std::io::Seek;
    // Where the bytes not yet sent to disk begin.
    let mut flushed = file.seek(std::io::SeekFrom::End(0))?;
    let mut len = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        for h in &mut hashers {
            h.update(&chunk);
        }
        file.write_all(&chunk)?;
        len += chunk.len() as u64;
        let at = file.stream_position()?;
        if at.saturating_sub(flushed) >= WRITE_BACK_EVERY {
            start_write_back(&file, flushed, at - flushed);
            flushed = at;
        }
    }
    Ok(Written { file, hashers, len })
}

/// Starts writing `len` bytes of the file from `offset` to disk, without waiting for them
/// (see the module's documentation). A failure is not reported here: the caller's sync
/// meets it.
fn start_write_back(file: &File, offset: u64, len: u64) {
    if let Err(e) = rustix::fs::fadvise(file, offset, std::num::NonZeroU64::new(len), rustix::fs::Advice::DontNeed) {
        tracing::debug!("starting write-back: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_land_in_order_hashed_and_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"head:").unwrap();
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.seek(SeekFrom::End(0)).unwrap();
        let mut sink = FileSink::start(file, vec![DigestWriter::new(), DigestWriter::new()]);
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
    async fn a_failing_write_is_reported_to_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        // A file opened read-only: every write fails.
        let file = File::open(&path).unwrap();
        let mut sink = FileSink::start(file, Vec::new());
        let mut error = None;
        for _ in 0..(IN_FLIGHT * 4) {
            if let Err(e) = sink.write(Bytes::from_static(b"bytes")).await {
                error = Some(e);
                break;
            }
        }
        let error = match error {
            Some(e) => e,
            None => sink.finish().await.err().expect("finishing reports the failed write"),
        };
        assert_eq!(error.raw_os_error(), Some(9), "EBADF from the write, got {error}");
    }
}
