//! Actors: launch (get-or-create), list, show, kill.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use tessera_core::wire::{ActorInfo, LaunchRequest};
use tessera_node::{ActorError, ActorSpec};

use crate::api::{ApiError, Gateway, json_body};
use crate::authz::Caller;
use crate::forward::{FORWARDED, Target, forwardable};

/// Launches an actor (get-or-create), after the caller's grant for the module is checked:
/// a launch that is not granted never evicts anything.
#[utoipa::path(post, path = "/api/v1/actors", request_body = LaunchRequest,
    responses((status = 200, body = ActorInfo), (status = 400, body = Value), (status = 401, body = Value), (status = 403, body = Value), (status = 404, body = Value), (status = 409, body = Value), (status = 503, body = Value)))]
pub(crate) async fn launch(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: LaunchRequest = json_body(&body)?;
    let forward = forwardable(&headers);
    if let Some(node) = &req.node
        && node != gw.node.id()
    {
        if !forward {
            return Err(ApiError::bad(format!("this is node {}, not {node}", gw.node.id())));
        }
        if caller.key().is_some() {
            return Err(gw
                .node_target(node)
                .await?
                .elsewhere("the launch's target", "; a signed launch goes to it directly"));
        }
        let p = gw.node_target(node).await?;
        return gw.forward(&p, reqwest::Method::POST, "/api/v1/actors", Some(body)).await;
    }
    let digest = gw.resolve(&req.module).await?;
    let image = gw.node.module(&digest).await?;
    gw.authorize_launch(&caller, &image, req.priority, req.replicas)?;
    let spec =
        ActorSpec { module: digest, tag: req.tag, replicas: req.replicas, config: req.config, priority: req.priority };
    match gw.actors.launch(spec).await {
        Ok(info) => Ok((StatusCode::OK, Json(info)).into_response()),
        Err(ActorError::Elsewhere { placement, .. }) if forward && caller.key().is_none() => {
            let mut req: LaunchRequest = json_body(&body)?;
            req.node = Some(placement.node.clone());
            let body = Bytes::from(serde_json::to_vec(&req).map_err(|e| ApiError::bad(e.to_string()))?);
            gw.forward(&(&placement).into(), reqwest::Method::POST, "/api/v1/actors", Some(body)).await
        }
        Err(e) => Err(e.into()),
    }
}

/// `scope=local`: this node's actors only.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// `local` for this node's actors only; the default is the whole cluster.
    #[serde(default)]
    scope: Option<String>,
}

/// The cluster's actors (this node's, and those the other live nodes' gateways list). On a
/// node that checks grants, only actors the caller has a grant for.
#[utoipa::path(get, path = "/api/v1/actors", params(ListQuery), responses((status = 200, body = Vec<ActorInfo>)))]
pub(crate) async fn list_actors(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<ActorInfo>>, ApiError> {
    let mut all = gw.actors.list().await;
    if q.scope.as_deref() != Some("local") {
        // Cluster-wide: ask every other live node's gateway for its own.
        let nodes = tessera_node::list_nodes(gw.node.members().as_ref()).await.map_err(ApiError::backend)?;
        for r in nodes.into_iter().filter(|r| r.id != gw.node.id()) {
            let Some(endpoint) = r.endpoint else { continue };
            let url = format!("{}/api/v1/actors?scope=local", endpoint.trim_end_matches('/'));
            match gw.http.get(&url).header(FORWARDED, gw.node.id()).send().await {
                Ok(resp) if resp.status().is_success() => match resp.json::<Vec<ActorInfo>>().await {
                    Ok(list) => all.extend(list),
                    Err(e) => tracing::warn!(node = %r.id, "bad actor list: {e}"),
                },
                Ok(resp) => tracing::warn!(node = %r.id, "actor list: HTTP {}", resp.status()),
                Err(e) => tracing::warn!(node = %r.id, "actor list: {e}"),
            }
        }
    }
    if gw.checks_grants() {
        all.retain(|a| {
            let module = a.module.split('@').next().unwrap_or_default();
            gw.authorize_module_name(&caller, module).is_ok()
        });
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(all))
}

/// One actor: here, or where it runs in the cluster.
#[utoipa::path(get, path = "/api/v1/actors/{name}", params(("name" = String, Path, description = "The actor")),
    responses((status = 200, body = Value), (status = 403, body = Value), (status = 404, body = Value)))]
pub(crate) async fn show_actor(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let Some(module) = gw.module_of_actor(&name).await? else {
        return Err(ActorError::NotFound(name).into());
    };
    gw.authorize_module_name(&caller, &module)?;
    if let Some(a) = gw.actors.list().await.into_iter().find(|a| a.name == name) {
        return Ok(Json(a).into_response());
    }
    match gw.actors.locate(&name).await? {
        Some(p) => {
            Ok(Json(json!({"name": name, "node": p.node, "endpoint": p.endpoint, "digest": p.digest})).into_response())
        }
        None => Err(ActorError::NotFound(name).into()),
    }
}

/// Stops an actor (its state, if it has hooks, is kept for its next launch).
#[utoipa::path(delete, path = "/api/v1/actors/{name}", params(("name" = String, Path, description = "The actor")),
    responses((status = 200, body = ActorInfo), (status = 403, body = Value), (status = 404, body = Value), (status = 421, body = Value)))]
pub(crate) async fn kill(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let Some(module) = gw.module_of_actor(&name).await? else {
        return Err(ActorError::NotFound(name).into());
    };
    match gw.actors.image(&name).await {
        Some(image) => gw.authorize_module(&caller, &image)?,
        None => gw.authorize_module_name(&caller, &module)?,
    }
    match gw.actors.kill(&name).await {
        Ok(info) => Ok(Json(info).into_response()),
        Err(ActorError::NotFound(_)) if forwardable(&headers) => match gw.actors.locate(&name).await? {
            Some(p) if p.node != gw.node.id() && caller.key().is_some() => {
                Err(Target::from(&p).elsewhere(&name, "; a signed kill goes to that node directly"))
            }
            Some(p) if p.node != gw.node.id() => {
                gw.forward(&(&p).into(), reqwest::Method::DELETE, &format!("/api/v1/actors/{name}"), None).await
            }
            _ => Err(ActorError::NotFound(name).into()),
        },
        Err(e) => Err(e.into()),
    }
}
