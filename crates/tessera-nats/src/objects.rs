//! Writing an object into a JetStream Object Store with its acknowledgements pipelined.
//!
//! The layout is the Object Store's (NATS ADR-20), the one `async_nats`'s
//! `ObjectStore::put` writes and its `get` reads: the object's bytes as chunk messages on
//! `$O.<bucket>.C.<nuid>`, then its info (name, size, chunk count, `SHA-256=` digest,
//! base64url) as one message on `$O.<bucket>.M.<base64url(name)>` with the header
//! `Nats-Rollup: sub`, which replaces the info before it. `ObjectStore::put` publishes
//! 128 KiB chunks and waits for each one's acknowledgement before it reads the next: a
//! round trip to the server per 128 KiB. Here chunks are up to [`CHUNK`] bytes and up to
//! [`IN_FLIGHT`] of them await their acknowledgement at once.

use std::collections::VecDeque;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::object_store::{ObjectInfo, ObjectOptions};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE;
use bytes::{Bytes, BytesMut};
use sha2::{Digest as _, Sha256};
use tessera_ports::{BlobError, BlobReader};
use tokio::io::AsyncReadExt;

/// The largest chunk: 1 MiB, the server's default `max_payload` (a server configured with a
/// smaller one gets chunks of its size).
pub const CHUNK: usize = 1 << 20;

/// Bytes a reader asks the server for at once: 8 MiB.
pub const READ_AHEAD: usize = 8 << 20;

/// Chunks a reader asks for at once (chunks of an object the library wrote are 128 KiB).
const READ_AHEAD_CHUNKS: usize = 64;

/// Chunks published ahead of the oldest acknowledgement: at most this many chunks (8 MiB)
/// are held by the client at once.
pub const IN_FLIGHT: usize = 8;

fn backend(e: impl std::fmt::Display) -> BlobError {
    BlobError::Backend(e.to_string())
}

/// Writes `reader` to its end as the object `name` of the Object Store `bucket` through
/// `js`. A put that fails purges the chunks it had written (best effort), so that a failed
/// write leaves no bytes behind under a name nobody points at.
///
/// # Errors
/// [`BlobError::Backend`] naming what failed: reading `reader`, a publish, or an
/// acknowledgement.
pub async fn put(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    name: &str,
    reader: &mut BlobReader,
) -> Result<ObjectInfo, BlobError> {
    let max_payload = js.client().server_info().max_payload;
    let chunk_size = if max_payload == 0 { CHUNK } else { CHUNK.min(max_payload) };
    let nuid = nuid::next().to_string();
    let chunks_subject = format!("$O.{bucket}.C.{nuid}");
    let written = write_chunks(js, &chunks_subject, chunk_size, reader).await;
    let finished = match written {
        Ok((size, chunks, sha)) => {
            let info = ObjectInfo {
                name: name.to_owned(),
                description: None,
                metadata: Default::default(),
                headers: None,
                options: Some(ObjectOptions { link: None, max_chunk_size: Some(chunk_size) }),
                bucket: bucket.to_owned(),
                nuid: nuid.clone(),
                size,
                chunks,
                modified: Some(async_nats::datetime::now()),
                digest: Some(format!("SHA-256={}", URL_SAFE.encode(sha))),
                deleted: false,
            };
            publish_info(js, bucket, &info).await.map(|()| info)
        }
        Err(e) => Err(e),
    };
    if finished.is_err() {
        purge_subject(js, bucket, &chunks_subject).await;
    }
    finished
}

/// Publishes `reader` in chunks of `chunk_size` on `subject`, up to [`IN_FLIGHT`] awaiting
/// their acknowledgement: (bytes, chunks, SHA-256) once every chunk is acknowledged.
async fn write_chunks(
    js: &async_nats::jetstream::Context,
    subject: &str,
    chunk_size: usize,
    reader: &mut BlobReader,
) -> Result<(usize, usize, [u8; 32]), BlobError> {
    // Each chunk is hashed on a blocking thread while the next is read and published.
    let mut sha = Some(Sha256::new());
    let mut hashing: Option<tokio::task::JoinHandle<Sha256>> = None;
    let mut acks: VecDeque<PublishAckFuture> = VecDeque::with_capacity(IN_FLIGHT);
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
    for ack in acks {
        ack.await.map_err(|e| backend(format!("chunk not acknowledged: {e}")))?;
    }
    let sha = match hashing {
        Some(h) => h.await.map_err(backend)?,
        None => sha.unwrap_or_default(),
    };
    Ok((size, chunks, sha.finalize().into()))
}

/// Publishes an object's info, replacing the info before it (`Nats-Rollup: sub`).
async fn publish_info(js: &async_nats::jetstream::Context, bucket: &str, info: &ObjectInfo) -> Result<(), BlobError> {
    let subject = format!("$O.{bucket}.M.{}", URL_SAFE.encode(&info.name));
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    let body = serde_json::to_vec(info).map_err(backend)?;
    js.publish_with_headers(subject, headers, body.into())
        .await
        .map_err(|e| backend(format!("publishing the object's info: {e}")))?
        .await
        .map_err(|e| backend(format!("the object's info not acknowledged: {e}")))?;
    Ok(())
}

/// Removes the messages on `subject` from the bucket's stream, logging a failure.
async fn purge_subject(js: &async_nats::jetstream::Context, bucket: &str, subject: &str) {
    let purged = async {
        let stream = js.get_stream(format!("OBJ_{bucket}")).await.map_err(backend)?;
        stream.purge().filter(subject).await.map_err(backend)
    }
    .await;
    if let Err(e) = purged {
        tracing::warn!(subject, error = %e, "the chunks of a failed put stay in the Object Store");
    }
}

/// The chunks of the object `info` in order, ending after `info.chunks` of them, read
/// through an ephemeral pull consumer on its chunk subject in batches of at most
/// [`READ_AHEAD`] bytes, so a reader holds about that much however slowly it reads. (The
/// library's `ObjectStore::get` reads through a push consumer, whose messages pile up in the
/// client when the reader is slower than the server: over 80 MiB for a 1 GiB object written
/// to disk.) The object's `SHA-256=` digest is not computed: callers check the bytes
/// against the name they asked for (a BLAKE3 digest), which a stored SHA-256 cannot vouch
/// for anyway.
///
/// # Errors
/// [`BlobError::Backend`] when the consumer cannot be made; the stream's items when a
/// message fails or the chunks are not `info.size` bytes in all.
pub async fn chunks(
    js: &async_nats::jetstream::Context,
    info: &ObjectInfo,
) -> Result<futures::stream::BoxStream<'static, Result<Bytes, BlobError>>, BlobError> {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
    use futures::StreamExt;
    if info.chunks == 0 {
        return Ok(futures::stream::empty().boxed());
    }
    let stream = js.get_stream(format!("OBJ_{}", info.bucket)).await.map_err(backend)?;
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: format!("$O.{}.C.{}", info.bucket, info.nuid),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            inactive_threshold: std::time::Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .map_err(backend)?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(READ_AHEAD_CHUNKS)
        .max_bytes_per_batch(READ_AHEAD)
        .messages()
        .await
        .map_err(backend)?;
    let (expected, total) = (info.size, info.chunks);
    let mut seen = 0usize;
    let mut count = 0usize;
    Ok(messages
        .take(total)
        .map(move |m| {
            let m = m.map_err(|e| backend(format!("reading a chunk: {e}")))?;
            seen += m.payload.len();
            count += 1;
            if seen > expected || (count == total && seen != expected) {
                return Err(backend(format!("the object's chunks hold {seen} bytes, its info says {expected}")));
            }
            Ok(m.payload.clone())
        })
        .boxed())
}
