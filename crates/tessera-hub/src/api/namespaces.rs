//! Namespace routes: who owns a path prefix.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, Uri};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{authenticate, required};
use super::packages::parse_key;
use super::{ApiResult, AppState, ErrorBody, blocking};

/// A namespace and its owners.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct NamespaceBody {
    /// The namespace (the first segment of module paths).
    pub namespace: String,
    /// Keys that may write in it (empty: unclaimed; the first signed write claims it).
    pub owners: Vec<String>,
}

/// A namespace's owners.
#[utoipa::path(get, path = "/api/v1/namespaces/{namespace}", tag = "namespaces",
    params(("namespace" = String, Path, description = "The first segment of module paths")),
    responses((status = 200, body = NamespaceBody)))]
pub(super) async fn show_namespace(
    State(s): State<AppState>,
    Path(namespace): Path<String>,
) -> ApiResult<Json<NamespaceBody>> {
    let store = s.store.clone();
    let ns = namespace.clone();
    let owners = blocking(move || store.owners(&ns)).await?.unwrap_or_default();
    Ok(Json(NamespaceBody { namespace, owners: owners.iter().map(ToString::to_string).collect() }))
}

/// Adds an owner to a namespace. Signed by an owner; on an unclaimed namespace, the signer
/// claims it (the first signed write under a namespace claims it, whatever it writes).
#[utoipa::path(put, path = "/api/v1/namespaces/{namespace}/owners/{key}", tag = "namespaces",
    params(("namespace" = String, Path, description = "Namespace"), ("key" = String, Path, description = "The key to add, e.g. ed25519:…")),
    security(("tessera_signature" = [])),
    responses((status = 200, body = NamespaceBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn add_owner(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((namespace, key)): Path<(String, String)>,
) -> ApiResult<Json<NamespaceBody>> {
    change_owner(&s, (&method, &uri, &headers), namespace, &key, b"", false).await
}

/// Removes an owner from a namespace (signed by an owner; the last owner stays).
#[utoipa::path(delete, path = "/api/v1/namespaces/{namespace}/owners/{key}", tag = "namespaces",
    params(("namespace" = String, Path, description = "Namespace"), ("key" = String, Path, description = "The key to remove")),
    security(("tessera_signature" = [])),
    responses((status = 200, body = NamespaceBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn remove_owner(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((namespace, key)): Path<(String, String)>,
) -> ApiResult<Json<NamespaceBody>> {
    change_owner(&s, (&method, &uri, &headers), namespace, &key, b"", true).await
}

async fn change_owner(
    s: &AppState,
    request: (&Method, &Uri, &HeaderMap),
    namespace: String,
    key: &str,
    body: &[u8],
    remove: bool,
) -> ApiResult<Json<NamespaceBody>> {
    let (method, uri, headers) = request;
    let actor = required(authenticate(s, method, uri, headers, body, true)?, "owners are changed by owners")?;
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
