//! The hub's REST API.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tessera_core::registry::{ModelRecord, PackageRecord};
use tessera_core::wire::Lineage;
use tessera_core::{Digest, DigestWriter};
use tessera_identity::envelope::HEADER as SIGNATURE_HEADER;
use tessera_identity::{
    Envelope, PACKAGE_SIGNATURE_HEADER, PackageSignature, PublicKey, Verifier, VerifyError, now_ms,
};
use tokio::io::AsyncWriteExt;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::store::{GrantRecord, HubError, HubStore, ListQuery, UsageRecord};

/// The header carrying a digest: on uploads, what the client says the bytes are; on
/// downloads, what they are.
pub const DIGEST_HEADER: &str = "x-tessera-digest";

/// What the router serves from.
#[derive(Clone)]
pub struct AppState {
    /// The store.
    pub store: Arc<HubStore>,
    /// What the hub asks of requests.
    pub policy: Arc<HubPolicy>,
    /// Checks signed requests addressed to this hub.
    pub verifier: Arc<Verifier>,
}

/// What a hub asks of requests.
#[derive(Clone, Debug)]
pub struct HubPolicy {
    /// Refuse unsigned requests to mutating routes (and unsigned packages).
    pub require_signatures: bool,
    /// How far a request's timestamp may be from the hub's clock, in milliseconds.
    pub window_ms: u64,
    /// Bytes each account may upload in all (packages and models), if limited.
    pub upload_quota_bytes: Option<u64>,
}

impl HubPolicy {
    /// Signatures required, 60 s window.
    pub fn signed() -> Self {
        HubPolicy { require_signatures: true, window_ms: 60_000, upload_quota_bytes: None }
    }
    /// Unsigned requests accepted (signed ones are still checked); for embedded and
    /// single-user hubs.
    pub fn open() -> Self {
        HubPolicy { require_signatures: false, window_ms: 60_000, upload_quota_bytes: None }
    }
}

impl AppState {
    /// The state for a store under a policy.
    pub fn new(store: Arc<HubStore>, policy: HubPolicy) -> Self {
        let verifier = Verifier::new(store.key().public().clone()).with_window_ms(policy.window_ms);
        AppState { store, policy: Arc::new(policy), verifier: Arc::new(verifier) }
    }
}

/// Checks a request's signature envelope, if any: returns the signer. Unsigned requests
/// pass only when the policy allows them; a signed request is always checked.
fn authenticate(
    s: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Digest,
) -> ApiResult<Option<PublicKey>> {
    let unauthorized = |e: VerifyError| ApiError(HubError::Unauthorized(e.to_string()));
    let header = match headers.get(SIGNATURE_HEADER) {
        None if s.policy.require_signatures => return Err(unauthorized(VerifyError::Missing)),
        None => return Ok(None),
        Some(h) => {
            h.to_str().map_err(|_| ApiError(HubError::Unauthorized(format!("{SIGNATURE_HEADER} is not text"))))?
        }
    };
    let env = Envelope::parse(header).map_err(|e| unauthorized(VerifyError::Malformed(e)))?;
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let key = s.verifier.verify_envelope(&env, method.as_str(), path, body, now_ms()).map_err(unauthorized)?;
    if let Err(e) = s.store.meter(&key, 1, 0, 0) {
        tracing::warn!("metering: {e}");
    }
    Ok(Some(key))
}

/// Counts bytes moved for a signed account, and refuses uploads past its quota.
fn meter_bytes(s: &AppState, actor: Option<&PublicKey>, bytes_in: u64, bytes_out: u64) -> ApiResult<()> {
    let Some(actor) = actor else { return Ok(()) };
    if bytes_in > 0
        && let Some(quota) = s.policy.upload_quota_bytes
    {
        let used = s.store.usage(actor)?.bytes_in;
        if used + bytes_in > quota {
            return Err(ApiError(HubError::Quota(format!(
                "{actor} has uploaded {used} bytes; {bytes_in} more is over its quota of {quota}"
            ))));
        }
    }
    s.store.meter(actor, 0, bytes_in, bytes_out)?;
    Ok(())
}

/// The package signature header, if any; required (and by the request's signer) when the
/// policy requires signatures.
fn package_signature(
    s: &AppState,
    headers: &HeaderMap,
    signer: Option<&PublicKey>,
) -> ApiResult<Option<PackageSignature>> {
    let sig = match headers.get(PACKAGE_SIGNATURE_HEADER) {
        None => None,
        Some(h) => {
            let text =
                h.to_str().map_err(|_| HubError::BadRequest(format!("{PACKAGE_SIGNATURE_HEADER} is not text")))?;
            Some(
                PackageSignature::parse(text)
                    .map_err(|e| HubError::BadRequest(format!("{PACKAGE_SIGNATURE_HEADER}: {e}")))?,
            )
        }
    };
    if s.policy.require_signatures {
        let Some(sig) = &sig else {
            return Err(ApiError(HubError::Unauthorized(format!(
                "packages must be signed ({PACKAGE_SIGNATURE_HEADER})"
            ))));
        };
        if Some(&sig.key) != signer {
            return Err(ApiError(HubError::Forbidden(
                "the package must be signed by the key that signs the request".into(),
            )));
        }
    }
    Ok(sig)
}

/// The header declaring a private package's manifest (base64url of its JSON).
pub const MANIFEST_HEADER: &str = "x-tessera-manifest";

fn private_manifest(headers: &HeaderMap) -> ApiResult<tessera_core::Manifest> {
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
    let value: serde_json::Value = parse_json(&json)?;
    // Re-validate the declaration as a module.yaml (JSON is YAML).
    tessera_core::Manifest::parse(&value.to_string())
        .map_err(|e| ApiError(HubError::BadRequest(format!("declared manifest: {e}"))))
}

/// Authenticates a request, then runs `f` on the store once the signer may change things
/// under `name`'s namespace.
async fn as_owner<T: Send + 'static>(
    s: &AppState,
    request: (&Method, &Uri, &HeaderMap),
    body: &Digest,
    name: String,
    f: impl FnOnce(&HubStore) -> Result<T, HubError> + Send + 'static,
) -> ApiResult<T> {
    let (method, uri, headers) = request;
    let actor = authenticate(s, method, uri, headers, body)?;
    let store = s.store.clone();
    blocking(move || {
        store.authorize(&name, actor.as_ref())?;
        f(&store)
    })
    .await
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError(HubError::BadRequest(format!("invalid JSON body: {e}"))))
}

/// An error as the API returns it: a status and `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(pub HubError);

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        ApiError(e)
    }
}

/// The body of every error response.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            HubError::NotFound(_) => StatusCode::NOT_FOUND,
            HubError::Conflict(_) => StatusCode::CONFLICT,
            HubError::BadRequest(_) | HubError::Package(_) => StatusCode::BAD_REQUEST,
            HubError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HubError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            HubError::Forbidden(_) => StatusCode::FORBIDDEN,
            HubError::Quota(_) => StatusCode::TOO_MANY_REQUESTS,
            HubError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("hub: {}", self.0);
        }
        (status, Json(ErrorBody { error: self.0.to_string() })).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, HubError> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError(HubError::Storage(e.to_string())))?.map_err(ApiError)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tessera hub",
        description = "Publish, find and fetch module packages and models. Package versions and model binaries are immutable; every download is named by its BLAKE3 digest."
    ),
    tags(
        (name = "packages", description = "Module packages by name, version, alias and digest"),
        (name = "models", description = "Models: metadata, lineage and binaries"),
        (name = "namespaces", description = "Who may publish under a path prefix"),
        (name = "hub", description = "Health and blobs")
    )
)]
struct ApiDoc;

/// The API routes. Every route is registered through the macro that documents it, so the
/// router and the OpenAPI document cannot drift apart.
fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(publish_package, list_packages))
        .routes(routes!(package_versions))
        .routes(routes!(show_package, delete_package))
        .routes(routes!(download_package))
        .routes(routes!(set_alias))
        .routes(routes!(download_blob))
        .routes(routes!(package_by_digest))
        .routes(routes!(list_grants))
        .routes(routes!(set_grant, revoke_grant))
        .routes(routes!(account_usage))
        .routes(routes!(create_model, list_models))
        .routes(routes!(upload_model, download_model, delete_model))
        .routes(routes!(show_model, update_model_meta))
        .routes(routes!(show_namespace))
        .routes(routes!(add_owner, remove_owner))
}

/// The OpenAPI document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().split_for_parts().1
}

/// The hub's HTTP application: the API under `/api/v1`, `/openapi.json`, and `/docs`.
pub fn app(state: AppState) -> Router {
    let (router, api) = api_router().split_for_parts();
    router
        .merge(SwaggerUi::new("/docs").url("/openapi.json", api))
        .route(
            "/",
            axum::routing::get(|| async {
                axum::response::Html(
                    "<!doctype html><title>Tessera hub</title><h1>Tessera hub</h1>\
                     <p><a href=\"/docs/\">API documentation</a> · <a href=\"/openapi.json\">OpenAPI document</a></p>",
                )
            }),
        )
        .with_state(state)
}

/// Health and version.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// The hub's version.
    pub version: String,
    /// The hub's public key: the audience of signed requests.
    pub key: String,
    /// True when mutating requests must be signed.
    pub signatures_required: bool,
}

#[utoipa::path(get, path = "/api/v1/health", tag = "hub", responses((status = 200, body = Health)))]
async fn health(State(s): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        key: s.store.key().public().to_string(),
        signatures_required: s.policy.require_signatures,
    })
}

/// Streams a request body into a temporary file in the blob directory, hashing it, and
/// refusing it past `limit` bytes.
async fn receive(store: &HubStore, body: Body, limit: u64) -> ApiResult<(std::path::PathBuf, Digest, u64)> {
    let tmp = store.blobs().temp_path();
    let result = async {
        let mut file = tokio::fs::File::create(&tmp).await.map_err(HubError::from)?;
        let mut hasher = DigestWriter::new();
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| HubError::BadRequest(format!("upload interrupted: {e}")))?;
            hasher.update(&chunk);
            if hasher.len() > limit {
                return Err(HubError::TooLarge(format!("the upload is over the limit of {limit} bytes")));
            }
            file.write_all(&chunk).await.map_err(HubError::from)?;
        }
        file.flush().await.map_err(HubError::from)?;
        file.sync_all().await.map_err(HubError::from)?;
        Ok((hasher.finish(), hasher.len()))
    }
    .await;
    match result {
        Ok((d, n)) => Ok((tmp, d, n)),
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(ApiError(e))
        }
    }
}

fn expected_digest(headers: &HeaderMap) -> ApiResult<Option<Digest>> {
    match headers.get(DIGEST_HEADER) {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().map_err(|_| HubError::BadRequest(format!("{DIGEST_HEADER} is not text")))?;
            s.parse()
                .map(Some)
                .map_err(|e: tessera_core::digest::DigestError| ApiError(HubError::BadRequest(e.to_string())))
        }
    }
}

/// Publishes a package: the body is the package bytes. With `x-tessera-digest`, the bytes
/// must have that digest. Publishing the same bytes again is a no-op (200); other bytes
/// under an existing version are refused (409) and change nothing.
#[utoipa::path(
    post,
    path = "/api/v1/packages",
    tag = "packages",
    params(("x-tessera-digest" = Option<String>, Header, description = "Expected BLAKE3 digest of the body, b3:<hex>")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A package made by `tessera module pack`"),
    responses(
        (status = 201, description = "Published", body = PackageRecord),
        (status = 200, description = "This exact package was already published", body = PackageRecord),
        (status = 400, description = "Malformed or unsafe package, bad manifest, or digest mismatch", body = ErrorBody),
        (status = 409, description = "The version exists with other content", body = ErrorBody),
        (status = 413, description = "Over the size limit", body = ErrorBody)
    )
)]
async fn publish_package(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<PackageRecord>)> {
    let expected = expected_digest(&headers)?;
    let limit = s.store.limits().max_package_bytes;
    let (tmp, digest, size) = receive(&s.store, body, limit).await?;
    let sealed = {
        let mut head = [0u8; 7];
        let n =
            tokio::io::AsyncReadExt::read(&mut tokio::fs::File::open(&tmp).await.map_err(HubError::from)?, &mut head)
                .await
                .map_err(HubError::from)?;
        tessera_identity::seal::is_sealed(&head[..n])
    };
    let checked = authenticate(&s, &method, &uri, &headers, &digest).and_then(|signer| {
        let sig = package_signature(&s, &headers, signer.as_ref())?;
        meter_bytes(&s, signer.as_ref(), size, 0)?;
        Ok(sig)
    });
    let sig = match checked {
        Ok(sig) => sig,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    let store = s.store.clone();
    let p = if sealed {
        let declared = match private_manifest(&headers) {
            Ok(m) => m,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        let Some(sig) = sig else {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(ApiError(HubError::Unauthorized(format!(
                "private packages must be signed ({PACKAGE_SIGNATURE_HEADER})"
            ))));
        };
        blocking(move || store.publish_private(&tmp, digest, size, &declared, &sig)).await?
    } else {
        blocking(move || store.publish_file(&tmp, digest, size, expected, sig.as_ref())).await?
    };
    let status = if p.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(p.record)))
}

/// Lists packages: the latest version of each, or every version with `all=true`.
#[utoipa::path(get, path = "/api/v1/packages", tag = "packages", params(ListQuery), responses((status = 200, body = Vec<PackageRecord>), (status = 400, body = ErrorBody)))]
async fn list_packages(State(s): State<AppState>, Query(q): Query<ListQuery>) -> ApiResult<Json<Vec<PackageRecord>>> {
    let store = s.store.clone();
    Ok(Json(blocking(move || store.list(&q)).await?))
}

/// Every published version of a package, oldest first.
#[utoipa::path(get, path = "/api/v1/packages/{name}", tag = "packages", params(("name" = String, Path, description = "Module path")), responses((status = 200, body = Vec<PackageRecord>), (status = 400, body = ErrorBody)))]
async fn package_versions(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<Vec<PackageRecord>>> {
    let store = s.store.clone();
    Ok(Json(blocking(move || store.versions(&name)).await?))
}

/// One version (or alias, such as `latest`) of a package, with its manifest.
#[utoipa::path(get, path = "/api/v1/packages/{name}/{version}", tag = "packages",
    params(("name" = String, Path, description = "Module path"), ("version" = String, Path, description = "Version or alias (`latest`)")),
    responses((status = 200, body = PackageRecord), (status = 404, body = ErrorBody)))]
async fn show_package(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<PackageRecord>> {
    let store = s.store.clone();
    Ok(Json(blocking(move || store.resolve_str(&name, &version)).await?))
}

/// Deletes a version. Its number stays reserved: only the same bytes can be published
/// under it again.
#[utoipa::path(delete, path = "/api/v1/packages/{name}/{version}", tag = "packages",
    params(("name" = String, Path, description = "Module path"), ("version" = String, Path, description = "Exact version")),
    responses((status = 200, body = PackageRecord), (status = 404, body = ErrorBody)))]
async fn delete_package(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<PackageRecord>> {
    let n = name.clone();
    Ok(Json(as_owner(&s, (&method, &uri, &headers), &Digest::of(b""), n, move |st| st.delete(&name, &version)).await?))
}

async fn stream_file(path: std::path::PathBuf, digest: &Digest, filename: Option<String>) -> ApiResult<Response> {
    let file = tokio::fs::File::open(&path).await.map_err(HubError::from)?;
    let len = file.metadata().await.map_err(HubError::from)?.len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert(DIGEST_HEADER, v);
    }
    if let Some(f) = filename
        && let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{f}\""))
    {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// Downloads a package by name and version or alias.
#[utoipa::path(get, path = "/api/v1/packages/{name}/{version}/download", tag = "packages",
    params(("name" = String, Path, description = "Module path"), ("version" = String, Path, description = "Version or alias (`latest`)")),
    responses((status = 200, description = "The package bytes; x-tessera-digest names them", content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)))]
async fn download_package(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Response> {
    let reader = read_signer(&s, &method, &uri, &headers)?;
    let store = s.store.clone();
    let r2 = reader.clone();
    let (record, path) = blocking(move || {
        let r = store.resolve_str(&name, &version)?;
        store.check_read(&r, r2.as_ref(), now_ms())?;
        let p = store.blob_path(&r.digest)?;
        Ok((r, p))
    })
    .await?;
    meter_bytes(&s, reader.as_ref(), 0, record.size)?;
    stream_file(path, &record.digest, Some(format!("{}-{}.tpkg", record.name, record.version))).await
}

/// The signer of a read request, if it is signed (unsigned reads are fine for public
/// things, whatever the policy).
fn read_signer(s: &AppState, method: &Method, uri: &Uri, headers: &HeaderMap) -> ApiResult<Option<PublicKey>> {
    if headers.contains_key(SIGNATURE_HEADER) {
        authenticate(s, method, uri, headers, &Digest::of(b""))
    } else {
        Ok(None)
    }
}

/// The body of an alias update.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct AliasBody {
    /// The version the alias points at.
    pub version: String,
}

/// Points an alias (e.g. `stable`) at a published version. `latest` is computed and
/// cannot be set.
#[utoipa::path(put, path = "/api/v1/packages/{name}/aliases/{alias}", tag = "packages",
    params(("name" = String, Path, description = "Module path"), ("alias" = String, Path, description = "Alias name")),
    request_body = AliasBody,
    responses((status = 200, body = PackageRecord), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn set_alias(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, alias)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<PackageRecord>> {
    let digest = Digest::of(&body);
    let body: AliasBody = parse_json(&body)?;
    let n = name.clone();
    Ok(Json(
        as_owner(&s, (&method, &uri, &headers), &digest, n, move |st| st.set_alias(&name, &alias, &body.version))
            .await?,
    ))
}

/// Downloads any blob the hub serves (a package or a model binary) by digest.
#[utoipa::path(get, path = "/api/v1/blobs/{digest}", tag = "hub",
    params(("digest" = String, Path, description = "b3:<hex>")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn download_blob(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> ApiResult<Response> {
    let digest: Digest =
        digest.parse().map_err(|e: tessera_core::digest::DigestError| HubError::BadRequest(e.to_string()))?;
    let reader = read_signer(&s, &method, &uri, &headers)?;
    let store = s.store.clone();
    let r2 = reader.clone();
    let path = blocking(move || {
        if let Ok(record) = store.by_digest(&digest) {
            store.check_read(&record, r2.as_ref(), now_ms())?;
        }
        store.blob_path(&digest)
    })
    .await?;
    let size = tokio::fs::metadata(&path).await.map_or(0, |m| m.len());
    meter_bytes(&s, reader.as_ref(), 0, size)?;
    stream_file(path, &digest, None).await
}

/// The record of a live package by digest.
#[utoipa::path(get, path = "/api/v1/digests/{digest}", tag = "packages",
    params(("digest" = String, Path, description = "b3:<hex>")),
    responses((status = 200, body = PackageRecord), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn package_by_digest(State(s): State<AppState>, Path(digest): Path<String>) -> ApiResult<Json<PackageRecord>> {
    let digest: Digest =
        digest.parse().map_err(|e: tessera_core::digest::DigestError| HubError::BadRequest(e.to_string()))?;
    let store = s.store.clone();
    Ok(Json(blocking(move || store.by_digest(&digest)).await?))
}

/// A grant to set.
#[derive(Deserialize, Serialize, ToSchema, Default)]
pub struct GrantBody {
    /// When the grant ends (`YYYY-MM-DDTHH:MM:SSZ`), if ever.
    #[serde(default)]
    pub expires: Option<String>,
}

/// Who may read a private package.
#[utoipa::path(get, path = "/api/v1/packages/{name}/grants", tag = "packages",
    params(("name" = String, Path, description = "Module path")),
    responses((status = 200, body = Vec<GrantRecord>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_grants(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<GrantRecord>>> {
    let actor = read_signer(&s, &method, &uri, &headers)?.ok_or_else(|| {
        ApiError(HubError::Unauthorized("grants are shown to the namespace's owners: sign the request".into()))
    })?;
    let store = s.store.clone();
    Ok(Json(
        blocking(move || {
            owner_only(&store, &name, &actor)?;
            store.grants(&name)
        })
        .await?,
    ))
}

fn owner_only(store: &HubStore, name: &str, actor: &PublicKey) -> Result<(), HubError> {
    let ns = name.split('.').next().unwrap_or_default();
    match store.owners(ns)? {
        Some(o) if o.contains(actor) => Ok(()),
        _ => Err(HubError::Forbidden(format!("{actor} is not an owner of namespace {ns:?}"))),
    }
}

/// Grants (or renews) a key the right to read a private package (signed by an owner).
/// Only keys the package was sealed for can decrypt it: grant those.
#[utoipa::path(put, path = "/api/v1/packages/{name}/grants/{key}", tag = "packages",
    params(("name" = String, Path, description = "Module path"), ("key" = String, Path, description = "The grantee's key")),
    request_body = GrantBody,
    responses((status = 200, body = GrantRecord), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn set_grant(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, key)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<GrantRecord>> {
    let actor = authenticate(&s, &method, &uri, &headers, &Digest::of(&body))?
        .ok_or_else(|| ApiError(HubError::Unauthorized(VerifyError::Missing.to_string())))?;
    let grant: GrantBody = if body.is_empty() { GrantBody::default() } else { parse_json(&body)? };
    let expires_ms = match &grant.expires {
        Some(t) => Some(tessera_core::time::parse_rfc3339(t).map_err(|e| ApiError(HubError::BadRequest(e)))? * 1000),
        None => None,
    };
    let key = parse_key(&key)?;
    let store = s.store.clone();
    Ok(Json(
        blocking(move || {
            owner_only(&store, &name, &actor)?;
            store.set_grant(&name, &key, expires_ms)
        })
        .await?,
    ))
}

/// Revokes a grant (signed by an owner): the key can no longer download the package.
#[utoipa::path(delete, path = "/api/v1/packages/{name}/grants/{key}", tag = "packages",
    params(("name" = String, Path, description = "Module path"), ("key" = String, Path, description = "The grantee's key")),
    responses((status = 200, body = GrantRecord), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn revoke_grant(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, key)): Path<(String, String)>,
) -> ApiResult<Json<GrantRecord>> {
    let actor = authenticate(&s, &method, &uri, &headers, &Digest::of(b""))?
        .ok_or_else(|| ApiError(HubError::Unauthorized(VerifyError::Missing.to_string())))?;
    let key = parse_key(&key)?;
    let store = s.store.clone();
    Ok(Json(
        blocking(move || {
            owner_only(&store, &name, &actor)?;
            store.revoke(&name, &key)
        })
        .await?,
    ))
}

/// What an account has used on this hub: signed requests and bytes moved. Readable by the
/// account itself (sign the request with it).
#[utoipa::path(get, path = "/api/v1/accounts/{key}/usage", tag = "hub",
    params(("key" = String, Path, description = "The account's key")),
    responses((status = 200, body = UsageRecord), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn account_usage(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> ApiResult<Json<UsageRecord>> {
    let key = parse_key(&key)?;
    let actor = read_signer(&s, &method, &uri, &headers)?
        .ok_or_else(|| ApiError(HubError::Unauthorized("sign the request with the account's key".into())))?;
    if actor != key {
        return Err(ApiError(HubError::Forbidden("an account's usage is shown to that account only".into())));
    }
    let store = s.store.clone();
    Ok(Json(blocking(move || store.usage(&key)).await?))
}

/// A new model's record.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct CreateModel {
    /// Model name (a module path).
    pub name: String,
    /// Semver version.
    pub version: String,
    /// Free-form metadata (library, description, metrics...).
    #[serde(default = "empty_object")]
    pub metadata: Value,
    /// Where it came from.
    #[serde(default)]
    pub lineage: Option<Lineage>,
}

/// New metadata for a model.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct ModelMeta {
    /// Free-form metadata; replaces the old.
    #[serde(default = "empty_object")]
    pub metadata: Value,
    /// Lineage; kept when absent.
    #[serde(default)]
    pub lineage: Option<Lineage>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// Creates a model record (metadata and lineage, no binary yet).
#[utoipa::path(post, path = "/api/v1/models", tag = "models", request_body = CreateModel,
    responses((status = 201, body = ModelRecord), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_model(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<ModelRecord>)> {
    let digest = Digest::of(&body);
    let body: CreateModel = parse_json(&body)?;
    let name = body.name.clone();
    let m = as_owner(&s, (&method, &uri, &headers), &digest, name, move |st| {
        st.create_model(&body.name, &body.version, &body.metadata, body.lineage.as_ref())
    })
    .await?;
    Ok((StatusCode::CREATED, Json(m)))
}

/// Query for listing models.
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ModelQuery {
    /// Name prefix, by segments.
    pub prefix: Option<String>,
}

/// Lists models.
#[utoipa::path(get, path = "/api/v1/models", tag = "models", params(ModelQuery), responses((status = 200, body = Vec<ModelRecord>)))]
async fn list_models(State(s): State<AppState>, Query(q): Query<ModelQuery>) -> ApiResult<Json<Vec<ModelRecord>>> {
    let store = s.store.clone();
    Ok(Json(blocking(move || store.models(q.prefix.as_deref())).await?))
}

/// Uploads a model's binary (creating its record if needed). A binary, once stored, never
/// changes: other bytes get 409.
#[utoipa::path(put, path = "/api/v1/models/{name}/{version}", tag = "models",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Exact version")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = ModelRecord), (status = 200, description = "The same bytes were already stored", body = ModelRecord), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)))]
async fn upload_model(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
    body: Body,
) -> ApiResult<(StatusCode, Json<ModelRecord>)> {
    let (tmp, digest, size) = receive(&s.store, body, MAX_MODEL_BYTES).await?;
    let actor = match authenticate(&s, &method, &uri, &headers, &digest)
        .and_then(|a| meter_bytes(&s, a.as_ref(), size, 0).map(|()| a))
    {
        Ok(a) => a,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    let store = s.store.clone();
    let (m, created) = blocking(move || {
        if let Err(e) = store.authorize(&name, actor.as_ref()) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        store.put_model_file(&name, &version, &tmp, digest, size)
    })
    .await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(m)))
}

/// Largest model binary accepted.
const MAX_MODEL_BYTES: u64 = 8 << 30;

/// Downloads a model's binary; `version` may be `latest`.
#[utoipa::path(get, path = "/api/v1/models/{name}/{version}", tag = "models",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Version or `latest`")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)))]
async fn download_model(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Response> {
    let store = s.store.clone();
    let (m, path) = blocking(move || {
        let m = store.model(&name, &version)?;
        let d =
            m.digest.ok_or_else(|| HubError::NotFound(format!("model {}@{} has no binary yet", m.name, m.version)))?;
        let p = store.blob_path(&d)?;
        Ok((m, p))
    })
    .await?;
    let digest = m.digest.expect("checked above");
    stream_file(path, &digest, Some(format!("{}-{}.safetensors", m.name, m.version))).await
}

/// Deletes a model and its binary.
#[utoipa::path(delete, path = "/api/v1/models/{name}/{version}", tag = "models",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Exact version")),
    responses((status = 200, body = ModelRecord), (status = 404, body = ErrorBody)))]
async fn delete_model(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<ModelRecord>> {
    let n = name.clone();
    Ok(Json(
        as_owner(&s, (&method, &uri, &headers), &Digest::of(b""), n, move |st| st.delete_model(&name, &version))
            .await?,
    ))
}

/// A model's record: metadata, lineage, digest; `version` may be `latest`.
#[utoipa::path(get, path = "/api/v1/models/{name}/{version}/meta", tag = "models",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Version or `latest`")),
    responses((status = 200, body = ModelRecord), (status = 404, body = ErrorBody)))]
async fn show_model(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<ModelRecord>> {
    let store = s.store.clone();
    Ok(Json(blocking(move || store.model(&name, &version)).await?))
}

/// Replaces a model's metadata (and lineage, when given).
#[utoipa::path(put, path = "/api/v1/models/{name}/{version}/meta", tag = "models",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Exact version")),
    request_body = ModelMeta,
    responses((status = 200, body = ModelRecord), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn update_model_meta(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<ModelRecord>> {
    let digest = Digest::of(&body);
    let body: ModelMeta = parse_json(&body)?;
    let n = name.clone();
    Ok(Json(
        as_owner(&s, (&method, &uri, &headers), &digest, n, move |st| {
            st.update_model_meta(&name, &version, &body.metadata, body.lineage.as_ref())
        })
        .await?,
    ))
}

/// A namespace and its owners.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct NamespaceBody {
    /// The namespace (the first segment of module paths).
    pub namespace: String,
    /// Keys that may publish in it (empty: unclaimed; the first signed publish claims it).
    pub owners: Vec<String>,
}

/// A namespace's owners.
#[utoipa::path(get, path = "/api/v1/namespaces/{namespace}", tag = "namespaces",
    params(("namespace" = String, Path, description = "The first segment of module paths")),
    responses((status = 200, body = NamespaceBody)))]
async fn show_namespace(State(s): State<AppState>, Path(namespace): Path<String>) -> ApiResult<Json<NamespaceBody>> {
    let store = s.store.clone();
    let ns = namespace.clone();
    let owners = blocking(move || store.owners(&ns)).await?.unwrap_or_default();
    Ok(Json(NamespaceBody { namespace, owners: owners.iter().map(ToString::to_string).collect() }))
}

fn parse_key(k: &str) -> ApiResult<PublicKey> {
    k.parse().map_err(|e: tessera_identity::KeyError| ApiError(HubError::BadRequest(e.to_string())))
}

/// Adds an owner to a namespace. The request must be signed by an owner (or, for an
/// unclaimed namespace, by the key that claims it).
#[utoipa::path(put, path = "/api/v1/namespaces/{namespace}/owners/{key}", tag = "namespaces",
    params(("namespace" = String, Path, description = "Namespace"), ("key" = String, Path, description = "The key to add, e.g. ed25519:…")),
    responses((status = 200, body = NamespaceBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn add_owner(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((namespace, key)): Path<(String, String)>,
) -> ApiResult<Json<NamespaceBody>> {
    change_owner(&s, &method, &uri, &headers, namespace, &key, false).await
}

/// Adds or removes an owner, for a request signed by an owner.
async fn change_owner(
    s: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    namespace: String,
    key: &str,
    remove: bool,
) -> ApiResult<Json<NamespaceBody>> {
    let actor = authenticate(s, method, uri, headers, &Digest::of(b""))?
        .ok_or_else(|| ApiError(HubError::Unauthorized(VerifyError::Missing.to_string())))?;
    let key = parse_key(key)?;
    let store = s.store.clone();
    let ns = namespace.clone();
    let owners =
        blocking(
            move || if remove { store.remove_owner(&ns, &actor, &key) } else { store.add_owner(&ns, &actor, &key) },
        )
        .await?;
    Ok(Json(NamespaceBody { namespace, owners: owners.iter().map(ToString::to_string).collect() }))
}

/// Removes an owner from a namespace (signed by an owner; the last owner stays).
#[utoipa::path(delete, path = "/api/v1/namespaces/{namespace}/owners/{key}", tag = "namespaces",
    params(("namespace" = String, Path, description = "Namespace"), ("key" = String, Path, description = "The key to remove")),
    responses((status = 200, body = NamespaceBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn remove_owner(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((namespace, key)): Path<(String, String)>,
) -> ApiResult<Json<NamespaceBody>> {
    change_owner(&s, &method, &uri, &headers, namespace, &key, true).await
}
