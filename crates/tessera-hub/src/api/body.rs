//! Receiving request bodies: streamed to a temporary file in the blob directory, hashed on
//! the way, refused past their limit (from `content-length` before a byte is read, or as
//! soon as the stream passes it). Model uploads may be `multipart/form-data` with a `meta`
//! part (JSON `{metadata, lineage}`) before the `file` part, so a binary and its metadata
//! are stored in one transaction.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, header};
use futures::{Stream, StreamExt};
use tessera_core::{Digest, DigestWriter};
use tokio::io::AsyncWriteExt;

use axum::http::{Method, Uri};
use tessera_identity::PublicKey;

use super::auth::{HeaderAuth, UploadSlot, check_headers, check_quota, meter_bytes, upload_slot};
use super::models::ModelMeta;
use super::{ApiError, ApiResult, AppState, DIGEST_HEADER};
use crate::store::{HubError, HubStore};

/// The header declaring a private package's manifest (base64url of its JSON; only its
/// public part is kept).
pub const MANIFEST_HEADER: &str = "x-tessera-manifest";

/// The header declaring the `name@version` a published package holds, so the hub can
/// authorize the upload before reading it (checked against the package's own manifest).
pub const PACKAGE_HEADER: &str = "x-tessera-package";

/// Largest `meta` part of a multipart model upload, in bytes.
const MAX_META_PART: u64 = 2 << 20;

/// A body received into a temporary file.
pub(crate) struct Received {
    /// The temporary file (the caller moves it into the store or removes it).
    pub tmp: PathBuf,
    /// The digest of the stored bytes (the file part of a multipart upload).
    pub digest: Digest,
    /// Their size.
    pub size: u64,
    /// The digest of the whole request body (what a signature covers).
    pub body_digest: Digest,
    /// Metadata sent with a model binary.
    pub meta: Option<ModelMeta>,
    /// The resumable upload the bytes came from, ended once they are stored.
    pub upload: Option<String>,
}

/// Refuses a body whose announced length is over `limit`, before reading it.
pub(crate) fn check_length(headers: &HeaderMap, limit: u64) -> ApiResult<()> {
    let announced =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = announced
        && n > limit
    {
        return Err(ApiError(HubError::TooLarge(format!("the upload is {n} bytes, over the limit of {limit} bytes"))));
    }
    Ok(())
}

/// The digest the client announced for the bytes, if any.
pub(crate) fn expected_digest(headers: &HeaderMap) -> ApiResult<Option<Digest>> {
    match headers.get(DIGEST_HEADER) {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().map_err(|_| HubError::BadRequest(format!("{DIGEST_HEADER} is not text")))?;
            s.parse().map(Some).map_err(|e: tessera_core::digest::DigestError| {
                ApiError(HubError::BadRequest(format!("{DIGEST_HEADER}: {e}")))
            })
        }
    }
}

async fn write_stream<S, E>(
    file: &mut tokio::fs::File,
    mut stream: S,
    hasher: &mut DigestWriter,
    limit: u64,
) -> Result<(), HubError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| HubError::BadRequest(format!("upload interrupted: {e}")))?;
        hasher.update(&chunk);
        if hasher.len() > limit {
            return Err(HubError::TooLarge(format!("the upload is over the limit of {limit} bytes")));
        }
        file.write_all(&chunk).await.map_err(HubError::from)?;
    }
    Ok(())
}

/// Streams a plain body into a temporary file in the blob directory, hashing it, and
/// refusing it past `limit` bytes.
pub(crate) async fn receive(store: &HubStore, body: Body, limit: u64) -> ApiResult<Received> {
    let tmp = store.blobs().temp_path();
    let result = async {
        let mut file = tokio::fs::File::create(&tmp).await.map_err(HubError::from)?;
        let mut hasher = DigestWriter::new();
        write_stream(&mut file, body.into_data_stream(), &mut hasher, limit).await?;
        file.flush().await.map_err(HubError::from)?;
        file.sync_all().await.map_err(HubError::from)?;
        Ok::<_, HubError>((hasher.finish(), hasher.len()))
    }
    .await;
    match result {
        Ok((digest, size)) => Ok(Received { tmp, digest, size, body_digest: digest, meta: None, upload: None }),
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(ApiError(e))
        }
    }
}

/// Checks an upload of an object stored under `name` from its headers (signature, the
/// namespace rule, announced size, uploads in progress, quota), then receives it (see
/// [`receive_model`]; `meta`: whether a `meta` part may come with it) and accepts its
/// signature. Every route that takes a model binary or a component object goes through
/// here. Bytes whose digest is not the one an `x-tessera-digest` header declares (the
/// file part's, for a multipart body) are refused (400) and not kept. The caller has
/// checked `name`.
pub(crate) async fn receive_upload(
    s: &AppState,
    request: (&Method, &Uri, &HeaderMap),
    name: &str,
    meta: bool,
    body: Body,
) -> ApiResult<(Received, Option<PublicKey>, UploadSlot)> {
    let (method, uri, headers) = request;
    let auth: HeaderAuth = check_headers(s, method, uri, headers, true)?;
    {
        let (store, name, a) = (s.store.clone(), name.to_owned(), auth.signer().cloned());
        super::blocking(move || store.may_write(&name, a.as_ref())).await?;
    }
    let limit = s.policy.max_model_bytes;
    check_length(headers, limit.saturating_add(4 << 20))?;
    let expected = expected_digest(headers)?;
    let slot = upload_slot(s, auth.signer())?;
    check_quota(s, auth.signer(), 0)?;
    let r = receive_model(&s.store, headers, body, limit, meta).await?;
    let checked = match expected {
        Some(d) if d != r.digest => Err(ApiError(HubError::BadRequest(format!(
            "digest mismatch: the bytes have digest {}, not the {d} {DIGEST_HEADER} declares",
            r.digest
        )))),
        _ => Ok(()),
    };
    match checked
        .and_then(|()| auth.finish(s, &r.body_digest))
        .and_then(|a| meter_bytes(s, a.as_ref(), r.size, 0).map(|()| a))
    {
        Ok(a) => Ok((r, a, slot)),
        Err(e) => {
            let _ = tokio::fs::remove_file(&r.tmp).await;
            Err(e)
        }
    }
}

/// Receives a model upload: a plain body (the binary), or `multipart/form-data` with an
/// optional `meta` part (JSON [`ModelMeta`], at most 2 MiB; only when `meta_allowed`) and a
/// `file` part (the binary).
pub(crate) async fn receive_model(
    store: &HubStore,
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    meta_allowed: bool,
) -> ApiResult<Received> {
    let ctype = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !ctype.starts_with("multipart/form-data") {
        return receive(store, body, limit).await;
    }
    let boundary =
        multer::parse_boundary(ctype).map_err(|e| ApiError(HubError::BadRequest(format!("multipart upload: {e}"))))?;
    // The whole body is hashed as multer reads it: the signature covers it all.
    let whole = Arc::new(Mutex::new(DigestWriter::new()));
    let hashing = {
        let whole = whole.clone();
        body.into_data_stream().map(move |chunk| {
            if let Ok(c) = &chunk {
                whole.lock().unwrap_or_else(|p| p.into_inner()).update(c);
            }
            chunk
        })
    };
    let constraints = multer::Constraints::new().allowed_fields(vec!["meta", "file"]).size_limit(
        multer::SizeLimit::new()
            .for_field("meta", MAX_META_PART)
            .whole_stream(limit.saturating_add(MAX_META_PART + 4096)),
    );
    let mut parts = multer::Multipart::with_constraints(hashing, boundary, constraints);
    let tmp = store.blobs().temp_path();
    let result = async {
        let mut meta: Option<ModelMeta> = None;
        let mut file_digest: Option<(Digest, u64)> = None;
        let bad = |e: multer::Error| HubError::BadRequest(format!("multipart upload: {e}"));
        while let Some(mut field) = parts.next_field().await.map_err(bad)? {
            match field.name() {
                Some("meta") if meta_allowed && meta.is_none() && file_digest.is_none() => {
                    let mut text = Vec::new();
                    while let Some(c) = field.chunk().await.map_err(bad)? {
                        text.extend_from_slice(&c);
                    }
                    let m = ModelMeta::parse(&text).map_err(|e| match e {
                        HubError::TooLarge(m) => HubError::TooLarge(format!("multipart upload: part `meta`: {m}")),
                        other => HubError::BadRequest(format!("multipart upload: part `meta`: {other}")),
                    })?;
                    meta = Some(m);
                }
                Some("file") if file_digest.is_none() => {
                    let mut file = tokio::fs::File::create(&tmp).await.map_err(HubError::from)?;
                    let mut hasher = DigestWriter::new();
                    let mut field = field;
                    loop {
                        let chunk = field.chunk().await.map_err(bad)?;
                        let Some(chunk) = chunk else { break };
                        hasher.update(&chunk);
                        if hasher.len() > limit {
                            return Err(HubError::TooLarge(format!("the model is over the limit of {limit} bytes")));
                        }
                        file.write_all(&chunk).await.map_err(HubError::from)?;
                    }
                    file.flush().await.map_err(HubError::from)?;
                    file.sync_all().await.map_err(HubError::from)?;
                    file_digest = Some((hasher.finish(), hasher.len()));
                }
                other => {
                    return Err(HubError::BadRequest(format!(
                        "multipart upload: unexpected part {:?} ({})",
                        other.unwrap_or(""),
                        if meta_allowed { "send `meta`, then `file`, once each" } else { "send one `file` part" }
                    )));
                }
            }
        }
        let (digest, size) =
            file_digest.ok_or_else(|| HubError::BadRequest("multipart upload: no `file` part".into()))?;
        Ok::<_, HubError>((digest, size, meta))
    }
    .await;
    drop(parts);
    match result {
        Ok((digest, size, meta)) => {
            let body_digest = whole.lock().unwrap_or_else(|p| p.into_inner()).finish();
            Ok(Received { tmp, digest, size, body_digest, meta, upload: None })
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(ApiError(e))
        }
    }
}

/// Reads a private package's declared manifest from [`MANIFEST_HEADER`] and keeps its
/// public part.
pub(crate) fn private_manifest(headers: &HeaderMap) -> ApiResult<tessera_core::Manifest> {
    use base64::Engine;
    let text = headers
        .get(MANIFEST_HEADER)
        .ok_or_else(|| {
            HubError::BadRequest(format!("a private package needs its manifest declared in {MANIFEST_HEADER}"))
        })?
        .to_str()
        .map_err(|_| HubError::BadRequest(format!("{MANIFEST_HEADER} is not text")))?;
    if text.len() > 512 * 1024 {
        return Err(ApiError(HubError::BadRequest(format!("{MANIFEST_HEADER} is too long"))));
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| HubError::BadRequest(format!("{MANIFEST_HEADER} is not base64url")))?;
    let value: serde_json::Value = super::parse_json(&json)?;
    // Re-validate the declaration as a module.yaml (JSON is YAML).
    let m = tessera_core::Manifest::parse(&value.to_string())
        .map_err(|e| ApiError(HubError::BadRequest(format!("declared manifest: {e}"))))?;
    Ok(m.public_part())
}

/// The `name@version` a package upload declares in [`PACKAGE_HEADER`], if any.
pub(crate) fn declared_package(headers: &HeaderMap) -> ApiResult<Option<(String, String)>> {
    let Some(v) = headers.get(PACKAGE_HEADER) else { return Ok(None) };
    let text = v.to_str().map_err(|_| HubError::BadRequest(format!("{PACKAGE_HEADER} is not text")))?;
    let (name, version) =
        text.split_once('@').ok_or_else(|| HubError::BadRequest(format!("{PACKAGE_HEADER}: expected name@version")))?;
    name.parse::<tessera_core::ModulePath>().map_err(|e| HubError::BadRequest(format!("{PACKAGE_HEADER}: {e}")))?;
    tessera_core::version::Version::parse(version)
        .map_err(|e| HubError::BadRequest(format!("{PACKAGE_HEADER}: version {version:?}: {e}")))?;
    Ok(Some((name.to_owned(), version.to_owned())))
}
