//! Model routes: records, binaries (with their metadata in one upload), versions.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tessera_core::Digest;
use tessera_core::registry::{ModelRecord, TensorEntry, TensorsInfo};
use tessera_core::wire::Lineage;
use tessera_identity::PublicKey;
use utoipa::ToSchema;

use super::auth::{authenticate, meter_bytes, read_signer};
use super::body::{Received, receive_upload};
use super::download::{sent_bytes, serve_download, whole_download};
use super::uploads::{named_in, named_upload};
use super::{ApiResult, AppState, ErrorBody, blocking, parse_json};
use crate::HubStore;
use crate::store::{HubError, ModelUpload};

/// A new model's record.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateModel {
    /// Model name (a module path).
    pub name: String,
    /// Semver version.
    pub version: String,
    /// Free-form metadata (library, description, metrics...): a JSON object of at most
    /// 1 MiB.
    #[serde(default = "empty_object")]
    pub metadata: Value,
    /// Where it came from.
    #[serde(default)]
    pub lineage: Option<Lineage>,
}

/// New metadata for a model, or the `meta` part of a multipart model upload.
#[derive(Deserialize, Serialize, ToSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    /// Free-form metadata (a JSON object of at most 1 MiB); replaces the old.
    #[serde(default = "empty_object")]
    pub metadata: Value,
    /// Lineage; kept when absent.
    #[serde(default)]
    pub lineage: Option<Lineage>,
    /// The model's card: a `README.md` with YAML front matter (`license`, `tags`,
    /// `datasets`, `metrics`, `base_model`, `library_name`, `intended_use`), at most
    /// 256 KiB; kept when absent.
    #[serde(default)]
    pub card: Option<String>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

impl CreateModel {
    /// Reads and checks a create-model body (JSON): the name is a module path, the version
    /// semver, the metadata a JSON object and it and the lineage each at most 1 MiB. The
    /// errors are the route's 400 and 413 answers; nothing panics, whatever the bytes.
    pub fn parse(body: &[u8]) -> Result<CreateModel, HubError> {
        let m: CreateModel = parse_json(body).map_err(|e| e.0)?;
        crate::store::parse_name(&m.name)?;
        crate::store::new_version(&m.version)?;
        crate::store::models::metadata_text(&m.metadata)?;
        crate::store::models::lineage_text(m.lineage.as_ref())?;
        Ok(m)
    }
}

impl ModelMeta {
    /// Reads and checks a metadata body (JSON): as [`CreateModel::parse`] for the metadata
    /// and lineage, and the card parses.
    pub fn parse(body: &[u8]) -> Result<ModelMeta, HubError> {
        let m: ModelMeta = parse_json(body).map_err(|e| e.0)?;
        crate::store::models::metadata_text(&m.metadata)?;
        crate::store::models::lineage_text(m.lineage.as_ref())?;
        m.parsed_card()?;
        Ok(m)
    }

    /// The card, parsed.
    ///
    /// # Errors
    /// [`HubError::BadRequest`] naming what is wrong with it.
    pub fn parsed_card(&self) -> Result<Option<tessera_core::card::Card>, HubError> {
        self.card
            .as_deref()
            .map(tessera_core::card::Card::parse)
            .transpose()
            .map_err(|e| HubError::BadRequest(format!("the model's card: {e}")))
    }
}

/// Creates a model record (metadata and lineage, no binary yet; `latest` skips it until
/// its binary arrives). Signed by an owner of the namespace (or its first signed writer).
#[utoipa::path(post, path = "/api/v1/models", tag = "models", request_body = CreateModel,
    security((), ("tessera_signature" = [])),
    responses((status = 201, body = ModelRecord), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn create_model(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<ModelRecord>)> {
    let actor = authenticate(&s, &method, &uri, &headers, &body, true)?;
    let body = CreateModel::parse(&body)?;
    let store = s.store.clone();
    let m = blocking(move || {
        store.create_model(&body.name, &body.version, &body.metadata, body.lineage.as_ref(), actor.as_ref())
    })
    .await?;
    Ok((StatusCode::CREATED, Json(m)))
}

/// The name prefix of a model listing (its other filters are [`crate::store::Filters`]).
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ModelQuery {
    /// Name prefix, by segments.
    pub prefix: Option<String>,
}

/// Lists models: those under the prefix that pass the filters, a page of them.
#[utoipa::path(get, path = "/api/v1/models", tag = "models", params(ModelQuery, crate::store::Filters), responses((status = 200, body = Vec<ModelRecord>)))]
pub(super) async fn list_models(
    State(s): State<AppState>,
    Query(q): Query<ModelQuery>,
    Query(filters): Query<crate::store::Filters>,
) -> ApiResult<Json<Vec<ModelRecord>>> {
    let store = s.store.clone();
    Ok(Json(blocking(move || store.search_models(q.prefix.as_deref(), &filters)).await?))
}

/// What a model upload holds until it is stored: its upload slot, or the piece lock of the
/// resumable upload it names.
enum Hold {
    Slot(#[allow(dead_code)] super::auth::UploadSlot),
    Upload(#[allow(dead_code)] Option<super::uploads::AppendGuard>),
}

/// Checks a model upload from its headers, then receives it (see [`receive_upload`]), or
/// takes the finished resumable upload it names (see [`named_upload`]).
async fn receive_model_upload(
    s: &AppState,
    request: (&Method, &Uri, &HeaderMap),
    name: &str,
    body: Body,
) -> ApiResult<(Received, Option<PublicKey>, Hold)> {
    crate::store::parse_name(name)?;
    if named_in(request.1).is_some() {
        let (r, a, lock) = named_upload(s, request, name, body).await?;
        return Ok((r, a, Hold::Upload(lock)));
    }
    let (r, a, slot) = receive_upload(s, request, name, true, body).await?;
    Ok((r, a, Hold::Slot(slot)))
}

/// Stores a received model binary (moving its file into the store), then ends the
/// resumable upload it came from, if any, whatever the outcome.
async fn store_model<T: Send + 'static>(
    s: &AppState,
    r: Received,
    put: impl FnOnce(&crate::HubStore, ModelUpload<'_>) -> Result<T, HubError> + Send + 'static,
) -> ApiResult<T> {
    let store = s.store.clone();
    blocking(move || {
        // A finished upload is stored through a link of its file, so a refused store (a
        // conflict, a busy database) leaves the upload to be named again.
        // (Where the file system has no hard links, the upload's file is stored as it is.)
        let linked = match &r.upload {
            Some(_) if r.tmp.exists() => {
                let link = store.blobs().temp_path();
                std::fs::hard_link(&r.tmp, &link).ok().map(|()| link)
            }
            _ => None,
        };
        let file = linked.as_deref().unwrap_or(&r.tmp);
        let meta = r.meta;
        let card = match &meta {
            Some(m) => m.parsed_card()?,
            None => None,
        };
        let upload = ModelUpload {
            file,
            digest: r.digest,
            size: r.size,
            metadata: meta.as_ref().map(|m| m.metadata.clone()),
            lineage: meta.and_then(|m| m.lineage),
            card,
        };
        let out = put(&store, upload)?;
        if let Some(id) = &r.upload {
            store.end_upload(id)?;
        }
        Ok(out)
    })
    .await
}

/// Uploads a model's binary as `name@version` (creating its record if needed), signed by
/// an owner. The body is the binary, or `multipart/form-data` with a `meta` part (JSON
/// `{metadata, lineage}`) then a `file` part, stored together in one transaction. A binary,
/// once stored, never changes: other bytes get 409 and change nothing, also for a deleted
/// version; the same bytes again are a no-op (200) that sets the metadata sent with them.
#[utoipa::path(put, path = "/api/v1/models/{name}/{version}", tag = "models",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Exact version"), ("upload" = Option<String>, Query, description = "A finished resumable upload's id, or the digest of bytes the hub serves; the body is then empty or the metadata as JSON")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    security((), ("tessera_signature" = [])),
    responses((status = 201, body = ModelRecord), (status = 200, description = "The same bytes were already stored", body = ModelRecord), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub(super) async fn upload_model(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
    body: Body,
) -> ApiResult<(StatusCode, Json<ModelRecord>)> {
    // Bounded when the version is new (the store decides, knowing which are).
    crate::store::parse_version(&version)?;
    let (r, actor, _slot) = receive_model_upload(&s, (&method, &uri, &headers), &name, body).await?;
    let (m, created) =
        store_model(&s, r, move |store, upload| store.put_model_file(&name, &version, upload, actor.as_ref())).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(m)))
}

/// Uploads a model's binary as a new version of `name`: the hub chooses the next patch
/// version (after the highest it ever had; `0.1.0` for a new model) in the same transaction
/// as the write, so concurrent uploads get distinct versions. Body as for
/// `PUT /api/v1/models/{name}/{version}`.
#[utoipa::path(post, path = "/api/v1/models/{name}", tag = "models",
    params(("name" = String, Path, description = "Model name"), ("upload" = Option<String>, Query, description = "A finished resumable upload's id, or the digest of bytes the hub serves; the body is then empty or the metadata as JSON")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    security((), ("tessera_signature" = [])),
    responses((status = 201, body = ModelRecord), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub(super) async fn upload_next_model(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<ModelRecord>)> {
    let (r, actor, _slot) = receive_model_upload(&s, (&method, &uri, &headers), &name, body).await?;
    let m = store_model(&s, r, move |store, upload| store.put_model_next(&name, upload, actor.as_ref())).await?;
    Ok((StatusCode::CREATED, Json(m)))
}

/// Downloads a model's binary; `version` may be `latest` (the highest version that has a
/// binary). Anyone may; a signed reader is metered at the bytes the answer carries.
#[utoipa::path(get, path = "/api/v1/models/{name}/{version}", tag = "models",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Version or `latest`")),
    security((), ("tessera_signature" = [])),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 206, description = "One range of it (Range: bytes=...)", content_type = "application/octet-stream", body = Vec<u8>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 416, description = "A range that cannot be served", body = ErrorBody)))]
pub(super) async fn download_model(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Response> {
    let reader = read_signer(&s, &method, &uri, &headers)?;
    let store = s.store.clone();
    let (m, digest, download) = blocking(move || {
        let m = store.model(&name, &version)?;
        let d =
            m.digest.ok_or_else(|| HubError::NotFound(format!("model {}@{} has no binary yet", m.name, m.version)))?;
        let download = store.blob_download(&d)?;
        Ok((m, d, download))
    })
    .await?;
    let filename = Some(format!("{}-{}.safetensors", m.name, m.version));
    let resp = serve_download(download, &digest, filename, &method, &headers).await?;
    meter_bytes(&s, reader.as_ref(), 0, sent_bytes(&method, &resp))?;
    if whole_download(&method, &resp) {
        let (store, n, v) = (s.store.clone(), m.name.clone(), m.version.clone());
        blocking(move || store.count_model_download(&n, &v)).await?;
    }
    Ok(resp)
}

/// Deletes a model version (signed by an owner) and its binary when nothing else uses it.
/// A version that had a binary stays reserved for the same bytes.
#[utoipa::path(delete, path = "/api/v1/models/{name}/{version}", tag = "models",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Exact version")),
    security((), ("tessera_signature" = [])),
    responses((status = 200, body = ModelRecord), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn delete_model(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<ModelRecord>> {
    let actor = authenticate(&s, &method, &uri, &headers, b"", true)?;
    let store = s.store.clone();
    Ok(Json(blocking(move || store.delete_model(&name, &version, actor.as_ref())).await?))
}

/// A model's record: metadata, lineage, digest, who signed what; `version` may be
/// `latest`.
#[utoipa::path(get, path = "/api/v1/models/{name}/{version}/meta", tag = "models",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Version or `latest`")),
    responses((status = 200, body = ModelRecord), (status = 404, body = ErrorBody)))]
pub(super) async fn show_model(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<ModelRecord>> {
    let store = s.store.clone();
    Ok(Json(blocking(move || store.model(&name, &version)).await?))
}

/// Replaces a model's metadata (and lineage, when given), signed by an owner.
#[utoipa::path(put, path = "/api/v1/models/{name}/{version}/meta", tag = "models",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Exact version")),
    request_body = ModelMeta,
    security((), ("tessera_signature" = [])),
    responses((status = 200, body = ModelRecord), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn update_model_meta(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<ModelRecord>> {
    let actor = authenticate(&s, &method, &uri, &headers, &body, true)?;
    let body = ModelMeta::parse(&body)?;
    let store = s.store.clone();
    Ok(Json(
        blocking(move || {
            let card = body.parsed_card()?;
            store.update_model_meta(
                &name,
                &version,
                &body.metadata,
                body.lineage.as_ref(),
                card.as_ref(),
                actor.as_ref(),
            )
        })
        .await?,
    ))
}

/// Tensor listings parsed at once: a header of [`MAX_TENSOR_HEADER`] bytes with 200,000
/// tensors took about 150 MB to parse, so the hub's memory for listings stays under about
/// 300 MB however many ask at once (the others wait).
const TENSOR_LISTINGS_AT_ONCE: usize = 2;

static TENSOR_LISTINGS: std::sync::LazyLock<std::sync::Arc<tokio::sync::Semaphore>> =
    std::sync::LazyLock::new(|| std::sync::Arc::new(tokio::sync::Semaphore::new(TENSOR_LISTINGS_AT_ONCE)));

/// Largest safetensors header read, in bytes (16 MiB; a header with a million tensors fits).
const MAX_TENSOR_HEADER: u64 = 16 << 20;

/// Bytes read first for a safetensors header (64 KiB: most headers fit; a longer one is
/// read again to its length).
const FIRST_HEADER_READ: u64 = 64 << 10;

/// Reads a stored safetensors file's header: 8 bytes of little-endian length, then that
/// much JSON (the format's definition, huggingface/safetensors). Only the header is read,
/// however large the file, and a hub process that has not cached the blob reads it from the
/// front of the shared store's object ([`HubStore::blob_prefix`](crate::HubStore::blob_prefix)).
fn read_tensor_header(store: &HubStore, digest: &Digest) -> Result<(u64, safetensors::tensor::Metadata), HubError> {
    let not = |why: String| HubError::BadRequest(format!("not a safetensors file: {why}"));
    let (size, mut head) = store.blob_prefix(digest, FIRST_HEADER_READ)?;
    let Some(n) = head.get(..8) else { return Err(not("shorter than its 8-byte header length".into())) };
    let n = u64::from_le_bytes(n.try_into().unwrap_or_default());
    if n > MAX_TENSOR_HEADER || n.saturating_add(8) > size {
        return Err(not(format!("its header length {n} does not fit a file of {size} bytes")));
    }
    if (head.len() as u64) < n + 8 {
        head = store.blob_prefix(digest, n + 8)?.1;
    }
    let header = head
        .get(8..)
        .and_then(|h| h.get(..usize::try_from(n).ok()?))
        .ok_or_else(|| HubError::Storage(format!("blob {digest} ended before its {n}-byte header did")))?;
    let meta: safetensors::tensor::Metadata = serde_json::from_slice(header).map_err(|e| not(e.to_string()))?;
    for (name, t) in meta.tensors() {
        let elements = t.shape.iter().try_fold(1u128, |a, &d| a.checked_mul(d as u128));
        let bits = elements.and_then(|e| e.checked_mul(t.dtype.bitsize() as u128));
        let (start, stop) = t.data_offsets;
        if stop < start || bits != Some(((stop - start) as u128) * 8) {
            return Err(not(format!("tensor {name:?}: its shape and dtype do not fill its offsets")));
        }
    }
    let end = meta.tensors().values().map(|t| t.data_offsets.1 as u64).max().unwrap_or(0);
    match n.checked_add(8).and_then(|h| h.checked_add(end)) {
        Some(total) if total == size => {}
        _ => return Err(not(format!("its tensors do not end where the file of {size} bytes does"))),
    }
    Ok((size, meta))
}

/// The tensors of a model's binary (names, dtypes, shapes, offsets) and its header
/// metadata, read from the stored file's header without sending the file; `version` may
/// be `latest`. A binary that is not safetensors gets 400.
#[utoipa::path(get, path = "/api/v1/models/{name}/{version}/tensors", tag = "models",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Version or `latest`")),
    responses((status = 200, body = TensorsInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn model_tensors(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Response> {
    // A header of up to 16 MiB parses into several times that: at most
    // TENSOR_LISTINGS_AT_ONCE are parsed (and their answers written) at a time, whoever
    // asks (reads are unsigned). The permit goes with the work, which goes on if the
    // client leaves.
    let parsing = TENSOR_LISTINGS
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| HubError::Storage("the tensor listings' semaphore is closed".into()))?;
    let store = s.store.clone();
    let json = blocking(move || {
        let _parsing = parsing;
        let m = store.model(&name, &version)?;
        let d =
            m.digest.ok_or_else(|| HubError::NotFound(format!("model {}@{} has no binary yet", m.name, m.version)))?;
        let (size, meta) = read_tensor_header(&store, &d)?;
        let mut tensors: Vec<TensorEntry> = meta
            .tensors()
            .into_iter()
            .map(|(name, t)| TensorEntry {
                name,
                dtype: format!("{:?}", t.dtype),
                shape: t.shape.iter().map(|&x| x as u64).collect(),
                data_offsets: [t.data_offsets.0 as u64, t.data_offsets.1 as u64],
            })
            .collect();
        tensors.sort_by_key(|t| (t.data_offsets, t.name.clone()));
        let metadata = meta.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        let info = TensorsInfo { digest: d.to_string(), size, metadata, tensors };
        serde_json::to_vec(&info).map_err(|e| HubError::Storage(format!("the tensor listing: {e}")))
    })
    .await?;
    Ok(axum::response::IntoResponse::into_response(([(axum::http::header::CONTENT_TYPE, "application/json")], json)))
}

/// A model's card (its facts and Markdown text); `version` may be `latest`. A model pushed
/// without a card but with a run's lineage shows the card made from it
/// ([`tessera_core::card::Card::from_lineage`]); 404 when it has neither.
#[utoipa::path(get, path = "/api/v1/models/{name}/{version}/card", tag = "models",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Version or `latest`")),
    responses((status = 200, body = tessera_core::card::Card), (status = 404, body = ErrorBody)))]
pub(super) async fn model_card(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<tessera_core::card::Card>> {
    let store = s.store.clone();
    Ok(Json(
        blocking(move || {
            let m = store.model(&name, &version)?;
            let made =
                m.lineage.as_ref().map(|l| tessera_core::card::Card::from_lineage(&m.name, &m.version, l, &m.metadata));
            m.card.or(made).ok_or_else(|| HubError::NotFound(format!("model {}@{} has no card", m.name, m.version)))
        })
        .await?,
    ))
}

/// A model's lineage both ways: the run that made it (modules with digests, data sets,
/// nodes, rounds), the model it was built from, and the models built from it; `version`
/// may be `latest`.
#[utoipa::path(get, path = "/api/v1/models/{name}/{version}/lineage", tag = "models",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Version or `latest`")),
    responses((status = 200, body = tessera_core::registry::ModelLineage), (status = 404, body = ErrorBody)))]
pub(super) async fn model_lineage(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<tessera_core::registry::ModelLineage>> {
    let store = s.store.clone();
    Ok(Json(
        blocking(move || {
            let m = store.model(&name, &version)?;
            let base_model = m
                .lineage
                .as_ref()
                .and_then(|l| l.base_model.clone())
                .or_else(|| m.card.as_ref().and_then(|c| c.base_model.clone()));
            let derived = store
                .derived_models(&m.name, &m.version)?
                .into_iter()
                .map(|d| format!("{}@{}", d.name, d.version))
                .collect();
            Ok(tessera_core::registry::ModelLineage {
                model: format!("{}@{}", m.name, m.version),
                digest: m.digest,
                made_by: m.lineage,
                base_model,
                derived,
            })
        })
        .await?,
    ))
}
