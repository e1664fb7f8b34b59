//! The gateway's state, router, error answers, and the authentication layer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, OriginalUri, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::{Value, json};
use tessera_core::Digest;
use tessera_identity::envelope::HEADER as SIGNATURE_HEADER;
use tessera_identity::{Envelope, PublicKey, Verifier, now_ms};
use tessera_node::{ActorError, Actors, Node, NodeError};
use tessera_ports::{BusError, RuntimeError};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::authz::Caller;
use crate::calls::{CallRegistry, OutputOwners};

/// What a gateway allows and how large things may be.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// A call to an actor that is not running launches it from the module of that name.
    pub spawn_on_call: bool,
    /// Outputs up to this size come back in the response; larger ones go to the blob store.
    pub inline_limit: usize,
    /// The time-out of a call that names none.
    pub default_timeout: Duration,
    /// The longest time-out a call may ask for (longer ones are cut to it).
    pub max_timeout: Duration,
    /// The bound of a queue in messages (puts beyond it are refused with 429 until a get
    /// makes room).
    pub queue_capacity: u64,
    /// The bound of a queue in bytes of payload.
    pub queue_max_bytes: u64,
    /// The largest request body, in bytes (a queue message included).
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
            queue_max_bytes: 64 << 20,
            max_body: 64 << 20,
        }
    }
}

/// A node's gateway: its actors, its bus and blobs, and a client to reach other gateways.
pub struct Gateway {
    pub(crate) node: Arc<Node>,
    pub(crate) actors: Arc<Actors>,
    pub(crate) config: GatewayConfig,
    pub(crate) http: reqwest::Client,
    pub(crate) calls: CallRegistry,
    pub(crate) outputs: Mutex<OutputOwners>,
    /// Checks signed requests (addressed to the node's key), when the node has a key.
    pub(crate) verifier: Option<Verifier>,
}

impl Gateway {
    /// A gateway over `node`'s `actors`.
    pub fn new(node: Arc<Node>, actors: Arc<Actors>, config: GatewayConfig) -> Arc<Self> {
        let http = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(30)).build().unwrap_or_default();
        let verifier = node.record().key.and_then(|k| k.parse::<PublicKey>().ok()).map(Verifier::new);
        Arc::new(Gateway {
            node,
            actors,
            config,
            http,
            calls: Mutex::new(HashMap::new()),
            outputs: Mutex::new(OutputOwners::default()),
            verifier,
        })
    }

    /// The actors it serves.
    pub fn actors(&self) -> &Arc<Actors> {
        &self.actors
    }
}

#[derive(OpenApi)]
#[openapi(info(
    title = "Tessera node gateway",
    description = "Call, launch, list and kill a node's actors; use its queues; fetch large outputs. On a node whose policy requires signed tasks, every route but /api/v1/health takes only requests signed for the node's key (header x-tessera-signature, the hub's envelope), from keys with a grant for the module or queue."
))]
struct ApiDoc;

/// The routes, each registered through the macro that documents it.
fn api_router() -> OpenApiRouter<Arc<Gateway>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(crate::calls::call))
        .routes(routes!(crate::calls::call_short))
        .routes(routes!(crate::calls::cancel))
        .routes(routes!(crate::actors::list_actors, crate::actors::launch))
        .routes(routes!(crate::actors::show_actor, crate::actors::kill))
        .routes(routes!(crate::queues::queue_len, crate::queues::queue_put))
        .routes(routes!(crate::queues::queue_get))
        .routes(routes!(crate::blobs::blob))
}

/// The OpenAPI document of the gateway (served at `/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().split_for_parts().1
}

/// The gateway's routes. Every API route is behind the authentication layer (so none can be
/// reached without it); `/openapi.json` and `/metrics` (Prometheus's text: counts and
/// latencies by route, actor and queue name, never call data) are open, as a scrape target
/// is. Every route is measured and answers a panic with 500 and one log line.
pub fn app(gw: Arc<Gateway>) -> Router {
    let max_body = gw.config.max_body;
    let (router, doc) = api_router().split_for_parts();
    let doc = Arc::new(doc);
    router
        .route_layer(axum::middleware::from_fn_with_state(gw.clone(), authenticate))
        .route("/openapi.json", axum::routing::get(move || async move { Json(doc.as_ref().clone()) }))
        .route("/metrics", axum::routing::get(tessera_ports::metrics::http::metrics_page))
        .route_layer(axum::middleware::from_fn(|req, next| tessera_ports::metrics::http::measure("gateway", req, next)))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(answer_panic))
        .with_state(gw)
}

/// A handler panicked: one log line and a 500 (no backtrace per request).
fn answer_panic(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic");
    tracing::error!("a gateway handler panicked: {what}");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error: the request handler failed")
        .into_response()
}

/// Routes anyone may use, signed or not.
const PUBLIC: [&str; 1] = ["/api/v1/health"];

/// The authentication layer: checks the signature envelope from the headers (window,
/// audience, signature over the claimed body digest, nonce) before reading the body, then
/// the body against it, and hands the handler the [`Caller`]. Unsigned requests are refused
/// on a node that requires signed tasks, but for [`PUBLIC`] routes.
async fn authenticate(State(gw): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    match gw.authenticate(req).await {
        Ok(req) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

impl Gateway {
    async fn authenticate(&self, req: Request) -> Result<Request, ApiError> {
        let unauthorized = |m: String| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let (mut parts, body) = req.into_parts();
        let uri = parts.extensions.get::<OriginalUri>().map_or_else(|| parts.uri.clone(), |u| u.0.clone());
        let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str()).to_owned();
        let Some(h) = parts.headers.get(SIGNATURE_HEADER) else {
            if self.node.policy().require_signed_tasks && !PUBLIC.contains(&uri.path()) {
                return Err(unauthorized(format!(
                    "unsigned request; this node takes only signed requests ({SIGNATURE_HEADER})"
                )));
            }
            parts.extensions.insert(Caller(None));
            return Ok(Request::from_parts(parts, body));
        };
        let Some(v) = &self.verifier else {
            return Err(unauthorized("the request is signed, but this node has no key to check it".into()));
        };
        let text = h.to_str().map_err(|_| unauthorized(format!("{SIGNATURE_HEADER} is not text")))?;
        let env = Envelope::parse(text).map_err(|e| unauthorized(format!("{SIGNATURE_HEADER}: {e}")))?;
        let method = parts.method.as_str().to_owned();
        // Everything but the body first: a bad signature costs the node no bytes. The window
        // is the request's start, however long its body takes.
        let checked_at = now_ms();
        drop(v.check_header(&env, &method, &path, checked_at).map_err(|e| unauthorized(format!("signature: {e}")))?);
        let bytes = axum::body::to_bytes(body, self.config.max_body).await.map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the request body is over the limit of {} bytes", self.config.max_body),
            )
        })?;
        let key = v
            .check_header(&env, &method, &path, checked_at)
            .and_then(|c| c.finish(&Digest::of(&bytes), now_ms()))
            .map_err(|e| unauthorized(format!("signature: {e}")))?;
        parts.extensions.insert(Caller(Some(key)));
        Ok(Request::from_parts(parts, Body::from(bytes)))
    }
}

/// An error as the API reports it.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, message: message.into() }
    }
    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub(crate) fn refused(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "refused", message)
    }
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub(crate) fn backend(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "backend", e.to_string())
    }
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
    /// The kind (`bad_request`, `refused`, `not_found`, …).
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.kind)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("gateway: {}", self.message);
        }
        (self.status, Json(json!({"error": self.message, "kind": self.kind}))).into_response()
    }
}

impl From<ActorError> for ApiError {
    fn from(e: ActorError) -> Self {
        let message = e.to_string();
        let (status, kind) = match &e {
            ActorError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ActorError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ActorError::Running { .. } | ActorError::ConfigConflict { .. } => (StatusCode::CONFLICT, "conflict"),
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

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        ActorError::Node(e).into()
    }
}

fn runtime_status(r: &RuntimeError) -> (StatusCode, &'static str) {
    match r {
        RuntimeError::Module(_) => (StatusCode::UNPROCESSABLE_ENTITY, "module_error"),
        RuntimeError::Trap(_) | RuntimeError::Gone(_) => (StatusCode::INTERNAL_SERVER_ERROR, "crashed"),
        RuntimeError::TimeLimit { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        RuntimeError::MemoryLimit { .. } | RuntimeError::OutputLimit { .. } => {
            (StatusCode::INSUFFICIENT_STORAGE, "limit")
        }
        RuntimeError::Load(_) => (StatusCode::INTERNAL_SERVER_ERROR, "load"),
        RuntimeError::Unsupported(_) => (StatusCode::NOT_IMPLEMENTED, "unsupported"),
    }
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> Self {
        match &e {
            BusError::Name(_) => ApiError::bad(e.to_string()),
            BusError::TooLarge { .. } => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string()),
            BusError::Full(_) | BusError::FullBytes { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", e.to_string())
            }
            BusError::Backend(_) => ApiError::backend(e),
        }
    }
}

pub(crate) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("malformed request: {e}")))
}

/// The node's health: its id, key and number of actors (the only route that needs no
/// signature on a policy node).
#[utoipa::path(get, path = "/api/v1/health", responses((status = 200, body = Value)))]
pub(crate) async fn health(State(gw): State<Arc<Gateway>>) -> Json<Value> {
    let r = gw.node.record();
    Json(json!({"status": "ok", "node": r.id, "key": r.key, "actors": gw.actors.list().await.len()}))
}
