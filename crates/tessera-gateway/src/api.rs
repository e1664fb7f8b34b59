//! Routes, request and response types, error mapping and forwarding.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, OriginalUri, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_core::wire::{CallOutput, CallRequest, CallResponse, LaunchRequest};
use tessera_core::{Digest, PackageRef};
use tessera_identity::envelope::HEADER as SIGNATURE_HEADER;
use tessera_identity::{Envelope, PublicKey, Verifier, now_ms};
use tessera_node::actors::Placement;
use tessera_node::{ActorError, ActorInfo, ActorSpec, Actors, Node, NodeError};
use tessera_ports::{BusError, RuntimeError};

/// The header marking a request one gateway forwarded to another (never forwarded again).
const FORWARDED: &str = "x-tessera-forwarded";

/// What a gateway allows and how large things may be.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// A call to an actor that is not running launches it from the module of that name.
    pub spawn_on_call: bool,
    /// Outputs up to this size come back in the response; larger ones go to the blob store.
    pub inline_limit: usize,
    /// The time-out of a call that names none.
    pub default_timeout: Duration,
    /// The longest time-out a call may ask for.
    pub max_timeout: Duration,
    /// The bound of a queue (puts beyond it are refused with 429 until a get makes room).
    pub queue_capacity: u64,
    /// The largest request body.
    pub max_body: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            spawn_on_call: true,
            inline_limit: 1 << 20,
            default_timeout: Duration::from_secs(60),
            max_timeout: Duration::from_secs(3600),
            queue_capacity: 1024,
            max_body: 64 << 20,
        }
    }
}

/// A node's gateway: its actors, its bus and blobs, and a client to reach other gateways.
pub struct Gateway {
    node: Arc<Node>,
    actors: Arc<Actors>,
    config: GatewayConfig,
    http: reqwest::Client,
    calls: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// Checks signed requests (addressed to the node's key), when the node has a key.
    verifier: Option<Verifier>,
}

impl Gateway {
    /// A gateway over `node`'s `actors`.
    pub fn new(node: Arc<Node>, actors: Arc<Actors>, config: GatewayConfig) -> Arc<Self> {
        let http = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(30)).build().unwrap_or_default();
        let verifier = node.record().key.and_then(|k| k.parse::<PublicKey>().ok()).map(Verifier::new);
        Arc::new(Gateway { node, actors, config, http, calls: Mutex::new(HashMap::new()), verifier })
    }

    /// The actors it serves.
    pub fn actors(&self) -> &Arc<Actors> {
        &self.actors
    }
}

/// The gateway's routes.
pub fn app(gw: Arc<Gateway>) -> Router {
    let max_body = gw.config.max_body;
    let api = Router::new()
        .route("/health", get(health))
        .route("/call", post(call))
        .route("/calls/{id}/cancel", post(cancel))
        .route("/actors", get(list_actors).post(launch))
        .route("/actors/{name}", get(show_actor).delete(kill))
        .route("/queues/{name}", get(queue_len).post(queue_put))
        .route("/queues/{name}/get", post(queue_get))
        .route("/blobs/{digest}", get(blob));
    Router::new().route("/call", post(call)).nest("/api/v1", api).layer(DefaultBodyLimit::max(max_body)).with_state(gw)
}

/// An error as the API reports it.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, message: message.into() }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.message, "kind": self.kind}))).into_response()
    }
}

impl From<ActorError> for ApiError {
    fn from(e: ActorError) -> Self {
        let message = e.to_string();
        let (status, kind) = match &e {
            ActorError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ActorError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ActorError::NoRoom { .. } => (StatusCode::SERVICE_UNAVAILABLE, "no_room"),
            ActorError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ActorError::Elsewhere { .. } => (StatusCode::MISDIRECTED_REQUEST, "elsewhere"),
            ActorError::Runtime(r) => runtime_status(r),
            ActorError::Node(NodeError::Runtime(r)) => runtime_status(r),
            ActorError::Node(NodeError::Refused(m)) if m.starts_with("unsigned") => {
                (StatusCode::UNAUTHORIZED, "unauthorized")
            }
            ActorError::Node(NodeError::Refused(_)) => (StatusCode::FORBIDDEN, "refused"),
            ActorError::Node(NodeError::Package(tessera_node::cache::CacheError::Source(
                tessera_ports::SourceError::NotFound(_),
            ))) => (StatusCode::NOT_FOUND, "not_found"),
            ActorError::Node(_) => (StatusCode::INTERNAL_SERVER_ERROR, "node"),
        };
        ApiError::new(status, kind, message)
    }
}

fn runtime_status(r: &RuntimeError) -> (StatusCode, &'static str) {
    match r {
        RuntimeError::Module(_) => (StatusCode::UNPROCESSABLE_ENTITY, "module_error"),
        RuntimeError::Trap(_) | RuntimeError::Gone(_) => (StatusCode::INTERNAL_SERVER_ERROR, "crashed"),
        RuntimeError::TimeLimit { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        RuntimeError::MemoryLimit { .. } => (StatusCode::INSUFFICIENT_STORAGE, "limit"),
        RuntimeError::Load(_) => (StatusCode::INTERNAL_SERVER_ERROR, "load"),
        RuntimeError::Unsupported(_) => (StatusCode::NOT_IMPLEMENTED, "unsupported"),
    }
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> Self {
        match &e {
            BusError::Name(_) => ApiError::bad(e.to_string()),
            BusError::TooLarge { .. } => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string()),
            BusError::Full(_) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", e.to_string()),
            BusError::Backend(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "backend", e.to_string()),
        }
    }
}

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("malformed request: {e}")))
}

/// Another node's gateway, where a request is forwarded.
struct Target {
    node: String,
    endpoint: Option<String>,
}

impl Target {
    /// The answer to a request that must go to this node instead: `what` runs there.
    fn elsewhere(&self, what: &str, why: &str) -> ApiError {
        let at = self.endpoint.as_deref().map(|e| format!(" at {e}")).unwrap_or_default();
        ApiError::new(StatusCode::MISDIRECTED_REQUEST, "elsewhere", format!("{what} is on node {}{at}{why}", self.node))
    }
}

impl From<&Placement> for Target {
    fn from(p: &Placement) -> Self {
        Target { node: p.node.clone(), endpoint: p.endpoint.clone() }
    }
}

async fn health(State(gw): State<Arc<Gateway>>) -> Json<Value> {
    let r = gw.node.record();
    Json(json!({"status": "ok", "node": r.id, "key": r.key, "actors": gw.actors.list().await.len()}))
}

impl Gateway {
    /// The signer of a request (checked: window, audience = this node's key, method, path,
    /// body, replay), or `None` for an unsigned one; unsigned requests are refused when the
    /// node's policy wants signed tasks.
    fn authenticate(
        &self,
        headers: &HeaderMap,
        method: &str,
        uri: &axum::http::Uri,
        body: &[u8],
    ) -> Result<Option<PublicKey>, ApiError> {
        let unauthorized = |m: String| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let Some(h) = headers.get(SIGNATURE_HEADER) else {
            if self.node.policy().require_signed_tasks {
                return Err(unauthorized(format!(
                    "unsigned request; this node takes only signed requests ({SIGNATURE_HEADER})"
                )));
            }
            return Ok(None);
        };
        let Some(v) = &self.verifier else {
            return Err(unauthorized("the request is signed, but this node has no key to check it".into()));
        };
        let text = h.to_str().map_err(|_| unauthorized(format!("{SIGNATURE_HEADER} is not text")))?;
        let env = Envelope::parse(text).map_err(|e| unauthorized(format!("{SIGNATURE_HEADER}: {e}")))?;
        let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
        v.verify_envelope(&env, method, path, &Digest::of(body), now_ms())
            .map(Some)
            .map_err(|e| unauthorized(format!("signature: {e}")))
    }
}

fn kind_of(bytes: &[u8]) -> &'static str {
    if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok() {
        "json"
    } else if safetensors::SafeTensors::deserialize(bytes).is_ok() {
        "tensor"
    } else {
        "bytes"
    }
}

/// Whether a request may be forwarded (it was not forwarded already).
fn forwardable(headers: &HeaderMap) -> bool {
    !headers.contains_key(FORWARDED)
}

impl Gateway {
    async fn forward(
        &self,
        placement: &Target,
        method: reqwest::Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Response, ApiError> {
        let Some(endpoint) = &placement.endpoint else {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "unreachable",
                format!("the actor runs on node {}, which has no gateway", placement.node),
            ));
        };
        let url = format!("{}{path}", endpoint.trim_end_matches('/'));
        let mut req = self.http.request(method, &url).header(FORWARDED, self.node.id());
        if let Some(b) = body {
            req = req.header(header::CONTENT_TYPE, "application/json").body(b);
        }
        let resp = req.send().await.map_err(|e| {
            ApiError::new(StatusCode::BAD_GATEWAY, "unreachable", format!("node {} at {url}: {e}", placement.node))
        })?;
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let bytes = resp.bytes().await.map_err(|e| {
            ApiError::new(StatusCode::BAD_GATEWAY, "unreachable", format!("node {} at {url}: {e}", placement.node))
        })?;
        Ok((status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response())
    }

    async fn node_target(&self, node: &str) -> Result<Target, ApiError> {
        let nodes = tessera_node::list_nodes(self.node.members().as_ref())
            .await
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "backend", e.to_string()))?;
        let r = nodes
            .into_iter()
            .find(|r| r.id == node)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no live node {node:?}")))?;
        Ok(Target { node: r.id, endpoint: r.endpoint })
    }

    /// Resolves a module reference to a package digest and the actor name it launches as.
    async fn resolve(&self, module: &str) -> Result<Digest, ApiError> {
        let r: PackageRef = module.parse().map_err(|e| ApiError::bad(format!("module {module:?}: {e}")))?;
        Ok(self.node.resolve(&r).await.map_err(ActorError::from)?.digest)
    }

    async fn call_local(&self, req: &CallRequest, name: &str, timeout: Duration) -> Result<CallResponse, ActorError> {
        let mut inputs = Vec::with_capacity(req.inputs.len());
        for (k, v) in &req.inputs {
            let bytes = B64.decode(v).map_err(|e| ActorError::Invalid(format!("input {k:?} is not base64: {e}")))?;
            inputs.push((k.clone(), Bytes::from(bytes)));
        }
        let outputs = self.actors.call(name, &req.function, &req.args, &req.kwargs, inputs, timeout).await?;
        let mut result = Value::Null;
        let mut out = BTreeMap::new();
        for (n, bytes) in outputs {
            let kind = kind_of(&bytes);
            let small = bytes.len() <= self.config.inline_limit;
            if n == "result" && kind == "json" && small {
                result = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            }
            let (inline, digest) = if small {
                (Some(B64.encode(&bytes)), None)
            } else {
                let d = self.node.blobs().put(bytes.clone()).await.map_err(NodeError::from)?;
                (None, Some(d))
            };
            out.insert(n, CallOutput { size: bytes.len() as u64, kind: kind.into(), inline, digest });
        }
        Ok(CallResponse { actor: name.to_owned(), node: self.node.id().to_owned(), result, outputs: out })
    }

    async fn do_call(
        &self,
        req: CallRequest,
        body: Bytes,
        forward: bool,
        signer: Option<PublicKey>,
    ) -> Result<Response, ApiError> {
        if matches!(req.function.as_str(), "save_state" | "restore_state") {
            return Err(ApiError::bad(format!("{} is a state hook; the node calls it", req.function)));
        }
        let timeout = match req.timeout {
            None => self.config.default_timeout,
            Some(t) if t.is_finite() && t > 0.0 => Duration::from_secs_f64(t).min(self.config.max_timeout),
            Some(t) => return Err(ApiError::bad(format!("timeout {t}: must be a positive number of seconds"))),
        };
        // `path@version` and digests name a module; anything else names an actor.
        let by_module = req.module.contains('@') || req.module.starts_with("b3:");
        let name = if by_module {
            let digest = self.resolve(&req.module).await?;
            let image = self.node.module(&digest).await.map_err(ActorError::from)?;
            image.manifest.name.to_string()
        } else {
            tessera_core::pipeline::check_actor_name(&req.module).map_err(ApiError::bad)?;
            req.module.clone()
        };
        if let Some(image) = self.actors.image(&name).await {
            self.node.authorize_call(&image, &req.function, signer.as_ref()).await.map_err(ActorError::from)?;
            match self.call_local(&req, &name, timeout).await {
                Err(ActorError::NotFound(_)) => {}
                other => return Ok(Json(other?).into_response()),
            }
        }
        // Not here: elsewhere in the cluster, or to be launched.
        if let Some(p) = self.actors.locate(&name).await?
            && p.node != self.node.id()
        {
            return self.forward_call(&p, &name, body, forward, signer.is_some()).await;
        }
        if !self.config.spawn_on_call {
            return Err(ActorError::NotFound(name).into());
        }
        let module = if by_module { req.module.clone() } else { name.clone() };
        let digest = match self.resolve(&module).await {
            Ok(d) => d,
            Err(e) if e.status == StatusCode::NOT_FOUND => return Err(ActorError::NotFound(name).into()),
            Err(e) => return Err(e),
        };
        let image = self.node.module(&digest).await.map_err(ActorError::from)?;
        self.node.authorize_call(&image, &req.function, signer.as_ref()).await.map_err(ActorError::from)?;
        let spec = ActorSpec { module: digest, tag: None, replicas: 1, config: json!({}), priority: 0 };
        match self.actors.launch(spec).await {
            Ok(info) => {
                tracing::info!(actor = %info.name, "launched by a call");
                Ok(Json(self.call_local(&req, &info.name, timeout).await?).into_response())
            }
            Err(ActorError::Elsewhere { placement, .. }) => {
                self.forward_call(&placement, &name, body, forward, signer.is_some()).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends a call to the node running the actor. A signed call is addressed to this node,
    /// so it cannot be forwarded: the caller is told where to sign it for.
    async fn forward_call(
        &self,
        p: &Placement,
        name: &str,
        body: Bytes,
        forward: bool,
        signed: bool,
    ) -> Result<Response, ApiError> {
        if !forward || signed {
            let why = if signed { "; a signed call goes to that node directly" } else { "" };
            return Err(Target::from(p).elsewhere(name, why));
        }
        self.forward(&p.into(), reqwest::Method::POST, "/api/v1/call", Some(body)).await
    }
}

async fn call(
    State(gw): State<Arc<Gateway>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let signer = gw.authenticate(&headers, "POST", &uri, &body)?;
    let req: CallRequest = json_body(&body)?;
    let forward = forwardable(&headers);
    let Some(id) = req.id.clone() else {
        return gw.do_call(req, body, forward, signer).await;
    };
    tessera_core::name::check_ident("call id", &id).map_err(|e| ApiError::bad(e.to_string()))?;
    // A call with an id runs as its own task, so `POST /calls/<id>/cancel` can stop it.
    let task = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.do_call(req, body, forward, signer).await })
    };
    {
        let mut calls = gw.calls.lock().unwrap_or_else(|p| p.into_inner());
        if calls.contains_key(&id) {
            task.abort();
            return Err(ApiError::new(StatusCode::CONFLICT, "duplicate", format!("a call with id {id:?} is running")));
        }
        calls.insert(id.clone(), task.abort_handle());
    }
    // Aborted too when the caller goes away (this future is dropped).
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _guard = AbortOnDrop(task.abort_handle());
    let result = task.await;
    gw.calls.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    match result {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => {
            Err(ApiError::new(StatusCode::CONFLICT, "cancelled", format!("call {id:?} was cancelled")))
        }
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())),
    }
}

async fn cancel(
    State(gw): State<Arc<Gateway>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    gw.authenticate(&headers, "POST", &uri, &body)?;
    let handle = gw.calls.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    match handle {
        Some(h) => {
            h.abort();
            Ok(Json(json!({"cancelled": id})))
        }
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no running call {id:?}"))),
    }
}

async fn launch(
    State(gw): State<Arc<Gateway>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let signer = gw.authenticate(&headers, "POST", &uri, &body)?;
    let req: LaunchRequest = json_body(&body)?;
    let forward = forwardable(&headers);
    if let Some(node) = &req.node
        && node != gw.node.id()
    {
        if !forward {
            return Err(ApiError::bad(format!("this is node {}, not {node}", gw.node.id())));
        }
        if signer.is_some() {
            return Err(gw
                .node_target(node)
                .await?
                .elsewhere("the launch's target", "; a signed launch goes to it directly"));
        }
        let p = gw.node_target(node).await?;
        return gw.forward(&p, reqwest::Method::POST, "/api/v1/actors", Some(body)).await;
    }
    let digest = gw.resolve(&req.module).await?;
    let spec =
        ActorSpec { module: digest, tag: req.tag, replicas: req.replicas, config: req.config, priority: req.priority };
    match gw.actors.launch(spec).await {
        Ok(info) => Ok((StatusCode::OK, Json(info)).into_response()),
        Err(ActorError::Elsewhere { placement, .. }) if forward => {
            let mut req: LaunchRequest = json_body(&body)?;
            req.node = Some(placement.node.clone());
            let body = Bytes::from(serde_json::to_vec(&req).expect("serializable"));
            gw.forward(&(&placement).into(), reqwest::Method::POST, "/api/v1/actors", Some(body)).await
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    scope: Option<String>,
}

async fn list_actors(
    State(gw): State<Arc<Gateway>>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<ActorInfo>>, ApiError> {
    let mut all = gw.actors.list().await;
    if q.scope.as_deref() == Some("local") {
        return Ok(Json(all));
    }
    // Cluster-wide: ask every other live node's gateway for its own.
    let nodes = tessera_node::list_nodes(gw.node.members().as_ref())
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "backend", e.to_string()))?;
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
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(all))
}

async fn show_actor(State(gw): State<Arc<Gateway>>, Path(name): Path<String>) -> Result<Response, ApiError> {
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

async fn kill(
    State(gw): State<Arc<Gateway>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let signer = gw.authenticate(&headers, "DELETE", &uri, b"")?;
    if let Some(image) = gw.actors.image(&name).await {
        gw.node.authorize_launch(&image, signer.as_ref()).map_err(ActorError::from)?;
    }
    match gw.actors.kill(&name).await {
        Ok(info) => Ok(Json(info).into_response()),
        Err(ActorError::NotFound(_)) if forwardable(&headers) => match gw.actors.locate(&name).await? {
            Some(p) if p.node != gw.node.id() && signer.is_some() => {
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

async fn queue_len(State(gw): State<Arc<Gateway>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let len = gw.node.bus().len(&name).await?;
    Ok(Json(json!({"name": name, "len": len, "capacity": gw.config.queue_capacity})))
}

async fn queue_put(
    State(gw): State<Arc<Gateway>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    gw.authenticate(&headers, "POST", &uri, &body)?;
    serde_json::from_slice::<serde::de::IgnoredAny>(&body)
        .map_err(|e| ApiError::bad(format!("a queue message is a JSON value: {e}")))?;
    let bus = gw.node.bus();
    bus.put_bounded(&name, body, gw.config.queue_capacity).await?;
    Ok((StatusCode::CREATED, Json(json!({"name": name, "len": bus.len(&name).await?}))))
}

#[derive(Deserialize)]
struct GetQuery {
    #[serde(default)]
    wait: Option<f64>,
}

async fn queue_get(
    State(gw): State<Arc<Gateway>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<GetQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    gw.authenticate(&headers, "POST", &uri, &body)?;
    let wait = match q.wait {
        None => Duration::ZERO,
        Some(w) if w.is_finite() && w >= 0.0 => Duration::from_secs_f64(w.min(30.0)),
        Some(w) => return Err(ApiError::bad(format!("wait {w}: must be a number of seconds"))),
    };
    let bus = gw.node.bus();
    match bus.get(&name, wait).await? {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(d) => {
            let payload = d.payload.clone();
            d.ack().await?;
            Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], payload).into_response())
        }
    }
}

async fn blob(State(gw): State<Arc<Gateway>>, Path(digest): Path<String>) -> Result<Response, ApiError> {
    let d: Digest = digest.parse().map_err(|e| ApiError::bad(format!("{digest:?}: {e}")))?;
    match gw.node.blobs().get(&d).await.map_err(NodeError::from).map_err(ActorError::from)? {
        Some(b) => Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/octet-stream")], b).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no blob {d}"))),
    }
}
