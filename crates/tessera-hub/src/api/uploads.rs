//! Resumable uploads (see [`crate::store::uploads`] for the protocol): begin, append a piece
//! at the reported offset, ask the offset; the finished upload is named in the model upload
//! that stores it (query parameter `upload`, which a request's signature covers with the
//! rest of its path).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, Uri};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tessera_core::{Digest, DigestWriter};
use tessera_identity::PublicKey;
use utoipa::ToSchema;

use super::auth::{authenticate, check_headers, check_quota, meter_bytes, read_signer, upload_slot};
use super::body::{Received, check_length};
use super::models::ModelMeta;
use super::{ApiError, ApiResult, AppState, ErrorBody, blocking, parse_json};
use crate::store::uploads::check_upload_id;
use crate::store::{HubError, UploadRecord};

/// The header of a piece: the offset it starts at, in bytes.
pub const OFFSET_HEADER: &str = "upload-offset";

/// The query parameter naming a finished upload (its id), or bytes the hub already serves
/// (their digest, `b3:<hex>`), in a model upload whose body is then empty or its metadata as
/// JSON (`{metadata, lineage, card}`). In the query, it is covered by the request's
/// signature.
pub const UPLOAD_PARAM: &str = "upload";

/// The upload a model upload names, if any (`?upload=`).
pub(crate) fn named_in(uri: &Uri) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == UPLOAD_PARAM).then(|| v.replace("%3A", ":").replace("%3a", ":"))
    })
}

/// A new upload.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BeginUpload {
    /// The object's BLAKE3 digest, `b3:<hex>`.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Resumable uploads receiving a piece now (one piece at a time per upload), and the
/// running digest of each upload whose every piece this process received, so a finished
/// upload is not read again to check its digest (after a restart, it is).
#[derive(Clone, Default)]
pub(crate) struct Appending(Arc<Mutex<AppendState>>);

#[derive(Default)]
struct AppendState {
    busy: HashSet<String>,
    running: HashMap<String, DigestWriter>,
}

/// Running digests kept at most (each is a BLAKE3 state of about 2 KiB); past it, an upload
/// is hashed from its file when it is used.
const MAX_RUNNING: usize = 256;

/// One upload's piece lock, released when dropped.
pub(crate) struct AppendGuard(Appending, String);

impl Drop for AppendGuard {
    fn drop(&mut self) {
        self.0.lock().busy.remove(&self.1);
    }
}

impl Appending {
    fn lock(&self) -> std::sync::MutexGuard<'_, AppendState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, id: &str) -> ApiResult<AppendGuard> {
        if !self.lock().busy.insert(id.to_owned()) {
            return Err(ApiError(HubError::Conflict(format!(
                "upload {id} is receiving another piece; ask its offset when that one ends"
            ))));
        }
        Ok(AppendGuard(self.clone(), id.to_owned()))
    }

    /// The running digest of an upload at `offset` (a new one at 0), if this process has it.
    fn running(&self, id: &str, offset: u64) -> Option<DigestWriter> {
        let kept = self.lock().running.remove(id);
        match kept {
            Some(r) if r.len() == offset => Some(r),
            _ if offset == 0 => Some(DigestWriter::new()),
            _ => None,
        }
    }

    /// Keeps an upload's running digest; when the map is full, one kept for another upload
    /// (perhaps abandoned) goes: losing it only costs that upload a read of its file.
    fn keep(&self, id: &str, running: DigestWriter) {
        let mut g = self.lock();
        if g.running.len() >= MAX_RUNNING
            && let Some(other) = g.running.keys().find(|k| *k != id).cloned()
        {
            g.running.remove(&other);
        }
        g.running.insert(id.to_owned(), running);
    }

    /// The running digest of a finished upload, forgotten.
    fn finished(&self, id: &str) -> Option<DigestWriter> {
        self.lock().running.remove(id)
    }
}

fn account(signer: Option<&PublicKey>) -> String {
    signer.map(ToString::to_string).unwrap_or_default()
}

/// Begins an upload of `size` bytes with `digest` (or finds this account's upload of them
/// again, with its offset). When the hub already serves these bytes as a model or a
/// component, the answer is complete with no id: name the digest in the model upload.
#[utoipa::path(post, path = "/api/v1/uploads", tag = "hub", request_body = BeginUpload,
    security((), ("tessera_signature" = [])),
    responses((status = 200, body = UploadRecord), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub(super) async fn begin_upload(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<UploadRecord>> {
    let actor = authenticate(&s, &method, &uri, &headers, &body, true)?;
    let b: BeginUpload = parse_json(&body)?;
    let digest: Digest = crate::store::parse_digest(&b.digest)?;
    let limit = s.policy.max_model_bytes;
    if b.size > limit {
        return Err(ApiError(HubError::TooLarge(format!(
            "an object of {} bytes is over the limit of {limit}",
            b.size
        ))));
    }
    check_quota(&s, actor.as_ref(), b.size)?;
    let store = s.store.clone();
    let who = account(actor.as_ref());
    Ok(Json(blocking(move || store.begin_upload(&who, &digest, b.size)).await?))
}

/// An upload's state: its offset (bytes received) and whether it is complete. Only the
/// account that began it sees it.
#[utoipa::path(get, path = "/api/v1/uploads/{id}", tag = "hub",
    params(("id" = String, Path, description = "The upload's id")),
    security((), ("tessera_signature" = [])),
    responses((status = 200, body = UploadRecord), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn show_upload(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<UploadRecord>> {
    let reader = read_signer(&s, &method, &uri, &headers)?;
    let store = s.store.clone();
    let who = account(reader.as_ref());
    Ok(Json(blocking(move || store.upload(&id, &who)).await?))
}

/// Appends a piece (the body) at `upload-offset`, which must be the upload's offset (409
/// otherwise, with nothing written); the piece may not pass the declared size. A piece
/// that fails (broken connection, refused signature) is cut off again, so the offset is
/// always that of whole accepted pieces. Its signature covers either its bytes or, with a
/// `content-length`, its statement ([`tessera_core::registry::upload_piece_statement`]).
#[utoipa::path(patch, path = "/api/v1/uploads/{id}", tag = "hub",
    params(("id" = String, Path, description = "The upload's id"), ("upload-offset" = u64, Header, description = "Where the piece starts")),
    request_body(content = Vec<u8>, content_type = "application/offset+octet-stream"),
    security((), ("tessera_signature" = [])),
    responses((status = 200, body = UploadRecord), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub(super) async fn append_upload(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult<Json<UploadRecord>> {
    check_upload_id(&id)?;
    let auth = check_headers(&s, &method, &uri, &headers, true)?;
    let who = account(auth.signer());
    let offset: u64 = headers
        .get(OFFSET_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| HubError::BadRequest(format!("a piece needs its {OFFSET_HEADER} header (a byte count)")))?;
    let one_piece = std::sync::Arc::new(s.appending.take(&id)?);
    let _slot = upload_slot(&s, auth.signer())?;
    let rec = {
        let (store, id, who) = (s.store.clone(), id.clone(), who.clone());
        blocking(move || store.upload(&id, &who)).await?
    };
    if offset != rec.offset {
        return Err(ApiError(HubError::Conflict(format!(
            "upload {id} is at byte {}; send the piece that starts there",
            rec.offset
        ))));
    }
    {
        // In use from now (it does not expire meanwhile), and cut back to its offset: bytes
        // past it are of a piece that was not accepted.
        let (store, id, at) = (s.store.clone(), id.clone(), rec.offset);
        blocking(move || {
            store.touch_upload(&id)?;
            store.trim_upload(&id, at)
        })
        .await?;
    }
    let room = rec.size.checked_sub(rec.offset).ok_or_else(|| {
        HubError::Conflict(format!("upload {id} holds more than its declared {} bytes; begin it again", rec.size))
    })?;
    check_length(&headers, room)?;
    // A signature over the piece's statement (upload, offset, length) needs no hash of the
    // piece, its bytes being proven by the upload's digest: it is accepted (and its nonce
    // spent, so it cannot be sent again with other bytes) before the body is read. One over
    // the body's digest (or none) is checked as every request's is, once the body is in.
    let announced = headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let statement = announced.map(|len| tessera_core::registry::upload_piece_statement(&id, offset, len));
    let (accepted, pending) = match statement {
        Some(st) if auth.signed_body() == Some(&st) => (Some(auth.finish(&s, &st)?), None),
        _ => (None, Some(auth)),
    };
    let hash_piece = pending.as_ref().is_some_and(|a| a.signed_body().is_some());
    let path = s.store.upload_file(&id);
    // Whatever ends this request before the piece is accepted (an error, or the connection
    // dropping, which drops this future), the file is cut back to the offset (and again
    // before the next piece, which waits until this piece's last write has ended).
    let mut guard = CutBack { path: path.clone(), offset, armed: true };
    let file = blocking(move || Ok(std::fs::OpenOptions::new().create(true).append(true).open(&path)?)).await?;
    let running = s.appending.running(&id, offset);
    let hashers: Vec<DigestWriter> = hash_piece.then(DigestWriter::new).into_iter().chain(running).collect();
    let mut sink =
        tessera_ports::sink::FileSink::start_keeping(file, hashers, one_piece.clone()).map_err(HubError::from)?;
    // No fsync per piece (write-back starts as the bytes arrive): the digest is checked over
    // the whole file when the upload is used (from the file after a restart), which catches
    // what a crash could leave.
    let mut received = 0u64;
    let streamed = async {
        let mut stream = body.into_data_stream();
        while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
            let chunk = chunk.map_err(|e| HubError::BadRequest(format!("upload interrupted: {e}")))?;
            received += chunk.len() as u64;
            if received > room {
                return Err(HubError::TooLarge(format!("the piece passes the declared size ({room} bytes were left)")));
            }
            sink.write(chunk).await?;
        }
        Ok::<_, HubError>(())
    }
    .await;
    // Every write lands (or fails) before the guard may cut the file back.
    let written = sink.finish().await;
    streamed?;
    let mut hashers = written.map_err(HubError::from)?.hashers.into_iter();
    let n = received;
    let signer = match pending {
        Some(auth) => {
            let digest = if hash_piece { hashers.next().map(|h| h.finish()) } else { None };
            auth.finish(&s, &digest.unwrap_or_else(|| Digest::of(b"")))?
        }
        None if Some(n) != announced => {
            return Err(ApiError(HubError::BadRequest(format!(
                "the piece has {n} bytes, not the {} its content-length announced",
                announced.unwrap_or_default()
            ))));
        }
        None => accepted.flatten(),
    };
    let running = hashers.next();
    meter_bytes(&s, signer.as_ref(), n, 0)?;
    guard.armed = false;
    if let Some(r) = running {
        s.appending.keep(&id, r);
    }
    let store = s.store.clone();
    Ok(Json(
        blocking(move || {
            store.accept_piece(&id, offset + n)?;
            store.upload(&id, &who)
        })
        .await?,
    ))
}

/// Abandons an upload (its bytes are removed). Only the account that began it may.
#[utoipa::path(delete, path = "/api/v1/uploads/{id}", tag = "hub",
    params(("id" = String, Path, description = "The upload's id")),
    security((), ("tessera_signature" = [])),
    responses((status = 204, description = "Abandoned"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn cancel_upload(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<axum::http::StatusCode> {
    check_upload_id(&id)?;
    let actor = authenticate(&s, &method, &uri, &headers, b"", true)?;
    let _one = s.appending.take(&id)?;
    let store = s.store.clone();
    let who = account(actor.as_ref());
    let id2 = id.clone();
    blocking(move || store.cancel_upload(&id2, &who)).await?;
    s.appending.finished(&id);
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Cuts an upload's file back to `offset` when dropped armed.
struct CutBack {
    path: std::path::PathBuf,
    offset: u64,
    armed: bool,
}

impl Drop for CutBack {
    fn drop(&mut self) {
        if self.armed
            && let Ok(f) = std::fs::OpenOptions::new().write(true).open(&self.path)
        {
            let _ = f.set_len(self.offset);
        }
    }
}

/// Most bytes of metadata a model upload naming an upload may carry.
const MAX_META_BODY: usize = 2 << 20;

/// The bytes a model upload names in `?upload=`, checked: the upload must belong to
/// the signer and be complete, and its bytes must have the declared digest (an upload that
/// does not is discarded); or the digest of bytes the hub already serves publicly. The
/// body, if any, is the metadata. `name` is checked by the caller.
pub(crate) async fn named_upload(
    s: &AppState,
    request: (&Method, &Uri, &HeaderMap),
    name: &str,
    body: Body,
) -> ApiResult<(Received, Option<PublicKey>, Option<AppendGuard>)> {
    let (method, uri, headers) = request;
    let named = named_in(uri).ok_or_else(|| HubError::BadRequest(format!("no ?{UPLOAD_PARAM}= in the request")))?;
    let expected = super::body::expected_digest(headers)?;
    let auth = check_headers(s, method, uri, headers, true)?;
    {
        let (store, name, a) = (s.store.clone(), name.to_owned(), auth.signer().cloned());
        blocking(move || store.may_write(&name, a.as_ref())).await?;
    }
    check_length(headers, MAX_META_BODY as u64)?;
    let bytes = axum::body::to_bytes(body, MAX_META_BODY)
        .await
        .map_err(|e| HubError::BadRequest(format!("the metadata of a model upload: {e}")))?;
    let actor = auth.finish(s, &Digest::of(&bytes))?;
    let meta = if bytes.is_empty() { None } else { Some(ModelMeta::parse(&bytes)?) };
    let who = account(actor.as_ref());
    // No piece may land (or be cut back) while the upload is checked and stored: its file
    // becomes the model's.
    let lock = if named.starts_with("b3:") { None } else { Some(s.appending.take(&named)?) };
    let (store, appending) = (s.store.clone(), s.appending.clone());
    let received = blocking(move || {
        // A declared digest is held against the one the bytes must have before they are read.
        let declared = |digest: &Digest| match expected {
            Some(d) if d != *digest => Err(HubError::BadRequest(format!(
                "digest mismatch: the bytes named have digest {digest}, not the {d} {} declares",
                super::DIGEST_HEADER
            ))),
            _ => Ok(()),
        };
        if named.starts_with("b3:") {
            let digest = crate::store::parse_digest(&named)?;
            declared(&digest)?;
            if !store.has_public_blob(&digest)? {
                return Err(HubError::NotFound(format!(
                    "the hub serves no model or component with digest {digest}: upload the bytes"
                )));
            }
            let size = store.blob_download(&digest)?.size()?;
            // No file of its own: the stored blob is adopted as it is.
            let tmp = store.blobs().temp_path();
            return Ok(Received { tmp, digest, size, body_digest: digest, meta, upload: None });
        }
        let rec = store.upload(&named, &who)?;
        store.touch_upload(&named)?;
        if !rec.complete {
            return Err(HubError::Conflict(format!(
                "upload {named} has {} of its {} bytes; send the rest first",
                rec.offset, rec.size
            )));
        }
        declared(&rec.digest)?;
        let file = store.upload_file(&named);
        store.trim_upload(&named, rec.size)?;
        let actual = match appending.finished(&named) {
            Some(r) if r.len() == rec.size => r.finish(),
            _ => hash_file(&file)?,
        };
        // On disk before a record names it.
        std::fs::File::open(&file)?.sync_all()?;
        if actual != rec.digest {
            store.end_upload(&named)?;
            return Err(HubError::BadRequest(format!(
                "the uploaded bytes have digest {actual}, not the declared {}; the upload is discarded",
                rec.digest
            )));
        }
        Ok(Received { tmp: file, digest: actual, size: rec.size, body_digest: actual, meta, upload: Some(named) })
    })
    .await?;
    Ok((received, actor, lock))
}

/// The digest of a file, read 4 MiB at a time and hashed on every core.
fn hash_file(path: &std::path::Path) -> Result<Digest, HubError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = DigestWriter::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update_rayon(&buf[..n]);
    }
    Ok(h.finish())
}
