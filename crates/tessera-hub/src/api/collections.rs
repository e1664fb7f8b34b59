//! The Component Repository's routes: `/model`, `/transformation`, `/service` and
//! `/inferencer`, with the endpoints and JSON bodies its README gives, so its clients work
//! against the hub unchanged.
//!
//! One set of handlers serves the four collections (the `{collection}` path segment picks
//! the [`Collection`]); models are named by two segments (`/model/{model_name}/{model_version}`),
//! the others by one (`/service/{id}`). Objects are uploaded as `multipart/form-data` with one
//! `file` part (or as a plain body). Where the hub differs, it is stricter: writes pass the
//! hub's authentication and namespace rule (unsigned clients need a hub started with
//! `--open`), an existing entry is a 409, names are checked, and a replaced object stays
//! reachable by digest. Every answer carries a `tessera` object (revisions, digests, and the
//! needs as a module's `needs`), which the Component Repository's clients ignore.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tessera_core::manifest::Needs;
use utoipa::ToSchema;

use super::auth::{authenticate, read_signer};
use super::body::receive_upload;
use super::download::{sent_bytes, serve_download};
use super::{ApiResult, AppState, ErrorBody, blocking};
use crate::store::components::{ObjectUpload, parse_document};
use crate::store::{Collection, ComponentRecord, HubError, Revision};

/// An entry as the Component Repository's clients read it: the document they sent (with
/// `model_id`, the current object's digest, for models) and what the hub adds.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct ComponentDocument {
    /// The document's fields, as sent.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub document: Map<String, Value>,
    /// What the hub keeps about the entry.
    pub tessera: ComponentInfo,
}

/// What the hub keeps about an entry.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct ComponentInfo {
    /// Its collection.
    pub collection: Collection,
    /// Its key: the key fields' values joined by `/`.
    pub key: String,
    /// The current object's revision (0: no object yet).
    pub revision: u64,
    /// The current object's digest, if any.
    pub digest: Option<String>,
    /// The current object's size in bytes, if any.
    pub size: Option<u64>,
    /// Every object it had, oldest first (each reachable at `/api/v1/blobs/{digest}`).
    pub revisions: Vec<Revision>,
    /// Its `needs` as a module's (transformations, services, inferencers).
    pub needs: Option<Needs>,
    /// Who signed the last change of its document.
    pub signer: Option<String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When its document or object last changed (RFC 3339).
    pub updated_at: String,
}

impl From<ComponentRecord> for ComponentDocument {
    fn from(r: ComponentRecord) -> Self {
        let current = r.current().cloned();
        let needs = (r.collection != Collection::Model).then(|| r.needs().module_needs());
        let mut document = r.document;
        if r.collection == Collection::Model {
            document.insert("model_id".into(), current.as_ref().map_or(Value::Null, |c| c.digest.to_string().into()));
        }
        ComponentDocument {
            document,
            tessera: ComponentInfo {
                collection: r.collection,
                key: r.key,
                revision: current.as_ref().map_or(0, |c| c.revision),
                digest: current.as_ref().map(|c| c.digest.to_string()),
                size: current.as_ref().map(|c| c.size),
                revisions: r.revisions,
                needs,
                signer: r.signer,
                created_at: r.created_at,
                updated_at: r.updated_at,
            },
        }
    }
}

/// Most entries one listing returns (documents are at most 64 KiB).
pub const MAX_PAGE: u64 = 1_000;

/// A page of a listing.
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Entries to skip (default 0).
    pub offset: Option<u64>,
    /// Entries to return (default and most: 1,000).
    pub limit: Option<u64>,
}

/// Which entry `GET /{collection}/meta` reads: `model_name` and `model_version` for
/// models, `id` for the others.
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MetaQuery {
    /// A model's name.
    pub model_name: Option<String>,
    /// A model's version.
    pub model_version: Option<String>,
    /// Another entry's id.
    pub id: Option<String>,
}

fn collection(name: &str) -> ApiResult<Collection> {
    Ok(Collection::parse(name)?)
}

/// Creates an entry from its metadata (the collection's JSON document); its object comes
/// with `PUT /{collection}/{id}`.
#[utoipa::path(post, path = "/{collection}", tag = "components",
    params(("collection" = Collection, Path, description = "model, transformation, service or inferencer")),
    request_body(content = Object, description = "The entry's document, e.g. {\"model_name\": \"base\", \"model_version\": \"base2\", \"meta\": {\"library\": \"keras\"}} or {\"id\": \"custom.x\", \"description\": \"...\", \"needs\": {\"storage\": 0, \"RAM\": 0, \"GPU\": false, \"preinstalled_libraries\": {}, \"available_models\": {}}}"),
    security((), ("tessera_signature" = [])),
    responses((status = 201, body = ComponentDocument), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub(super) async fn create_component(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(c): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<ComponentDocument>)> {
    let c = collection(&c)?;
    let actor = authenticate(&s, &method, &uri, &headers, &body, true)?;
    let (key, document) = parse_document(c, &body)?;
    let store = s.store.clone();
    let rec = blocking(move || store.create_component(c, &key, &document, actor.as_ref())).await?;
    Ok((StatusCode::CREATED, Json(rec.into())))
}

/// Lists a collection's entries, by key.
#[utoipa::path(get, path = "/{collection}", tag = "components",
    params(("collection" = Collection, Path, description = "model, transformation, service or inferencer"), PageQuery),
    responses((status = 200, body = Vec<ComponentDocument>), (status = 404, body = ErrorBody)))]
pub(super) async fn list_components(
    State(s): State<AppState>,
    Path(c): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Vec<ComponentDocument>>> {
    let c = collection(&c)?;
    let (offset, limit) = (q.offset.unwrap_or(0), q.limit.unwrap_or(MAX_PAGE).min(MAX_PAGE));
    let store = s.store.clone();
    let recs = blocking(move || store.components(c, offset, limit)).await?;
    Ok(Json(recs.into_iter().map(Into::into).collect()))
}

/// An entry's metadata: `?model_name=&model_version=` for a model, `?id=` otherwise.
#[utoipa::path(get, path = "/{collection}/meta", tag = "components",
    params(("collection" = Collection, Path, description = "model, transformation, service or inferencer"), MetaQuery),
    responses((status = 200, body = ComponentDocument), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn show_component(
    State(s): State<AppState>,
    Path(c): Path<String>,
    Query(q): Query<MetaQuery>,
) -> ApiResult<Json<ComponentDocument>> {
    let c = collection(&c)?;
    let parts: Vec<&str> = match c {
        Collection::Model => vec![q.model_name.as_deref().unwrap_or(""), q.model_version.as_deref().unwrap_or("")],
        _ => vec![q.id.as_deref().unwrap_or("")],
    };
    for (field, p) in c.key_fields().iter().zip(&parts) {
        if p.is_empty() {
            return Err(HubError::BadRequest(format!("the {} to show is named by ?{field}=", c.name())).into());
        }
    }
    let key = c.key_of_path(&parts)?;
    let store = s.store.clone();
    Ok(Json(blocking(move || store.component(c, &key)).await?.into()))
}

/// The current object of a transformation, service or inferencer read as a Tessera
/// package, for running it (`transformation/custom.scale` as a task's module): the
/// package's record with the entry's `needs` joined to the manifest's.
#[utoipa::path(get, path = "/api/v1/components/{collection}/{id}/package", tag = "components",
    params(("collection" = String, Path, description = "transformation, service or inferencer"), ("id" = String, Path, description = "The entry's id")),
    responses((status = 200, body = tessera_core::registry::PackageRecord), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn component_package(
    State(s): State<AppState>,
    Path((c, id)): Path<(String, String)>,
) -> ApiResult<Json<tessera_core::registry::PackageRecord>> {
    let reference: tessera_core::PackageRef = format!("{c}/{id}")
        .parse()
        .map_err(|e: tessera_core::version::RefError| HubError::BadRequest(e.to_string()))?;
    let tessera_core::PackageRef::Component { collection, id } = reference else {
        return Err(HubError::BadRequest(format!("{c:?} is not transformation, service or inferencer")).into());
    };
    let store = s.store.clone();
    Ok(Json(blocking(move || store.component_package(collection, &id)).await?))
}

async fn put_object(
    s: AppState,
    request: (&Method, &Uri, &HeaderMap),
    c: Collection,
    parts: &[&str],
    body: Body,
) -> ApiResult<StatusCode> {
    let key = c.key_of_path(parts)?;
    let owner = key.split('/').next().unwrap_or_default().to_owned();
    let (r, actor, _slot) = receive_upload(&s, request, &owner, false, body).await?;
    let store = s.store.clone();
    blocking(move || {
        store.put_component_object(
            c,
            &key,
            ObjectUpload { file: &r.tmp, digest: r.digest, size: r.size },
            actor.as_ref(),
        )
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_object(
    s: AppState,
    request: (&Method, &Uri, &HeaderMap),
    c: Collection,
    parts: &[&str],
) -> ApiResult<Response> {
    let key = c.key_of_path(parts)?;
    let (method, uri, headers) = request;
    let reader = read_signer(&s, method, uri, headers)?;
    let store = s.store.clone();
    let k2 = key.clone();
    let (digest, download) = blocking(move || {
        let digest = store.component_object(c, &k2)?;
        Ok((digest, store.blob_download(&digest)?))
    })
    .await?;
    let resp = serve_download(download, &digest, Some(key.replace('/', "-")), method, headers).await?;
    super::auth::meter_bytes(&s, reader.as_ref(), 0, sent_bytes(method, &resp))?;
    Ok(resp)
}

async fn delete(
    s: AppState,
    request: (&Method, &Uri, &HeaderMap),
    c: Collection,
    parts: &[&str],
) -> ApiResult<StatusCode> {
    let key = c.key_of_path(parts)?;
    let (method, uri, headers) = request;
    let actor = authenticate(&s, method, uri, headers, b"", true)?;
    let store = s.store.clone();
    blocking(move || store.delete_component(c, &key, actor.as_ref())).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Replaces the fields a metadata update sends (a model's `{"meta": {...}}`, another entry's
/// document), keeping the key; the result is checked as a new document would be.
async fn update_meta(
    s: AppState,
    request: (&Method, &Uri, &HeaderMap),
    c: Collection,
    parts: &[&str],
    body: Bytes,
) -> ApiResult<StatusCode> {
    let key = c.key_of_path(parts)?;
    let (method, uri, headers) = request;
    let actor = authenticate(&s, method, uri, headers, &body, true)?;
    let Value::Object(fields) = super::parse_json::<Value>(&body)? else {
        return Err(HubError::BadRequest("a metadata update is a JSON object".into()).into());
    };
    let store = s.store.clone();
    blocking(move || store.update_component(c, &key, fields, actor.as_ref())).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Uploads the object of a transformation, service or inferencer (`multipart/form-data`
/// with a `file` part, or the bytes as the body). An entry that has an object gets a new
/// revision; the old bytes stay reachable by digest.
#[utoipa::path(put, path = "/{collection}/{id}", tag = "components",
    params(("collection" = Collection, Path, description = "transformation, service or inferencer"), ("id" = String, Path, description = "The entry's id")),
    request_body(content = Vec<u8>, content_type = "multipart/form-data"),
    security((), ("tessera_signature" = [])),
    responses((status = 204, description = "Stored"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub(super) async fn put_object_by_id(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((c, id)): Path<(String, String)>,
    body: Body,
) -> ApiResult<StatusCode> {
    put_object(s, (&method, &uri, &headers), collection(&c)?, &[&id], body).await
}

/// Downloads the current object of a transformation, service or inferencer.
#[utoipa::path(get, path = "/{collection}/{id}", tag = "components",
    params(("collection" = Collection, Path, description = "transformation, service or inferencer"), ("id" = String, Path, description = "The entry's id")),
    security((), ("tessera_signature" = [])),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 206, description = "One range of it (Range: bytes=...)", content_type = "application/octet-stream", body = Vec<u8>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 416, description = "A range that cannot be served", body = ErrorBody)))]
pub(super) async fn get_object_by_id(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((c, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    get_object(s, (&method, &uri, &headers), collection(&c)?, &[&id]).await
}

/// Deletes a transformation, service or inferencer with its objects.
#[utoipa::path(delete, path = "/{collection}/{id}", tag = "components",
    params(("collection" = Collection, Path, description = "transformation, service or inferencer"), ("id" = String, Path, description = "The entry's id")),
    security((), ("tessera_signature" = [])),
    responses((status = 204, description = "Deleted"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn delete_by_id(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((c, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    delete(s, (&method, &uri, &headers), collection(&c)?, &[&id]).await
}

/// Updates the metadata of a transformation, service or inferencer: the fields sent
/// replace the stored ones (`id` cannot change).
#[utoipa::path(put, path = "/{collection}/meta/{id}", tag = "components",
    params(("collection" = Collection, Path, description = "transformation, service or inferencer"), ("id" = String, Path, description = "The entry's id")),
    request_body(content = Object, description = "Fields to replace"),
    security((), ("tessera_signature" = [])),
    responses((status = 204, description = "Updated"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn update_meta_by_id(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((c, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    update_meta(s, (&method, &uri, &headers), collection(&c)?, &[&id], body).await
}

/// Uploads a model's object (`multipart/form-data` with a `file` part, or the bytes as the
/// body). A model that has one gets a new revision; the old bytes stay reachable by digest.
#[utoipa::path(put, path = "/{collection}/{model_name}/{model_version}", tag = "components",
    params(("collection" = Collection, Path, description = "model"), ("model_name" = String, Path, description = "The model's name"), ("model_version" = String, Path, description = "The model's version")),
    request_body(content = Vec<u8>, content_type = "multipart/form-data"),
    security((), ("tessera_signature" = [])),
    responses((status = 204, description = "Stored"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub(super) async fn put_object_by_name(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((c, name, version)): Path<(String, String, String)>,
    body: Body,
) -> ApiResult<StatusCode> {
    put_object(s, (&method, &uri, &headers), collection(&c)?, &[&name, &version], body).await
}

/// Downloads a model's current object.
#[utoipa::path(get, path = "/{collection}/{model_name}/{model_version}", tag = "components",
    params(("collection" = Collection, Path, description = "model"), ("model_name" = String, Path, description = "The model's name"), ("model_version" = String, Path, description = "The model's version")),
    security((), ("tessera_signature" = [])),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 206, description = "One range of it (Range: bytes=...)", content_type = "application/octet-stream", body = Vec<u8>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 416, description = "A range that cannot be served", body = ErrorBody)))]
pub(super) async fn get_object_by_name(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((c, name, version)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    get_object(s, (&method, &uri, &headers), collection(&c)?, &[&name, &version]).await
}

/// Deletes a model's metadata and objects.
#[utoipa::path(delete, path = "/{collection}/{model_name}/{model_version}", tag = "components",
    params(("collection" = Collection, Path, description = "model"), ("model_name" = String, Path, description = "The model's name"), ("model_version" = String, Path, description = "The model's version")),
    security((), ("tessera_signature" = [])),
    responses((status = 204, description = "Deleted"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn delete_by_name(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((c, name, version)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    delete(s, (&method, &uri, &headers), collection(&c)?, &[&name, &version]).await
}

/// Updates a model's metadata: `{"meta": {...}}` replaces its `meta` (other fields sent
/// replace theirs; the name and version cannot change).
#[utoipa::path(put, path = "/{collection}/meta/{model_name}/{model_version}", tag = "components",
    params(("collection" = Collection, Path, description = "model"), ("model_name" = String, Path, description = "The model's name"), ("model_version" = String, Path, description = "The model's version")),
    request_body(content = Object, description = "{\"meta\": {...}}"),
    security((), ("tessera_signature" = [])),
    responses((status = 204, description = "Updated"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn update_meta_by_name(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((c, name, version)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    update_meta(s, (&method, &uri, &headers), collection(&c)?, &[&name, &version], body).await
}
