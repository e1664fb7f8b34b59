//! Writing and reading objects of a JetStream Object Store, chunk by chunk.
//!
//! The layout is the Object Store's (NATS ADR-20), the one `async_nats`'s
//! `ObjectStore::put` writes and its `get` reads: the object's bytes as chunk messages on
//! `$O.<bucket>.C.<nuid>`, then its info (name, size, chunk count, `SHA-256=` digest,
//! base64url) as one message on `$O.<bucket>.M.<base64url(name)>` with the header
//! `Nats-Rollup: sub`, which replaces the info before it. `ObjectStore::put` publishes
//! 128 KiB chunks and waits for each one's acknowledgement before it reads the next: a
//! round trip to the server per 128 KiB. Here chunks are up to [`CHUNK`] bytes and up to
//! [`IN_FLIGHT`] of them await their acknowledgement at once. `ObjectStore::get` reads
//! through a push consumer, whose messages pile up in the client when the reader is slower
//! than the server; here the reader asks for [`READ_AHEAD`] bytes at a time, each batch
//! once the one before is read.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::object_store::{InfoErrorKind, ObjectInfo, ObjectOptions, ObjectStore};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use sha2::{Digest as _, Sha256};
use tessera_ports::{BlobError, BlobReader};
use tokio::io::AsyncReadExt;

/// The largest chunk: 1 MiB, the server's default `max_payload` (a server configured with a
/// smaller one gets chunks of its size).
pub const CHUNK: usize = 1 << 20;

/// Chunks published ahead of the oldest acknowledgement: at most this many chunks (8 MiB)
/// are held by the client at once.
pub const IN_FLIGHT: usize = 8;

/// Bytes a reader asks the server for at once: 8 MiB (at least one chunk, at most 256).
pub const READ_AHEAD: usize = 8 << 20;

/// How long a reader waits for the next chunk of a batch before its read fails.
const CHUNK_WAIT: Duration = Duration::from_secs(30);

/// How long a reader waits for a chunk before it looks whether its consumer is still there.
const FIRST_WAIT: Duration = Duration::from_secs(2);

/// How long the server keeps a reader's consumer between two batches; a reader slower than
/// that makes a new one where the old one stopped.
const CONSUMER_IDLE: Duration = Duration::from_secs(300);

fn backend(e: impl std::fmt::Display) -> BlobError {
    BlobError::Backend(e.to_string())
}

/// An Object Store as [`put`] and [`chunks`] use it.
pub struct Bucket<'a> {
    pub js: &'a async_nats::jetstream::Context,
    pub store: &'a ObjectStore,
    /// The bucket's name (its stream is `OBJ_<name>`).
    pub name: &'a str,
}

impl Bucket<'_> {
    /// The live info of object `name`, if any.
    async fn current(&self, name: &str) -> Result<Option<ObjectInfo>, BlobError> {
        match self.store.info(name).await {
            Ok(info) if !info.deleted => Ok(Some(info)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == InfoErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend(e)),
        }
    }

    /// Removes the messages on `subject` from the bucket's stream, logging a failure.
    async fn purge(&self, subject: &str) {
        let purged = async {
            let stream = self.js.get_stream(format!("OBJ_{}", self.name)).await.map_err(backend)?;
            stream.purge().filter(subject).await.map_err(backend)
        }
        .await;
        if let Err(e) = purged {
            tracing::warn!(subject, error = %e, "chunks no object points at stay in the Object Store");
        }
    }
}

/// Writes `reader` to its end as the object `name`; gives the object's info. A put whose
/// chunks cannot all be written purges those it wrote, once every one was acknowledged or
/// refused; a put that finds the object stored meanwhile by another writer (one that
/// outwaited its claim) keeps that object and purges its own chunks; a put whose info was
/// published but not acknowledged looks before it purges (the server may have stored it).
///
/// # Errors
/// [`BlobError::Backend`] naming what failed: reading `reader`, a publish, or an
/// acknowledgement.
pub async fn put(bucket: &Bucket<'_>, name: &str, reader: &mut BlobReader) -> Result<ObjectInfo, BlobError> {
    let max_payload = bucket.js.client().server_info().max_payload;
    let chunk_size = if max_payload == 0 { CHUNK } else { CHUNK.min(max_payload) };
    let nuid = nuid::next().to_string();
    let chunks_subject = format!("$O.{}.C.{nuid}", bucket.name);
    let (size, chunks, sha) = match write_chunks(bucket.js, &chunks_subject, chunk_size, reader).await {
        Ok(written) => written,
        Err(e) => {
            bucket.purge(&chunks_subject).await;
            return Err(e);
        }
    };
    match bucket.current(name).await {
        Ok(Some(existing)) => {
            bucket.purge(&chunks_subject).await;
            return Ok(existing);
        }
        Ok(None) => {}
        Err(e) => {
            bucket.purge(&chunks_subject).await;
            return Err(e);
        }
    }
    let info = ObjectInfo {
        name: name.to_owned(),
        description: None,
        metadata: Default::default(),
        headers: None,
        options: Some(ObjectOptions { link: None, max_chunk_size: Some(chunk_size) }),
        bucket: bucket.name.to_owned(),
        nuid: nuid.clone(),
        size,
        chunks,
        modified: Some(async_nats::datetime::now()),
        digest: Some(format!("SHA-256={}", URL_SAFE.encode(sha))),
        deleted: false,
    };
    // Publishing the same info again is harmless (it replaces itself): tried three times
    // before the put is given up.
    let mut published = publish_info(bucket, &info).await;
    for _ in 0..2 {
        if published.is_ok() {
            break;
        }
        published = publish_info(bucket, &info).await;
    }
    let Err(e) = published else { return Ok(info) };
    // The server may have stored an info whose acknowledgement was lost: the chunks go only
    // when the store says for certain that nothing points at them.
    match bucket.current(name).await {
        Ok(Some(stored)) if stored.nuid == nuid => Ok(stored),
        Ok(Some(other)) => {
            bucket.purge(&chunks_subject).await;
            Ok(other)
        }
        Ok(None) => {
            bucket.purge(&chunks_subject).await;
            Err(e)
        }
        Err(_) => {
            tracing::warn!(subject = %chunks_subject, "an object's info may not be stored; its chunks are kept");
            Err(e)
        }
    }
}

/// Publishes `reader` in chunks of `chunk_size` on `subject`, up to [`IN_FLIGHT`] awaiting
/// their acknowledgement: (bytes, chunks, SHA-256) once every chunk is acknowledged. Every
/// chunk published is acknowledged or refused before this returns, whatever failed.
async fn write_chunks(
    js: &async_nats::jetstream::Context,
    subject: &str,
    chunk_size: usize,
    reader: &mut BlobReader,
) -> Result<(usize, usize, [u8; 32]), BlobError> {
    let mut acks: VecDeque<PublishAckFuture> = VecDeque::with_capacity(IN_FLIGHT);
    let written = publish_chunks(js, subject, chunk_size, reader, &mut acks).await;
    let mut settled = Ok(());
    for ack in acks {
        if let Err(e) = ack.await
            && settled.is_ok()
        {
            settled = Err(backend(format!("chunk not acknowledged: {e}")));
        }
    }
    let written = written?;
    settled?;
    Ok(written)
}

/// The loop of [`write_chunks`]; acknowledgements still awaited are left in `acks`.
async fn publish_chunks(
    js: &async_nats::jetstream::Context,
    subject: &str,
    chunk_size: usize,
    reader: &mut BlobReader,
    acks: &mut VecDeque<PublishAckFuture>,
) -> Result<(usize, usize, [u8; 32]), BlobError> {
    // Each chunk is hashed on a blocking thread while the next is read and published.
    let mut sha = Some(Sha256::new());
    let mut hashing: Option<tokio::task::JoinHandle<Sha256>> = None;
    let (mut size, mut chunks) = (0usize, 0usize);
    loop {
        let mut buf = BytesMut::with_capacity(chunk_size);
        // A full chunk unless the reader ends: readers hand out what they have.
        while buf.len() < chunk_size {
            let mut limited = (&mut *reader).take((chunk_size - buf.len()) as u64);
            if limited.read_buf(&mut buf).await.map_err(|e| backend(format!("reading the object: {e}")))? == 0 {
                break;
            }
        }
        if buf.is_empty() {
            break;
        }
        let payload = buf.freeze();
        let mut running = match hashing.take() {
            Some(h) => h.await.map_err(backend)?,
            None => sha.take().unwrap_or_default(),
        };
        let hashed = payload.clone();
        hashing = Some(tokio::task::spawn_blocking(move || {
            running.update(&hashed);
            running
        }));
        size += payload.len();
        chunks += 1;
        if acks.len() == IN_FLIGHT
            && let Some(oldest) = acks.pop_front()
        {
            oldest.await.map_err(|e| backend(format!("chunk not acknowledged: {e}")))?;
        }
        let ack =
            js.publish(subject.to_owned(), payload).await.map_err(|e| backend(format!("publishing a chunk: {e}")))?;
        acks.push_back(ack);
    }
    let sha = match hashing {
        Some(h) => h.await.map_err(backend)?,
        None => sha.unwrap_or_default(),
    };
    Ok((size, chunks, sha.finalize().into()))
}

/// Publishes an object's info, replacing the info before it (`Nats-Rollup: sub`).
async fn publish_info(bucket: &Bucket<'_>, info: &ObjectInfo) -> Result<(), BlobError> {
    let subject = format!("$O.{}.M.{}", bucket.name, URL_SAFE.encode(&info.name));
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    let body = serde_json::to_vec(info).map_err(backend)?;
    bucket
        .js
        .publish_with_headers(subject, headers, body.into())
        .await
        .map_err(|e| backend(format!("publishing the object's info: {e}")))?
        .await
        .map_err(|e| backend(format!("the object's info not acknowledged: {e}")))?;
    Ok(())
}

/// Where a read of an object's chunks stands.
struct Reading {
    consumer: PullConsumer,
    stream: async_nats::jetstream::stream::Stream,
    filter: String,
    batch: Option<pull::Batch>,
    per_batch: usize,
    in_batch: usize,
    /// Empty batches in a row (one is looked at again before the read fails).
    empty: u8,
    /// Consumers made since the last chunk (a few, then the read fails).
    remade: u8,
    /// The stream sequence after the last chunk read (where a new consumer starts).
    next_sequence: Option<u64>,
    count: usize,
    seen: usize,
    total: usize,
    expected: usize,
    /// Its consumer was removed (after the last chunk); otherwise dropping it removes it.
    removed: bool,
}

impl Drop for Reading {
    /// A read given up before its end (a client gone, a header read from the front) removes
    /// its consumer rather than leave it to the server's idle threshold.
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (stream, name) = (self.stream.clone(), self.consumer.cached_info().name.clone());
        runtime.spawn(async move {
            if let Err(e) = stream.delete_consumer(&name).await {
                tracing::debug!(consumer = %name, error = %e, "an abandoned read's consumer is left to expire");
            }
        });
    }
}

impl Reading {
    /// A new consumer from where the read stopped, at most 3 times without a chunk between.
    /// `why`: what showed the consumer gone, named when the read gives up.
    async fn remake(&mut self, why: &str) -> Result<(), BlobError> {
        if self.remade >= 3 {
            return Err(backend(format!(
                "the object's reader lost its consumer three times without a chunk between (last: {why})"
            )));
        }
        self.remade += 1;
        // (one the server still has, unanswering, goes rather than wait for its idle expiry)
        let old = self.consumer.cached_info().name.clone();
        let _ = self.stream.delete_consumer(&old).await;
        self.consumer = consumer_of(&self.stream, &self.filter, self.next_sequence).await?;
        Ok(())
    }
}

/// An ephemeral pull consumer of `filter`'s messages, from `start` on (the first if `None`).
async fn consumer_of(
    stream: &async_nats::jetstream::stream::Stream,
    filter: &str,
    start: Option<u64>,
) -> Result<PullConsumer, BlobError> {
    stream
        .create_consumer(pull::Config {
            filter_subject: filter.to_owned(),
            deliver_policy: match start {
                Some(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
                None => DeliverPolicy::All,
            },
            ack_policy: AckPolicy::None,
            inactive_threshold: CONSUMER_IDLE,
            ..Default::default()
        })
        .await
        .map_err(backend)
}

/// The chunks of the object `info` of `bucket` in order, ending after `info.chunks` of
/// them, read through an ephemeral pull consumer on its chunk subject in batches of about
/// [`READ_AHEAD`] bytes, each asked for once the one before is read: a reader holds at most
/// one batch however slowly it reads (one slower than [`CONSUMER_IDLE`] between batches,
/// whose consumer the server has removed, gets a new one where it stopped). The consumer is
/// removed once the last chunk is read, or when the reader is dropped before (on the
/// runtime it is dropped on). A
/// chunk that does not come within [`CHUNK_WAIT`] fails the read.
/// The object's `SHA-256=` digest is not computed: callers check the bytes against the name
/// they asked for (a BLAKE3 digest), which a stored SHA-256 cannot vouch for anyway.
///
/// # Errors
/// [`BlobError::Backend`] when the consumer cannot be made; the stream's items when a
/// message fails, the chunks are not `info.size` bytes in all, or the server has fewer
/// chunks than `info.chunks` (the object was removed or cut short while read).
pub async fn chunks(
    bucket: &Bucket<'_>,
    info: &ObjectInfo,
) -> Result<BoxStream<'static, Result<Bytes, BlobError>>, BlobError> {
    if info.chunks == 0 {
        return Ok(futures::stream::empty().boxed());
    }
    let stream = bucket.js.get_stream(format!("OBJ_{}", bucket.name)).await.map_err(backend)?;
    let filter = format!("$O.{}.C.{}", bucket.name, info.nuid);
    let consumer = consumer_of(&stream, &filter, None).await?;
    let chunk = info.options.as_ref().and_then(|o| o.max_chunk_size).filter(|c| *c > 0).unwrap_or(CHUNK);
    let reading = Reading {
        consumer,
        stream,
        filter,
        batch: None,
        per_batch: (READ_AHEAD / chunk).clamp(1, 256),
        in_batch: 0,
        empty: 0,
        remade: 0,
        next_sequence: None,
        count: 0,
        seen: 0,
        total: info.chunks,
        expected: info.size,
        removed: false,
    };
    Ok(futures::stream::try_unfold(reading, next_chunk).boxed())
}

/// The next chunk of a [`Reading`], `None` after the last.
async fn next_chunk(mut r: Reading) -> Result<Option<(Bytes, Reading)>, BlobError> {
    loop {
        if r.count == r.total {
            let name = r.consumer.cached_info().name.clone();
            if let Err(e) = r.stream.delete_consumer(&name).await {
                tracing::debug!(consumer = %name, error = %e, "a finished read's consumer is left to expire");
            }
            r.removed = true;
            return Ok(None);
        }
        if r.batch.is_none() {
            let batch = match r.consumer.fetch().max_messages(r.per_batch).messages().await {
                Ok(b) => b,
                // Its consumer removed for being idle (a slow reader): a new one from where
                // the read stopped.
                Err(e) => {
                    r.remake(&format!("asking for chunks: {e}")).await?;
                    let batch = r.consumer.fetch().max_messages(r.per_batch).messages().await;
                    batch.map_err(|e| backend(format!("asking for chunks: {e}")))?
                }
            };
            r.batch = Some(batch);
            r.in_batch = 0;
        }
        let Some(batch) = r.batch.as_mut() else { continue };
        let late = || backend(format!("no chunk of the object came within {} s", CHUNK_WAIT.as_secs()));
        let next = match tokio::time::timeout(FIRST_WAIT, batch.next()).await {
            Ok(next) => next,
            // A batch that brings nothing at all: its consumer may be gone (the server
            // removes one left idle), and then nobody answers the request.
            Err(_) if r.in_batch == 0 && r.consumer.info().await.is_err() => {
                r.remake("a batch brought nothing").await?;
                r.batch = None;
                continue;
            }
            Err(_) => tokio::time::timeout(CHUNK_WAIT, batch.next()).await.map_err(|_| late())?,
        };
        match next {
            // A batch whose first answer is an error: its consumer may be gone (newer
            // servers, 2.15 here, answer a pull on a removed consumer with 503).
            Some(Err(e)) if r.in_batch == 0 && r.consumer.info().await.is_err() => {
                r.remake(&format!("reading a chunk: {e}")).await?;
                r.batch = None;
            }
            Some(m) => {
                let m = m.map_err(|e| backend(format!("reading a chunk: {e}")))?;
                if let Ok(info) = m.info() {
                    r.next_sequence = Some(info.stream_sequence + 1);
                }
                r.empty = 0;
                r.remade = 0;
                r.in_batch += 1;
                r.count += 1;
                r.seen += m.payload.len();
                if r.seen > r.expected || (r.count == r.total && r.seen != r.expected) {
                    return Err(backend(format!(
                        "the object's chunks hold {} bytes or more, its info says {}",
                        r.seen, r.expected
                    )));
                }
                let payload = m.payload.clone();
                return Ok(Some((payload, r)));
            }
            // Looked at once more (a replica that lags) before the read fails.
            None if r.in_batch == 0 && r.empty == 0 => {
                r.empty = 1;
                r.batch = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None if r.in_batch == 0 => {
                return Err(backend(format!(
                    "the object has {} of its {} chunks: it was removed or cut short while read",
                    r.count, r.total
                )));
            }
            None => r.batch = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that finds the object stored when its chunks are written (another writer
    /// outwaited its claim) keeps the stored object and leaves none of its own chunks.
    #[tokio::test]
    async fn a_put_that_finds_the_object_stored_keeps_it_and_purges_its_chunks() {
        let server = crate::testing::NatsServer::start();
        let nats = crate::connect(&server.url()).await.unwrap();
        // Makes the buckets.
        let _blobs = crate::NatsBlobs::open(&nats).await.unwrap();
        let store = nats.js.get_object_store("tessera_blobs").await.unwrap();
        let bucket = Bucket { js: &nats.js, store: &store, name: "tessera_blobs" };
        let first: BlobReader = Box::pin(std::io::Cursor::new(vec![1u8; 3 << 20]));
        let stored = put(&bucket, "x", &mut { first }).await.unwrap();
        let bytes = || async {
            let mut s = nats.js.get_stream("OBJ_tessera_blobs").await.unwrap();
            s.info().await.unwrap().state.bytes
        };
        let before = bytes().await;
        let second: BlobReader = Box::pin(std::io::Cursor::new(vec![2u8; 2 << 20]));
        let kept = put(&bucket, "x", &mut { second }).await.unwrap();
        assert_eq!((kept.nuid, kept.size), (stored.nuid, 3 << 20));
        assert_eq!(bytes().await, before, "the second writer's chunks are purged");
    }

    /// A read given up midway (its reader dropped) removes its consumer; one read to its end
    /// does too.
    #[tokio::test]
    async fn a_read_given_up_midway_leaves_no_consumer() {
        use futures::StreamExt;
        let server = crate::testing::NatsServer::start();
        let nats = crate::connect(&server.url()).await.unwrap();
        let _blobs = crate::NatsBlobs::open(&nats).await.unwrap();
        let store = nats.js.get_object_store("tessera_blobs").await.unwrap();
        let bucket = Bucket { js: &nats.js, store: &store, name: "tessera_blobs" };
        let object: BlobReader = Box::pin(std::io::Cursor::new(vec![7u8; 20 << 20]));
        let info = put(&bucket, "y", &mut { object }).await.unwrap();
        let consumers = || async {
            let mut s = nats.js.get_stream("OBJ_tessera_blobs").await.unwrap();
            s.info().await.unwrap().state.consumer_count
        };
        let mut reading = chunks(&bucket, &info).await.unwrap();
        assert_eq!(reading.next().await.unwrap().unwrap().len(), CHUNK);
        assert_eq!(consumers().await, 1);
        drop(reading);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while consumers().await != 0 {
            assert!(std::time::Instant::now() < deadline, "the abandoned read's consumer is removed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let whole: Vec<Bytes> = chunks(&bucket, &info).await.unwrap().map(Result::unwrap).collect().await;
        assert_eq!(whole.iter().map(Bytes::len).sum::<usize>(), 20 << 20);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(consumers().await, 0);
        // A reader that stops at the last chunk, without asking for more (a header read from
        // the front of a one-chunk object).
        let small: BlobReader = Box::pin(std::io::Cursor::new(vec![3u8; 500 << 10]));
        let info = put(&bucket, "z", &mut { small }).await.unwrap();
        let mut reading = chunks(&bucket, &info).await.unwrap();
        assert_eq!(reading.next().await.unwrap().unwrap().len(), 500 << 10);
        drop(reading);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while consumers().await != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the consumer of a read stopped at its last chunk is removed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
