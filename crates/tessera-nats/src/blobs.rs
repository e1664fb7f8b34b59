//! Blobs in JetStream: small ones (up to [`SMALL_BLOB`]) in a KV bucket, one message each,
//! the rest in an Object Store, in chunks of up to 1 MiB written and read by
//! [`crate::objects`].

use async_nats::jetstream::object_store::{self, ObjectStore};
use async_nats::jetstream::stream::StorageType;
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use std::path::Path;
use std::time::Duration;
use tessera_core::Digest;
use tessera_core::DigestWriter;
use tessera_ports::sink::{FileSink, Written};
use tessera_ports::{BlobError, BlobReader, BlobStore, Verified};

use tokio::io::AsyncReadExt;

use crate::{Nats, NatsError};

const BUCKET: &str = "tessera_blobs";
const SMALL_BUCKET: &str = "tessera_small_blobs";

/// The largest blob kept as one KV entry rather than in the Object Store. An Object Store
/// put costs three round trips to the server (an existence check, the chunk, the
/// metadata) and a get three more (the metadata, a consumer, the chunk); a KV entry is one
/// publish and one direct get. Tasks' small outputs (metrics, a small model, a no-op's
/// answer) are the common case.
pub const SMALL_BLOB: usize = 64 << 10;

/// Blobs named by their digest's hex: up to [`SMALL_BLOB`] bytes in the KV bucket
/// `tessera_small_blobs`, larger ones in the Object Store `tessera_blobs`; verified on read.
pub struct NatsBlobs {
    store: ObjectStore,
    small: async_nats::jetstream::kv::Store,
    js: async_nats::jetstream::Context,
    /// The Object Store's name.
    bucket: String,
    /// The streams behind the two buckets (for [`BlobStore::stored_bytes`]).
    streams: [String; 2],
}

fn backend(e: impl std::fmt::Display) -> BlobError {
    BlobError::Backend(e.to_string())
}

impl NatsBlobs {
    /// Opens (creating if needed) the run blobs' buckets.
    pub async fn open(nats: &Nats) -> Result<Self, NatsError> {
        Self::open_buckets(nats, BUCKET, SMALL_BUCKET).await
    }

    /// Opens (creating if needed) the Object Store `bucket` and the KV bucket `small` for
    /// blobs of up to [`SMALL_BLOB`] bytes. A hub's buckets are its own, apart from runs'
    /// blobs, so that removing a run's leftovers never touches what a hub serves, even
    /// when the bytes are the same.
    pub async fn open_buckets(nats: &Nats, bucket: &str, small: &str) -> Result<Self, NatsError> {
        let store = match nats.js.get_object_store(bucket).await {
            Ok(s) => s,
            Err(_) => nats
                .js
                .create_object_store(object_store::Config {
                    bucket: bucket.into(),
                    storage: StorageType::File,
                    num_replicas: nats.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| NatsError::Setup { what: format!("object store {bucket}"), message: e.to_string() })?,
        };
        let small_store = crate::kv_bucket(nats, small, None).await?;
        Ok(NatsBlobs {
            store,
            small: small_store,
            js: nats.js.clone(),
            bucket: bucket.to_owned(),
            streams: [format!("OBJ_{bucket}"), format!("KV_{small}")],
        })
    }

    /// Every blob stored, by digest (the hub's audit of its store).
    ///
    /// # Errors
    /// [`BlobError::Backend`] when listing fails.
    pub async fn digests(&self) -> Result<Vec<Digest>, BlobError> {
        use futures::StreamExt;
        let mut out = Vec::new();
        let mut objects = self.store.list().await.map_err(backend)?;
        while let Some(info) = objects.next().await {
            let info = info.map_err(backend)?;
            if !info.deleted
                && let Ok(d) = Digest::from_hex(&info.name)
            {
                out.push(d);
            }
        }
        for e in crate::list_entries(&self.small, "").await.map_err(backend)? {
            if let Ok(d) = Digest::from_hex(&e.key) {
                out.push(d);
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// The outcome of [`NatsBlobs::claim`].
#[derive(Debug, PartialEq, Eq)]
enum Claim {
    /// The object is stored already.
    Stored,
    /// This writer holds the claim: it writes, then releases the claim.
    Ours,
    /// Another writer held the claim for [`CLAIM_WAIT`] without storing the object (it is
    /// slow or gone): this one writes without a claim.
    Unclaimed,
}

/// How long a writer waits for another writer of the same object.
const CLAIM_WAIT: Duration = Duration::from_secs(30);

/// The KV key in the small-blob bucket that claims the writing of an object.
fn claim_key(digest: &Digest) -> String {
    format!("writing.{}", digest.hex())
}

impl NatsBlobs {
    /// Claims the writing of the object `digest`. An Object Store put writes its chunks under
    /// a fresh name and only then points the object's info at them: two writers of the same
    /// object at once (two participants' identical updates, in one process or two) would each
    /// write every chunk, one for nothing. Writers of an object take turns instead: the first
    /// creates a KV entry (a compare-and-set, so exactly one succeeds); the others wait until
    /// the object is stored, bounded by [`CLAIM_WAIT`]. (A writer that outwaits the bound and
    /// finds the object stored when it is done keeps the stored one and purges its own
    /// chunks: see [`crate::objects::put`].)
    async fn claim(&self, digest: &Digest) -> Result<Claim, BlobError> {
        let key = claim_key(digest);
        let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
        let mut pause = Duration::from_millis(5);
        loop {
            if self.store_contains(digest).await? {
                return Ok(Claim::Stored);
            }
            match self.small.create(&key, Bytes::new()).await {
                // The writer before may have finished between the look and the claim.
                Ok(_) if self.store_contains(digest).await? => {
                    let _ = self.small.purge(&key).await;
                    return Ok(Claim::Stored);
                }
                Ok(_) => return Ok(Claim::Ours),
                Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(backend(e)),
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(blob = %digest, "another writer of this blob has not finished; writing it anyway");
                return Ok(Claim::Unclaimed);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// The Object Store as [`crate::objects`] reads and writes it.
    fn objects(&self) -> crate::objects::Bucket<'_> {
        crate::objects::Bucket { js: &self.js, store: &self.store, name: &self.bucket }
    }

    /// The live KV entry of a small blob.
    async fn small_entry(&self, digest: &Digest) -> Result<Option<Bytes>, BlobError> {
        match self.small.entry(digest.hex()).await.map_err(backend)? {
            Some(e) if e.operation == async_nats::jetstream::kv::Operation::Put => Ok(Some(e.value)),
            _ => Ok(None),
        }
    }

    /// A small blob, checked against its digest.
    async fn small_get(&self, digest: &Digest) -> Result<Option<Bytes>, BlobError> {
        match self.small_entry(digest).await? {
            Some(bytes) if &Digest::of(&bytes) == digest => Ok(Some(bytes)),
            Some(_) => Err(BlobError::Corrupt(*digest)),
            None => Ok(None),
        }
    }

    /// The chunks of the object `digest`, if stored (see [`crate::objects::chunks`]).
    async fn object_chunks(
        &self,
        digest: &Digest,
    ) -> Result<Option<futures::stream::BoxStream<'static, Result<Bytes, BlobError>>>, BlobError> {
        let Some(info) = self.object_info(digest).await? else { return Ok(None) };
        Ok(Some(crate::objects::chunks(&self.objects(), &info).await?))
    }

    /// The info of the live object `digest`.
    async fn object_info(&self, digest: &Digest) -> Result<Option<object_store::ObjectInfo>, BlobError> {
        match self.store.info(digest.hex()).await {
            Ok(info) if !info.deleted => Ok(Some(info)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend(e)),
        }
    }

    async fn store_contains(&self, digest: &Digest) -> Result<bool, BlobError> {
        match self.store.info(digest.hex()).await {
            Ok(info) => Ok(!info.deleted),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(false),
            Err(e) => Err(backend(e)),
        }
    }
}

#[async_trait]
impl BlobStore for NatsBlobs {
    async fn put(&self, bytes: Bytes) -> Result<Digest, BlobError> {
        let digest = Digest::of(&bytes);
        if bytes.len() <= SMALL_BLOB {
            // Idempotent: the key is the content's digest, and the bucket keeps one value.
            self.small.put(digest.hex(), bytes).await.map_err(backend)?;
            return Ok(digest);
        }
        let claimed = self.claim(&digest).await?;
        if claimed == Claim::Stored {
            return Ok(digest);
        }
        let mut reader: BlobReader = Box::pin(std::io::Cursor::new(bytes));
        let put = crate::objects::put(&self.objects(), &digest.hex(), &mut reader).await.map(|_| ());
        // Best effort: a claim left behind only makes the next writer wait for it. A writer
        // that waited in vain removes the stale claim too.
        let _ = self.small.purge(claim_key(&digest)).await;
        put?;
        Ok(digest)
    }

    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, BlobError> {
        if let Some(bytes) = self.small_get(digest).await? {
            return Ok(Some(bytes));
        }
        let Some(info) = self.object_info(digest).await? else { return Ok(None) };
        // Sized once: a buffer grown by doubling would hold up to twice the blob while it
        // is copied. (A size past 4 GiB, which no blob here has, is not trusted up front.)
        let mut buf = Vec::with_capacity(info.size.min(4 << 30));
        let mut chunks = crate::objects::chunks(&self.objects(), &info).await?;
        while let Some(chunk) = chunks.next().await {
            buf.extend_from_slice(&chunk?);
        }
        if &Digest::of(&buf) != digest {
            return Err(BlobError::Corrupt(*digest));
        }
        Ok(Some(Bytes::from(buf)))
    }

    async fn contains(&self, digest: &Digest) -> Result<bool, BlobError> {
        Ok(self.small_entry(digest).await?.is_some() || self.store_contains(digest).await?)
    }

    async fn reader(&self, digest: &Digest) -> Result<Option<BlobReader>, BlobError> {
        if let Some(bytes) = self.small_get(digest).await? {
            return Ok(Some(Box::pin(std::io::Cursor::new(bytes))));
        }
        let Some(chunks) = self.object_chunks(digest).await? else { return Ok(None) };
        let read = tokio_util::io::StreamReader::new(chunks.map(|c| c.map_err(std::io::Error::other)));
        Ok(Some(Box::pin(Verified::new(read, *digest))))
    }

    async fn delete(&self, digest: &Digest) -> Result<bool, BlobError> {
        if self.small_entry(digest).await?.is_some() {
            self.small.purge(digest.hex()).await.map_err(backend)?;
            return Ok(true);
        }
        if !self.store_contains(digest).await? {
            return Ok(false);
        }
        self.store.delete(digest.hex()).await.map_err(backend)?;
        Ok(true)
    }

    async fn put_file(&self, path: &Path, digest: &Digest) -> Result<(), BlobError> {
        let io = |source| BlobError::Io { path: path.to_owned(), source };
        let file = tokio::fs::File::open(path).await.map_err(io)?;
        let size = file.metadata().await.map_err(io)?.len();
        self.put_stream(digest, size, Box::pin(file)).await
    }

    async fn put_stream(&self, digest: &Digest, size: u64, mut reader: BlobReader) -> Result<(), BlobError> {
        if size <= SMALL_BLOB as u64 {
            let mut bytes = Vec::with_capacity(SMALL_BLOB);
            reader.read_to_end(&mut bytes).await.map_err(backend)?;
            if &self.put(Bytes::from(bytes)).await? != digest {
                return Err(BlobError::Corrupt(*digest));
            }
            return Ok(());
        }
        let claimed = self.claim(digest).await?;
        if claimed == Claim::Stored {
            return Ok(());
        }
        // Streamed: read a chunk at a time.
        let put = crate::objects::put(&self.objects(), &digest.hex(), &mut reader).await.map(|_| ());
        let _ = self.small.purge(claim_key(digest)).await;
        put.map(|_| ())
    }

    async fn get_file(&self, digest: &Digest, path: &Path) -> Result<bool, BlobError> {
        let io = |source| BlobError::Io { path: path.to_owned(), source };
        if let Some(bytes) = self.small_get(digest).await? {
            tokio::fs::write(path, &bytes).await.map_err(io)?;
            return Ok(true);
        }
        let Some(mut chunks) = self.object_chunks(digest).await? else { return Ok(false) };
        // Received here, hashed and written on a blocking thread meanwhile.
        let out = std::fs::File::create(path).map_err(io)?;
        let copied: Result<(), BlobError> = async {
            let mut sink = FileSink::start(out, vec![DigestWriter::new()]).map_err(io)?;
            while let Some(chunk) = chunks.next().await {
                sink.write(chunk?).await.map_err(io)?;
            }
            let Written { file, mut hashers, .. } = sink.finish().await.map_err(io)?;
            if hashers.pop().map(|h| h.finish()).as_ref() != Some(digest) {
                return Err(BlobError::Corrupt(*digest));
            }
            tokio::task::spawn_blocking(move || file.sync_all()).await.map_err(backend)?.map_err(io)
        }
        .await;
        if let Err(e) = copied {
            let _ = tokio::fs::remove_file(path).await;
            return Err(e);
        }
        Ok(true)
    }

    async fn size(&self, digest: &Digest) -> Result<Option<u64>, BlobError> {
        if let Some(bytes) = self.small_entry(digest).await? {
            return Ok(Some(bytes.len() as u64));
        }
        Ok(self.object_info(digest).await?.map(|i| i.size as u64))
    }

    async fn stored_bytes(&self) -> Result<u64, BlobError> {
        let mut total = 0;
        for stream in &self.streams {
            let mut s = self.js.get_stream(stream).await.map_err(backend)?;
            total += s.info().await.map_err(backend)?.state.bytes;
        }
        Ok(total)
    }
}
