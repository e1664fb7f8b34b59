//! Model transfers that never hold a model in memory: uploads stream from a file (hashed in
//! a first pass, since the signature covers the body's digest), downloads stream into a
//! temporary file beside the destination, are verified against their digest, and only then
//! take the destination's name.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tessera_core::registry::ModelRecord;
use tessera_core::wire::Lineage;
use tessera_core::{Digest, DigestWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{ClientError, HubClient, seg};

/// Read size for streaming files: 1 MiB.
const CHUNK: usize = 1 << 20;

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
}

fn io_err(path: &Path, e: std::io::Error) -> ClientError {
    ClientError::Local(format!("{}: {e}", path.display()))
}

/// The digest and size of a file, read in chunks.
async fn hash_file(path: &Path) -> Result<(Digest, u64), ClientError> {
    let mut f = tokio::fs::File::open(path).await.map_err(|e| io_err(path, e))?;
    let mut h = DigestWriter::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).await.map_err(|e| io_err(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok((h.finish(), h.len()))
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
        let (status, rec) = self.upload_model("PUT", &url, source, meta).await?;
        Ok((rec, status == 201))
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
        Ok(self.upload_model("POST", &url, source, meta).await?.1)
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
        loop {
            let content: futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>> = match &source {
                ModelSource::Bytes(b) => {
                    let b = b.clone();
                    futures::stream::once(async move { Ok(b) }).boxed()
                }
                ModelSource::File(p) => {
                    let f = tokio::fs::File::open(p).await.map_err(|e| io_err(p, e))?;
                    tokio_util::io::ReaderStream::with_capacity(f, CHUNK).boxed()
                }
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
            match self.json(req, url).await {
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
    /// `dest`, as [`HubClient::pull_model_to`] does.
    pub async fn pull_model_record(&self, record: ModelRecord, dest: &Path) -> Result<ModelRecord, ClientError> {
        let digest = record.digest.ok_or_else(|| ClientError::Status {
            status: 404,
            message: format!("model {}@{} has no binary yet", record.name, record.version),
        })?;
        let url = self.url(&format!("/models/{}/{}", seg(&record.name), seg(&record.version)));
        let req = self.sign(self.http.get(&url), "GET", &url, b"").await?;
        let resp = self.send(req, &url).await?;
        let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".tessera-download-")
            .tempfile_in(dir)
            .map_err(|e| io_err(dir, e))?
            .into_temp_path();
        let mut file = tokio::fs::File::create(&tmp).await.map_err(|e| io_err(&tmp, e))?;
        let mut h = DigestWriter::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ClientError::Transport { url: url.clone(), message: e.to_string() })?;
            h.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| io_err(&tmp, e))?;
        }
        file.flush().await.map_err(|e| io_err(&tmp, e))?;
        file.sync_all().await.map_err(|e| io_err(&tmp, e))?;
        drop(file);
        let actual = h.finish();
        if actual != digest {
            return Err(ClientError::Verify { url, expected: digest, actual });
        }
        tmp.persist(dest).map_err(|e| io_err(dest, e.error))?;
        Ok(record)
    }
}
