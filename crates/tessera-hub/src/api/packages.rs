//! Package routes: publish, list, show, download, delete, aliases, grants, blobs, usage.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tessera_core::Digest;
use tessera_core::registry::PackageRecord;
use tessera_identity::{PACKAGE_SIGNATURE_HEADER, PackageSignature, PublicKey, now_ms};
use utoipa::ToSchema;

use super::auth::{authenticate, check_headers, check_quota, meter_bytes, read_signer, required, upload_slot};
use super::body::{check_length, declared_package, expected_digest, private_manifest, receive};
use super::download::{sent_bytes, serve_download, whole_download};
use super::{ApiError, ApiResult, AppState, ErrorBody, blocking, parse_json};
use crate::store::{GrantRecord, HubError, ListQuery, PublishCheck, UsageRecord};

/// The package signature header, if any. A package signature and a request signature, when
/// both are present, must be by the same key; when the policy requires signatures, the
/// package must be signed.
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
    if s.policy.require_signatures && sig.is_none() {
        return Err(ApiError(HubError::Unauthorized(format!("packages must be signed ({PACKAGE_SIGNATURE_HEADER})"))));
    }
    if let (Some(sig), Some(signer)) = (&sig, signer)
        && &sig.key != signer
    {
        return Err(ApiError(HubError::Forbidden(
            "the package must be signed by the key that signs the request".into(),
        )));
    }
    Ok(sig)
}

/// Publishes a package: the body is the package bytes. With `x-tessera-digest`, the bytes
/// must have that digest; with `x-tessera-package: name@version`, the hub authorizes the
/// upload before reading it and checks the package holds that. Publishing the same bytes
/// again is a no-op (200); other bytes under an existing version (build metadata aside)
/// are refused (409) and change nothing. A sealed package (private) declares its manifest
/// in `x-tessera-manifest`, of which only the public part is kept.
#[utoipa::path(
    post,
    path = "/api/v1/packages",
    tag = "packages",
    params(
        ("x-tessera-digest" = Option<String>, Header, description = "Expected BLAKE3 digest of the body, b3:<hex>"),
        ("x-tessera-package" = Option<String>, Header, description = "The name@version the package holds (lets the hub refuse an unauthorized upload before reading it)"),
        ("x-tessera-package-signature" = Option<String>, Header, description = "The publisher's signature over the package digest"),
        ("x-tessera-manifest" = Option<String>, Header, description = "A private package's declared manifest (base64url JSON)")
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A package made by `tessera module pack`"),
    security((), ("tessera_signature" = [])),
    responses(
        (status = 201, description = "Published", body = PackageRecord),
        (status = 200, description = "This exact package was already published", body = PackageRecord),
        (status = 400, description = "Malformed or unsafe package, bad manifest, or digest mismatch", body = ErrorBody),
        (status = 401, description = "Unsigned or badly signed", body = ErrorBody),
        (status = 403, description = "The signer does not own the namespace", body = ErrorBody),
        (status = 409, description = "The version exists with other content", body = ErrorBody),
        (status = 413, description = "Over the size limit", body = ErrorBody),
        (status = 429, description = "Too many uploads in progress for this account, or over its quota", body = ErrorBody)
    )
)]
pub(super) async fn publish_package(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<PackageRecord>)> {
    // Everything the headers can tell, before a byte of the body.
    let auth = check_headers(&s, &method, &uri, &headers, true)?;
    let sig = package_signature(&s, &headers, auth.signer())?;
    // Who acts is who signed the request: a package signature proves who made the bytes,
    // not who sends them (it is public, on the package's record).
    let actor = auth.signer().cloned();
    let expected = expected_digest(&headers)?;
    let private = if headers.contains_key(super::MANIFEST_HEADER) { Some(private_manifest(&headers)?) } else { None };
    let declared = match &private {
        Some(m) => Some((m.name.to_string(), m.version.to_string())),
        None => declared_package(&headers)?,
    };
    match &declared {
        Some((name, _)) => {
            let (store, name, a) = (s.store.clone(), name.clone(), actor.clone());
            blocking(move || store.may_write(&name, a.as_ref())).await?;
        }
        // A hub that checks signatures checks them before it reads a byte: the upload says
        // what it holds.
        None if s.policy.require_signatures => {
            return Err(ApiError(HubError::BadRequest(format!(
                "say what the package holds, in {} (name@version) or, for a private package, {} (its manifest): this hub authorizes uploads before reading them",
                super::PACKAGE_HEADER,
                super::MANIFEST_HEADER
            ))));
        }
        None => {}
    }
    if private.is_some() && actor.is_none() {
        return Err(ApiError(HubError::Unauthorized(format!(
            "private packages are published with a signed request ({})",
            tessera_identity::envelope::HEADER
        ))));
    }
    let limit = s.store.limits().max_package_bytes;
    check_length(&headers, limit)?;
    let _slot = upload_slot(&s, actor.as_ref())?;
    check_quota(&s, actor.as_ref(), 0)?;
    let r = receive(&s.store, body, limit).await?;
    let tmp = r.tmp.clone();
    let outcome = async {
        let signer = auth.finish(&s, &r.body_digest)?;
        meter_bytes(&s, signer.as_ref(), r.size, 0)?;
        let sealed = {
            let mut head = [0u8; 7];
            let mut f = tokio::fs::File::open(&r.tmp).await.map_err(HubError::from)?;
            let n = tokio::io::AsyncReadExt::read(&mut f, &mut head).await.map_err(HubError::from)?;
            tessera_identity::seal::is_sealed(&head[..n])
        };
        let store = s.store.clone();
        let actor = signer.or(actor);
        if sealed {
            let Some(declared) = private else {
                return Err(ApiError(HubError::BadRequest(format!(
                    "a private package needs its manifest declared in {}",
                    super::MANIFEST_HEADER
                ))));
            };
            let Some(sig) = sig else {
                return Err(ApiError(HubError::Unauthorized(format!(
                    "private packages must be signed ({PACKAGE_SIGNATURE_HEADER})"
                ))));
            };
            blocking(move || store.publish_private(&r.tmp, r.digest, r.size, &declared, &sig, actor.as_ref())).await
        } else {
            if private.is_some() {
                return Err(ApiError(HubError::BadRequest(format!(
                    "{} is for sealed packages; this one is not sealed",
                    super::MANIFEST_HEADER
                ))));
            }
            let check = PublishCheck { expected, declared, signature: sig };
            blocking(move || store.publish_file(&r.tmp, r.digest, r.size, &check, actor.as_ref())).await
        }
    }
    .await;
    if outcome.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    let p = outcome?;
    let status = if p.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(p.record)))
}

/// Lists packages: the latest version of each, or every version with `all=true`. Private
/// packages show only their public manifest.
#[utoipa::path(get, path = "/api/v1/packages", tag = "packages", params(ListQuery), responses((status = 200, body = Vec<PackageRecord>), (status = 400, body = ErrorBody)))]
pub(super) async fn list_packages(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Vec<PackageRecord>>> {
    let store = s.store.clone();
    Ok(Json(blocking(move || store.list(&q)).await?))
}

/// Every published version of a package, oldest first.
#[utoipa::path(get, path = "/api/v1/packages/{name}", tag = "packages", params(("name" = String, Path, description = "Module path")), responses((status = 200, body = Vec<PackageRecord>), (status = 400, body = ErrorBody)))]
pub(super) async fn package_versions(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<PackageRecord>>> {
    let store = s.store.clone();
    Ok(Json(blocking(move || store.versions(&name)).await?))
}

/// One version (or alias, such as `latest`) of a package, with its manifest (the public
/// part, for a private package).
#[utoipa::path(get, path = "/api/v1/packages/{name}/{version}", tag = "packages",
    params(("name" = String, Path, description = "Module path"), ("version" = String, Path, description = "Version or alias (`latest`)")),
    responses((status = 200, body = PackageRecord), (status = 404, body = ErrorBody)))]
pub(super) async fn show_package(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<PackageRecord>> {
    let store = s.store.clone();
    Ok(Json(blocking(move || store.resolve_str(&name, &version)).await?))
}

/// Deletes a version (signed by an owner). Its number stays reserved: only the same bytes
/// can be published under it again.
#[utoipa::path(delete, path = "/api/v1/packages/{name}/{version}", tag = "packages",
    params(("name" = String, Path, description = "Module path"), ("version" = String, Path, description = "Exact version")),
    security((), ("tessera_signature" = [])),
    responses((status = 200, body = PackageRecord), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn delete_package(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<PackageRecord>> {
    let actor = authenticate(&s, &method, &uri, &headers, b"", true)?;
    let store = s.store.clone();
    Ok(Json(blocking(move || store.delete(&name, &version, actor.as_ref())).await?))
}

/// Downloads a package by name and version or alias. A private package's ciphertext is
/// served only to a signed request by an owner or a key with a live grant.
#[utoipa::path(get, path = "/api/v1/packages/{name}/{version}/download", tag = "packages",
    params(("name" = String, Path, description = "Module path"), ("version" = String, Path, description = "Version or alias (`latest`)")),
    security((), ("tessera_signature" = [])),
    responses((status = 200, description = "The package bytes; x-tessera-digest names them", content_type = "application/octet-stream", body = Vec<u8>), (status = 206, description = "One range of it (Range: bytes=...)", content_type = "application/octet-stream", body = Vec<u8>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 416, description = "A range that cannot be served", body = ErrorBody)))]
pub(super) async fn download_package(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Response> {
    let reader = read_signer(&s, &method, &uri, &headers)?;
    let store = s.store.clone();
    let r2 = reader.clone();
    let (record, download) = blocking(move || {
        let r = store.resolve_str(&name, &version)?;
        store.check_read(&r, r2.as_ref(), now_ms())?;
        let d = store.blob_download(&r.digest)?;
        Ok((r, d))
    })
    .await?;
    let filename = Some(format!("{}-{}.tpkg", record.name, record.version));
    let resp = serve_download(download, &record.digest, filename, &method, &headers).await?;
    meter_bytes(&s, reader.as_ref(), 0, sent_bytes(&method, &resp))?;
    if whole_download(&method, &resp) {
        let (store, n, v) = (s.store.clone(), record.name.clone(), record.version.clone());
        blocking(move || store.count_package_download(&n, &v)).await?;
    }
    Ok(resp)
}

/// The body of an alias update.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct AliasBody {
    /// The version the alias points at.
    pub version: String,
}

/// Points an alias (e.g. `stable`) at a published version (signed by an owner). `latest` is
/// computed and cannot be set.
#[utoipa::path(put, path = "/api/v1/packages/{name}/aliases/{alias}", tag = "packages",
    params(("name" = String, Path, description = "Module path"), ("alias" = String, Path, description = "Alias name")),
    request_body = AliasBody,
    security((), ("tessera_signature" = [])),
    responses((status = 200, body = PackageRecord), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn set_alias(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, alias)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<PackageRecord>> {
    let actor = authenticate(&s, &method, &uri, &headers, &body, true)?;
    let body: AliasBody = parse_json(&body)?;
    let store = s.store.clone();
    Ok(Json(blocking(move || store.set_alias(&name, &alias, &body.version, actor.as_ref())).await?))
}

/// Downloads any blob the hub serves (a package or a model binary) by digest; a private
/// package's only as [`download_package`] allows.
#[utoipa::path(get, path = "/api/v1/blobs/{digest}", tag = "hub",
    params(("digest" = String, Path, description = "b3:<hex>")),
    security((), ("tessera_signature" = [])),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 206, description = "One range of it (Range: bytes=...)", content_type = "application/octet-stream", body = Vec<u8>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 416, description = "A range that cannot be served", body = ErrorBody)))]
pub(super) async fn download_blob(
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
    let (download, package) = blocking(move || {
        let mut package = None;
        if let Some(record) = store.published_by_digest(&digest)? {
            store.check_read(&record, r2.as_ref(), now_ms())?;
            package = Some((record.name, record.version));
        }
        Ok((store.blob_download(&digest)?, package))
    })
    .await?;
    let resp = serve_download(download, &digest, None, &method, &headers).await?;
    meter_bytes(&s, reader.as_ref(), 0, sent_bytes(&method, &resp))?;
    // Nodes fetch packages by digest: a download of that version.
    if whole_download(&method, &resp)
        && let Some((n, v)) = package
    {
        let store = s.store.clone();
        blocking(move || store.count_package_download(&n, &v)).await?;
    }
    Ok(resp)
}

/// The record of a live package by digest.
#[utoipa::path(get, path = "/api/v1/digests/{digest}", tag = "packages",
    params(("digest" = String, Path, description = "b3:<hex>")),
    responses((status = 200, body = PackageRecord), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn package_by_digest(
    State(s): State<AppState>,
    Path(digest): Path<String>,
) -> ApiResult<Json<PackageRecord>> {
    let digest: Digest =
        digest.parse().map_err(|e: tessera_core::digest::DigestError| HubError::BadRequest(e.to_string()))?;
    let store = s.store.clone();
    Ok(Json(blocking(move || store.by_digest(&digest)).await?))
}

/// A grant to set.
#[derive(Deserialize, Serialize, ToSchema, Default)]
pub struct GrantBody {
    /// When the grant ends (`YYYY-MM-DDTHH:MM:SSZ`), if ever; it must be in the future.
    #[serde(default)]
    pub expires: Option<String>,
}

/// Who may read a private package (signed by an owner).
#[utoipa::path(get, path = "/api/v1/packages/{name}/grants", tag = "packages",
    params(("name" = String, Path, description = "Module path")),
    security(("tessera_signature" = [])),
    responses((status = 200, body = Vec<GrantRecord>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn list_grants(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<GrantRecord>>> {
    let actor = required(read_signer(&s, &method, &uri, &headers)?, "grants are shown to the namespace's owners")?;
    let store = s.store.clone();
    Ok(Json(
        blocking(move || {
            store.check_owner(&name, &actor)?;
            store.grants(&name)
        })
        .await?,
    ))
}

/// Grants (or renews) a key the right to read a private package (signed by an owner).
/// Refused unless a live version was sealed for that key, and unless `expires` is in the
/// future.
#[utoipa::path(put, path = "/api/v1/packages/{name}/grants/{key}", tag = "packages",
    params(("name" = String, Path, description = "Module path"), ("key" = String, Path, description = "The grantee's key")),
    request_body = GrantBody,
    security(("tessera_signature" = [])),
    responses((status = 200, body = GrantRecord), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn set_grant(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, key)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<GrantRecord>> {
    let actor = required(authenticate(&s, &method, &uri, &headers, &body, true)?, "grants are set by owners")?;
    let grant: GrantBody = if body.is_empty() { GrantBody::default() } else { parse_json(&body)? };
    let expires_ms = match &grant.expires {
        Some(t) => Some(
            tessera_core::time::parse_rfc3339(t)
                .map_err(|e| ApiError(HubError::BadRequest(e)))?
                .checked_mul(1000)
                .ok_or_else(|| ApiError(HubError::BadRequest(format!("expires {t:?} is out of range"))))?,
        ),
        None => None,
    };
    let key = parse_key(&key)?;
    let store = s.store.clone();
    Ok(Json(blocking(move || store.set_grant(&name, &key, expires_ms, now_ms(), Some(&actor))).await?))
}

/// Revokes a grant (signed by an owner): the key can no longer download the package.
#[utoipa::path(delete, path = "/api/v1/packages/{name}/grants/{key}", tag = "packages",
    params(("name" = String, Path, description = "Module path"), ("key" = String, Path, description = "The grantee's key")),
    security(("tessera_signature" = [])),
    responses((status = 200, body = GrantRecord), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_grant(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((name, key)): Path<(String, String)>,
) -> ApiResult<Json<GrantRecord>> {
    let actor = required(authenticate(&s, &method, &uri, &headers, b"", true)?, "grants are revoked by owners")?;
    let key = parse_key(&key)?;
    let store = s.store.clone();
    Ok(Json(blocking(move || store.revoke(&name, &key, Some(&actor))).await?))
}

/// What an account has used on this hub: signed requests and bytes moved. Readable by the
/// account itself (sign the request with it).
#[utoipa::path(get, path = "/api/v1/accounts/{key}/usage", tag = "hub",
    params(("key" = String, Path, description = "The account's key")),
    security(("tessera_signature" = [])),
    responses((status = 200, body = UsageRecord), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn account_usage(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> ApiResult<Json<UsageRecord>> {
    let key = parse_key(&key)?;
    let actor = required(read_signer(&s, &method, &uri, &headers)?, "an account's usage is shown to that account")?;
    if actor != key {
        return Err(ApiError(HubError::Forbidden("an account's usage is shown to that account only".into())));
    }
    let store = s.store.clone();
    Ok(Json(blocking(move || store.usage(&key)).await?))
}

pub(super) fn parse_key(k: &str) -> ApiResult<PublicKey> {
    k.parse().map_err(|e: tessera_identity::KeyError| ApiError(HubError::BadRequest(e.to_string())))
}

/// A package version's card, from the `README.md` it holds (its facts and Markdown text);
/// `version` may be an alias. 404 when it has none (private packages never have one: the
/// hub cannot read them).
#[utoipa::path(get, path = "/api/v1/packages/{name}/{version}/card", tag = "packages",
    params(("name" = String, Path, description = "Module path"), ("version" = String, Path, description = "Version or alias")),
    responses((status = 200, body = tessera_core::card::Card), (status = 404, body = ErrorBody)))]
pub(super) async fn package_card(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<tessera_core::card::Card>> {
    let store = s.store.clone();
    Ok(Json(
        blocking(move || {
            let r = store.resolve_str(&name, &version)?;
            r.card.ok_or_else(|| HubError::NotFound(format!("{}@{} has no README.md card", r.name, r.version)))
        })
        .await?,
    ))
}
