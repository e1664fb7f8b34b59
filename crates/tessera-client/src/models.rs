//! Model transfers that never hold a model in memory: uploads stream from a file (hashed in
//! a first pass, since an upload declares its digest), downloads stream into a temporary
//! file beside the destination, are verified against their digest, and only then take the
//! destination's name.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tessera_core::registry::ModelRecord;
use tessera_core::wire::Lineage;
use tessera_core::{Digest, DigestWriter};
use tokio::io::AsyncReadExt;

use crate::{ClientError, HubClient, seg};

/// Read size for streaming files: 1 MiB.
const CHUNK: usize = 1 << 20;

/// Files from this size on are pushed as resumable uploads: 64 MiB.
pub const RESUMABLE_FROM: u64 = 64 << 20;

/// The size of one piece of a resumable upload: 64 MiB (streamed from the file, so not
/// what the client holds; what a broken connection costs at most).
pub const PIECE: u64 = 64 << 20;

/// Consecutive failed pieces a resumable upload retries (asking the hub's offset after each)
/// before it gives up; running the push again resumes it from there.
const PIECE_RETRIES: u32 = 8;

/// A resumable upload's state, as the hub reports it.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct UploadState {
    /// Its id (`None`: the hub already serves these bytes).
    pub id: Option<String>,
    /// Bytes the hub has.
    pub offset: u64,
    /// The object's size.
    pub size: u64,
    /// Every byte is there.
    pub complete: bool,
}

/// What a model upload sends: a file or bytes in memory.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// A file, streamed.
    File(PathBuf),
    /// Bytes in memory.
    Bytes(Bytes),
}

/// Metadata and lineage sent with a model binary, stored with it in one transaction.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct UploadMeta {
    /// A JSON object.
    pub metadata: Value,
    /// Where the model came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
    /// Its card: a `README.md` with YAML front matter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub card: Option<String>,
}

fn io_err(path: &Path, e: std::io::Error) -> ClientError {
    ClientError::Local(format!("{}: {e}", path.display()))
}

/// The digest and size of a file: read on one thread, hashed on every core.
async fn hash_file(path: &Path) -> Result<(Digest, u64), ClientError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut h = DigestWriter::new();
        h.update_file(&path).map_err(|e| io_err(&path, e))?;
        Ok((h.finish(), h.len()))
    })
    .await
    .map_err(|e| ClientError::Local(e.to_string()))?
}

/// The digest of `len` bytes of a file from `offset` (a piece signed over its bytes).
async fn hash_range(path: &Path, offset: u64, len: u64) -> Result<Digest, ClientError> {
    use tokio::io::AsyncSeekExt;
    let mut f = tokio::fs::File::open(path).await.map_err(|e| io_err(path, e))?;
    f.seek(std::io::SeekFrom::Start(offset)).await.map_err(|e| io_err(path, e))?;
    let mut f = f.take(len);
    let mut h = DigestWriter::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).await.map_err(|e| io_err(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

/// Chunks a piece's body is read in: 256 KiB, small enough to stay in a core's cache
/// between the read that fills one and the send that empties it.
const SEND_CHUNK: u64 = 256 << 10;

/// Chunks read ahead of the body's sending.
const SEND_AHEAD: usize = 4;

/// Why reading a piece's file failed, kept for the caller: the body's stream hands the
/// error to the HTTP client, which reports it as a failed request.
type ReadFailure = std::sync::Arc<std::sync::Mutex<Option<String>>>;

/// `len` bytes of the file at `path` from `offset`, in chunks of [`SEND_CHUNK`] bytes read
/// on a blocking thread straight into each chunk (one copy out of the page cache; Tokio's
/// file reads copy twice), at most [`SEND_AHEAD`] chunks queued ahead of the consumer and
/// one being read. A file that ends before `offset + len` ends the stream with
/// `UnexpectedEof`; any failure is also written to `failed` (naming the file). A consumer
/// that drops the stream stops the reading after the chunk being read.
fn file_chunks(
    path: PathBuf,
    offset: u64,
    len: u64,
    failed: ReadFailure,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> {
    let (tx, rx) = tokio::sync::mpsc::channel(SEND_AHEAD);
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek};
        let read = |f: &mut std::fs::File, n: u64| -> std::io::Result<Bytes> {
            let mut buf = Vec::with_capacity(n as usize);
            f.by_ref().take(n).read_to_end(&mut buf)?;
            if (buf.len() as u64) < n {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file ended while it was being sent",
                ));
            }
            Ok(Bytes::from(buf))
        };
        let fail = |e: std::io::Error| {
            if let Ok(mut f) = failed.lock() {
                *f = Some(format!("{}: {e}", path.display()));
            }
            e
        };
        let mut f =
            match std::fs::File::open(&path).and_then(|mut f| f.seek(std::io::SeekFrom::Start(offset)).map(|_| f)) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.blocking_send(Err(fail(e)));
                    return;
                }
            };
        let mut left = len;
        while left > 0 {
            let n = left.min(SEND_CHUNK);
            let chunk = read(&mut f, n).map_err(fail);
            let stop = chunk.is_err();
            if tx.blocking_send(chunk).is_err() || stop {
                return;
            }
            left -= n;
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}

/// `sent`, unless it failed because its file did: then the file's failure, as the
/// caller's own error (retrying would read the file again), in the outer `Err`.
fn read_failure_first<T>(
    sent: Result<T, ClientError>,
    failed: &ReadFailure,
) -> Result<Result<T, ClientError>, ClientError> {
    match (&sent, failed.lock().ok().and_then(|mut f| f.take())) {
        (Err(_), Some(e)) => Err(ClientError::Local(e)),
        _ => Ok(sent),
    }
}

async fn file_len(path: &Path) -> Result<u64, ClientError> {
    Ok(tokio::fs::metadata(path).await.map_err(|e| io_err(path, e))?.len())
}

/// A multipart boundary that no part contains (random, checked against the metadata).
fn boundary(meta: &str) -> String {
    let seed = format!("{:?}{}{}", std::time::SystemTime::now(), std::process::id(), Digest::of(meta.as_bytes()));
    format!("tessera-{}", &Digest::of(seed.as_bytes()).hex()[..40])
}

impl HubClient {
    /// Uploads a model binary as `name@version` (with its metadata in the same request when
    /// given), streaming a file. Returns the record and whether the binary was new.
    pub async fn push_model_from(
        &self,
        name: &str,
        version: &str,
        source: ModelSource,
        meta: Option<&UploadMeta>,
    ) -> Result<(ModelRecord, bool), ClientError> {
        let url = self.url(&format!("/models/{}/{}", seg(name), seg(version)));
        let (status, rec) = match &source {
            ModelSource::File(p) if file_len(p).await? >= RESUMABLE_FROM => {
                self.push_resumable("PUT", &url, p, meta, PIECE, &|_, _| {}).await?
            }
            _ => self.upload_model("PUT", &url, source, meta).await?,
        };
        Ok((rec, status == 201))
    }

    /// Uploads a model file as `name@version` in pieces of `piece` bytes through a
    /// resumable upload: the file is hashed, the hub asked for the upload of those bytes
    /// (the same one again when an earlier push of them was interrupted, so this push
    /// continues where that one stopped; none at all when the hub already serves them),
    /// the missing pieces sent from the hub's offset (after a failed piece, the offset is
    /// asked again), and the finished upload named with the metadata. `progress` gets the
    /// bytes the hub has and the total after each piece. Returns the record and whether
    /// the binary was new.
    pub async fn push_model_resumable(
        &self,
        name: &str,
        version: &str,
        file: &Path,
        meta: Option<&UploadMeta>,
        piece: u64,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(ModelRecord, bool), ClientError> {
        let url = self.url(&format!("/models/{}/{}", seg(name), seg(version)));
        let (status, rec) = self.push_resumable("PUT", &url, file, meta, piece.max(1), progress).await?;
        Ok((rec, status == 201))
    }

    /// Begins (or finds again) the hub's upload of bytes with `digest` and `size`.
    pub async fn begin_upload(&self, digest: &Digest, size: u64) -> Result<UploadState, ClientError> {
        let url = self.url("/uploads");
        let body = serde_json::to_vec(&serde_json::json!({"digest": digest.to_string(), "size": size}))
            .map_err(|e| ClientError::Local(e.to_string()))?;
        let req = self.json_request("POST", &url, body).await?;
        Ok(self.json(req, &url).await?.1)
    }

    /// An upload's state.
    pub async fn upload_state(&self, id: &str) -> Result<UploadState, ClientError> {
        let url = self.url(&format!("/uploads/{}", seg(id)));
        let req = self.sign(self.http.get(&url), "GET", &url, b"").await?;
        Ok(self.json(req, &url).await?.1)
    }

    async fn push_resumable(
        &self,
        method: &str,
        url: &str,
        file: &Path,
        meta: Option<&UploadMeta>,
        piece: u64,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(u16, ModelRecord), ClientError> {
        let (digest, size) = hash_file(file).await?;
        let mut state = self.begin_upload(&digest, size).await?;
        let named = match &state.id {
            None => digest.to_string(),
            Some(id) => id.clone(),
        };
        if let Some(id) = state.id.clone() {
            let mut failures = 0;
            // Pieces are signed over their statements; a hub that refuses that (one from
            // before statements) gets them signed over their bytes.
            let mut by_statement = true;
            let piece_url = self.url(&format!("/uploads/{}", seg(&id)));
            while !state.complete {
                progress(state.offset, size);
                // Pieces end at multiples of the piece size, streamed 1 MiB at a time; each is
                // signed over its statement (upload, offset, length), its bytes being proven
                // by the upload's digest.
                let left = size.checked_sub(state.offset).filter(|_| state.size == size).ok_or_else(|| {
                    ClientError::Local(format!(
                        "the hub reports upload {id} at byte {} of {}, but the file has {size} bytes",
                        state.offset, state.size
                    ))
                })?;
                let n = (piece - state.offset % piece).min(left);
                let piece_digest = if by_statement {
                    tessera_core::registry::upload_piece_statement(&id, state.offset, n)
                } else {
                    hash_range(file, state.offset, n).await?
                };
                let failed = ReadFailure::default();
                let body = reqwest::Body::wrap_stream(file_chunks(file.to_owned(), state.offset, n, failed.clone()));
                let req = self
                    .http
                    .patch(&piece_url)
                    .header("upload-offset", state.offset)
                    .header("content-length", n)
                    .header("content-type", "application/offset+octet-stream");
                let req = self.sign_digest(req, "PATCH", &piece_url, piece_digest).await?.body(body);
                match read_failure_first(self.json::<UploadState>(req, &piece_url).await, &failed)? {
                    Ok((_, s)) => {
                        state = s;
                        failures = 0;
                    }
                    Err(ClientError::Status { status: 401, .. }) if by_statement => {
                        tracing::info!("upload {id}: the hub wants pieces signed over their bytes");
                        by_statement = false;
                        state = self.upload_state(&id).await?;
                    }
                    Err(e)
                        if e.is_busy()
                            || matches!(
                                e,
                                ClientError::Transport { .. } | ClientError::Status { status: 409 | 500..=599, .. }
                            ) =>
                    {
                        failures += 1;
                        if failures > PIECE_RETRIES {
                            return Err(e);
                        }
                        tracing::warn!("upload {id}: a piece failed ({e}); asking where the hub stands");
                        tokio::time::sleep(std::time::Duration::from_millis(200 << failures.min(5))).await;
                        state = self.upload_state(&id).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        // Nothing was sent when the hub had the bytes already (no upload id): no progress.
        if state.id.is_some() {
            progress(size, size);
        }
        let body = match meta {
            Some(m) => serde_json::to_vec(m).map_err(|e| ClientError::Local(e.to_string()))?,
            None => Vec::new(),
        };
        // The upload is named in the query, which the signature covers.
        let url = format!("{url}?upload={named}");
        let req = match method {
            "POST" => self.http.post(&url),
            _ => self.http.put(&url),
        }
        .header("content-type", "application/json");
        let req = self.sign(req, method, &url, &body).await?.body(body);
        self.json(req, &url).await
    }

    /// Uploads a model binary as the next version of `name`, which the hub chooses (after
    /// the highest version the model ever had; concurrent uploads get distinct versions).
    pub async fn publish_model(
        &self,
        name: &str,
        source: ModelSource,
        meta: Option<&UploadMeta>,
    ) -> Result<ModelRecord, ClientError> {
        let url = self.url(&format!("/models/{}", seg(name)));
        Ok(match &source {
            ModelSource::File(p) if file_len(p).await? >= RESUMABLE_FROM => {
                self.push_resumable("POST", &url, p, meta, PIECE, &|_, _| {}).await?.1
            }
            _ => self.upload_model("POST", &url, source, meta).await?.1,
        })
    }

    async fn upload_model(
        &self,
        method: &str,
        url: &str,
        source: ModelSource,
        meta: Option<&UploadMeta>,
    ) -> Result<(u16, ModelRecord), ClientError> {
        let (content_digest, content_len) = match &source {
            ModelSource::File(p) => hash_file(p).await?,
            ModelSource::Bytes(b) => (Digest::of(b), b.len() as u64),
        };
        let (prefix, suffix, ctype) = match meta {
            None => (Vec::new(), Vec::new(), "application/octet-stream".to_owned()),
            Some(m) => {
                let json = serde_json::to_string(m).map_err(|e| ClientError::Local(e.to_string()))?;
                let b = boundary(&json);
                let prefix = format!(
                    "--{b}\r\nContent-Disposition: form-data; name=\"meta\"\r\nContent-Type: application/json\r\n\r\n{json}\r\n--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                );
                (
                    prefix.into_bytes(),
                    format!("\r\n--{b}--\r\n").into_bytes(),
                    format!("multipart/form-data; boundary={b}"),
                )
            }
        };
        let body_digest = if meta.is_none() {
            content_digest
        } else {
            // The whole body, as the hub will hash it: prefix, content, suffix.
            let mut h = DigestWriter::new();
            h.update(&prefix);
            match &source {
                ModelSource::Bytes(b) => h.update(b),
                ModelSource::File(p) => {
                    let mut f = tokio::fs::File::open(p).await.map_err(|e| io_err(p, e))?;
                    let mut buf = vec![0u8; CHUNK];
                    loop {
                        let n = f.read(&mut buf).await.map_err(|e| io_err(p, e))?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                    }
                }
            }
            h.update(&suffix);
            h.finish()
        };
        let total = prefix.len() as u64 + content_len + suffix.len() as u64;
        // The hub takes a few uploads per account at once and answers the next `busy`:
        // wait and send again (a fresh signature each time).
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(300);
        let mut pause = std::time::Duration::from_millis(200);
        let failed = ReadFailure::default();
        loop {
            let content: futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>> = match &source {
                ModelSource::Bytes(b) => {
                    let b = b.clone();
                    futures::stream::once(async move { Ok(b) }).boxed()
                }
                ModelSource::File(p) => file_chunks(p.clone(), 0, content_len, failed.clone()).boxed(),
            };
            let (pre, post) = (Bytes::from(prefix.clone()), Bytes::from(suffix.clone()));
            let stream = futures::stream::once(async move { Ok(pre) })
                .chain(content)
                .chain(futures::stream::once(async move { Ok(post) }));
            let req = match method {
                "POST" => self.http.post(url),
                _ => self.http.put(url),
            }
            .header("content-type", ctype.as_str())
            .header("content-length", total)
            .header("x-tessera-digest", content_digest.to_string());
            let req = self.sign_digest(req, method, url, body_digest).await?.body(reqwest::Body::wrap_stream(stream));
            match read_failure_first(self.json(req, url).await, &failed)? {
                Err(e) if e.is_busy() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// Downloads a model's binary (`version` may be `latest`) into `dest`, streaming: the
    /// bytes go to a temporary file beside it, are checked against the record's digest, and
    /// replace `dest` only when they match. Returns the record.
    pub async fn pull_model_to(&self, name: &str, version: &str, dest: &Path) -> Result<ModelRecord, ClientError> {
        let record = self.model(name, version).await?;
        self.pull_model_record(record, dest).await
    }

    /// Downloads the binary a model record names (a record the caller has checked) into
    /// `dest`, as [`HubClient::pull_model_to`] does. The bytes go to
    /// `<dest>.<digest>.part` first: a pull interrupted midway leaves it, and the next pull
    /// of the same bytes asks only for the rest (an HTTP range request); the whole file is
    /// checked against the digest before it takes `dest`'s name.
    pub async fn pull_model_record(&self, record: ModelRecord, dest: &Path) -> Result<ModelRecord, ClientError> {
        let digest = record.digest.ok_or_else(|| ClientError::Status {
            status: 404,
            message: format!("model {}@{} has no binary yet", record.name, record.version),
        })?;
        let url = self.url(&format!("/models/{}/{}", seg(&record.name), seg(&record.version)));
        let file_name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let part = dest.with_file_name(format!(".{file_name}.{}.part", &digest.hex()[..16]));
        let mut h = DigestWriter::new();
        let have = match tokio::fs::File::open(&part).await {
            Ok(mut f) => {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = f.read(&mut buf).await.map_err(|e| io_err(&part, e))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                h.len()
            }
            Err(_) => 0,
        };
        let mut req = self.http.get(&url);
        if have > 0 {
            req = req.header("range", format!("bytes={have}-"));
        }
        let req = self.sign(req, "GET", &url, b"").await?;
        let resp = match self.send(req, &url).await {
            // The part is the whole file already (or more): check it as it is.
            Err(ClientError::Status { status: 416, .. }) if have > 0 => None,
            other => Some(other?),
        };
        // The hub sent the whole file although part of it is here: start the part again.
        let restart = have > 0 && resp.as_ref().is_some_and(|r| r.status().as_u16() != 206);
        let mut file = {
            let at = part.clone();
            tokio::task::spawn_blocking(move || {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(&at)?;
                if restart {
                    f.set_len(0)?;
                }
                Ok::<_, std::io::Error>(f)
            })
            .await
            .map_err(|e| ClientError::Local(e.to_string()))?
            .map_err(|e| io_err(&part, e))?
        };
        if restart {
            h = DigestWriter::new();
        }
        if let Some(resp) = resp {
            // Received here, hashed and written on a thread of its own.
            let mut sink = tessera_ports::sink::FileSink::start(file, vec![h]).map_err(|e| io_err(&part, e))?;
            let mut stream = resp.bytes_stream();
            let streamed = async {
                while let Some(chunk) = stream.next().await {
                    let chunk =
                        chunk.map_err(|e| ClientError::Transport { url: url.clone(), message: e.to_string() })?;
                    sink.write(chunk).await.map_err(|e| io_err(&part, e))?;
                }
                Ok::<_, ClientError>(())
            }
            .await;
            let written = sink.finish().await;
            streamed?;
            let mut w = written.map_err(|e| io_err(&part, e))?;
            h = w.hashers.pop().unwrap_or_default();
            file = w.file;
        }
        tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .map_err(|e| ClientError::Local(e.to_string()))?
            .map_err(|e| io_err(&part, e))?;
        let actual = h.finish();
        if actual != digest {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(ClientError::Verify { url, expected: digest, actual });
        }
        tokio::fs::rename(&part, dest).await.map_err(|e| io_err(dest, e))?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(path: &Path, offset: u64, len: u64) -> (Vec<u8>, Vec<usize>, Option<std::io::Error>) {
        let failed = ReadFailure::default();
        let mut stream = std::pin::pin!(file_chunks(path.to_owned(), offset, len, failed.clone()));
        let (mut bytes, mut sizes) = (Vec::new(), Vec::new());
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => {
                    sizes.push(c.len());
                    bytes.extend_from_slice(&c);
                }
                Err(e) => {
                    let said = failed.lock().unwrap().take().expect("the failure is kept for the caller");
                    assert!(said.starts_with(&path.display().to_string()), "{said} names the file");
                    return (bytes, sizes, Some(e));
                }
            }
        }
        (bytes, sizes, None)
    }

    #[tokio::test]
    async fn a_piece_is_read_from_its_offset_in_chunks_and_a_short_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.bin");
        let data: Vec<u8> = (0..(3 * SEND_CHUNK + 1234)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();

        let (bytes, sizes, err) = collect(&path, 1000, 2 * SEND_CHUNK + 5).await;
        assert!(err.is_none());
        assert_eq!(bytes[..], data[1000..1000 + 2 * SEND_CHUNK as usize + 5]);
        assert_eq!(sizes, [SEND_CHUNK as usize, SEND_CHUNK as usize, 5]);
        assert!(collect(&path, 7, 0).await.0.is_empty());

        // Past the file's end: the bytes there are, then the error.
        let (bytes, _, err) = collect(&path, 2 * SEND_CHUNK, 2 * SEND_CHUNK).await;
        assert_eq!(bytes[..], data[2 * SEND_CHUNK as usize..3 * SEND_CHUNK as usize]);
        assert_eq!(err.map(|e| e.kind()), Some(std::io::ErrorKind::UnexpectedEof));

        let (bytes, _, err) = collect(&dir.path().join("missing"), 0, 10).await;
        assert!(bytes.is_empty());
        assert_eq!(err.map(|e| e.kind()), Some(std::io::ErrorKind::NotFound));
    }
}
