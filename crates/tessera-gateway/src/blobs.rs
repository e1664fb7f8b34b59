//! Blobs: outputs too large to inline, by digest.

use std::sync::Arc;

use axum::extract::{Extension, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tessera_core::Digest;

use crate::api::{ApiError, Gateway};
use crate::authz::Caller;

/// A blob by digest. On a node that checks grants, only the key whose call produced it
/// reads it (to others it does not exist); an open node serves any blob it holds.
#[utoipa::path(get, path = "/api/v1/blobs/{digest}", params(("digest" = String, Path, description = "b3:<hex>")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 400, body = Value), (status = 404, body = Value)))]
pub(crate) async fn blob(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let d: Digest = digest.parse().map_err(|e| ApiError::bad(format!("{digest:?}: {e}")))?;
    let missing = || ApiError::not_found(format!("no blob {d}"));
    if gw.checks_grants() && !gw.outputs.lock().unwrap_or_else(|p| p.into_inner()).owned_by(&d, &caller.account()) {
        return Err(missing());
    }
    match gw.node.blobs().get(&d).await.map_err(tessera_node::NodeError::from)? {
        Some(b) => Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/octet-stream")], b).into_response()),
        None => Err(missing()),
    }
}
