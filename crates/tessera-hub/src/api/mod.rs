//! The hub's REST API.
//!
//! Every route is registered through `utoipa_axum::routes!`, which also documents it, so the
//! router and the OpenAPI document cannot drift apart. Every request passes one
//! authentication step ([`auth`]): the signature envelope is checked from the headers
//! before a body is read, uploads are counted per account, and the body digest is checked
//! as the body arrives. Every write is then authorized by the store, in the write's own
//! transaction (the namespace rule of [`crate::HubStore`]). A handler that panics is
//! answered 500 with one log line.

mod auth;
mod body;
mod collections;
mod download;
mod models;
mod namespaces;
mod packages;
mod uploads;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tessera_identity::Verifier;
use tessera_identity::envelope::HEADER as SIGNATURE_HEADER;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::{Config as SwaggerConfig, SwaggerUi};

pub use body::{MANIFEST_HEADER, PACKAGE_HEADER};
pub use collections::{ComponentDocument, ComponentInfo};
pub use models::{CreateModel, ModelMeta};
pub use uploads::{BeginUpload, OFFSET_HEADER, UPLOAD_PARAM};

use crate::store::{HubError, HubStore};

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
    /// Uploads in progress per account (`""` for unsigned ones).
    uploads: Arc<Mutex<HashMap<String, usize>>>,
    /// Resumable uploads receiving a piece now.
    appending: uploads::Appending,
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
    /// Uploads one account may have in progress at once (unsigned uploads on an open hub
    /// count as one account); more are refused with 429.
    pub max_uploads_per_account: usize,
    /// Largest model binary accepted, in bytes.
    pub max_model_bytes: u64,
}

/// Largest model binary accepted by default: 8 GiB.
pub const DEFAULT_MAX_MODEL_BYTES: u64 = 8 << 30;

impl HubPolicy {
    /// Signatures required, 60 s window, 4 uploads at once per account.
    pub fn signed() -> Self {
        HubPolicy {
            require_signatures: true,
            window_ms: 60_000,
            upload_quota_bytes: None,
            max_uploads_per_account: 4,
            max_model_bytes: DEFAULT_MAX_MODEL_BYTES,
        }
    }
    /// Unsigned requests accepted (signed ones are still checked); for embedded and
    /// single-user hubs.
    pub fn open() -> Self {
        HubPolicy { require_signatures: false, ..Self::signed() }
    }
}

impl AppState {
    /// The state for a store under a policy.
    pub fn new(store: Arc<HubStore>, policy: HubPolicy) -> Self {
        // The replay cache is the store's: every hub process serving it refuses a nonce any
        // of them accepted.
        let verifier = Verifier::new(store.key().public().clone())
            .with_window_ms(policy.window_ms)
            .with_replay_cache(store.clone());
        AppState {
            store,
            policy: Arc::new(policy),
            verifier: Arc::new(verifier),
            uploads: Arc::default(),
            appending: uploads::Appending::default(),
        }
    }
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
            HubError::Quota(_) | HubError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            HubError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("hub: {}", self.0);
        }
        let busy = matches!(self.0, HubError::Busy(_));
        let mut resp = (status, Json(ErrorBody { error: self.0.to_string() })).into_response();
        if busy {
            // Worth retrying: an upload of the account will end.
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Runs store work on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, HubError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError(HubError::Storage(e.to_string())))?.map_err(ApiError)
}

/// Parses a JSON body.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError(HubError::BadRequest(format!("invalid JSON body: {e}"))))
}

/// The name of the signature security scheme in the OpenAPI document.
pub const SIGNATURE_SCHEME: &str = "tessera_signature";

struct SignatureScheme;

impl Modify for SignatureScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SIGNATURE_SCHEME,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                SIGNATURE_HEADER,
                "A signature envelope: `v1;key=<signer>;ts=<ms>;nonce=<16-64 chars>;aud=<the hub's key, from /api/v1/health>;body=b3:<BLAKE3 of the body>;sig=<base64url>`, the signature over `tessera-request-v1\\n<METHOD>\\n<path with query>\\n<ts>\\n<nonce>\\n<aud>\\n<body>\\n<key>`. Required on every write unless the hub runs with --open; needed to read private packages, grants and usage. `tessera` signs with --key NAME.",
            ))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tessera hub",
        description = "Publish, find and fetch module packages and models. Package versions and model binaries are immutable; every download is named by its BLAKE3 digest. Writes are signed (see the security scheme) and belong to the owners of the name's namespace: the first signed write under a namespace claims it."
    ),
    modifiers(&SignatureScheme),
    tags(
        (name = "packages", description = "Module packages by name, version, alias and digest"),
        (name = "models", description = "Models: metadata, lineage and binaries"),
        (name = "namespaces", description = "Who may write under a path prefix"),
        (name = "components", description = "The Component Repository's collections (model, transformation, service, inferencer) with its routes and bodies"),
        (name = "hub", description = "Health and blobs")
    )
)]
struct ApiDoc;

/// The API routes. Every route is registered through the macro that documents it, so the
/// router and the OpenAPI document cannot drift apart.
fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(packages::publish_package, packages::list_packages))
        .routes(routes!(packages::package_versions))
        .routes(routes!(packages::show_package, packages::delete_package))
        .routes(routes!(packages::download_package))
        .routes(routes!(packages::set_alias))
        .routes(routes!(packages::download_blob))
        .routes(routes!(packages::package_by_digest))
        .routes(routes!(packages::list_grants))
        .routes(routes!(packages::set_grant, packages::revoke_grant))
        .routes(routes!(packages::account_usage))
        .routes(routes!(models::create_model, models::list_models))
        .routes(routes!(models::upload_next_model))
        .routes(routes!(models::upload_model, models::download_model, models::delete_model))
        .routes(routes!(models::show_model, models::update_model_meta))
        .routes(routes!(models::model_tensors))
        .routes(routes!(models::model_card))
        .routes(routes!(models::model_lineage))
        .routes(routes!(packages::package_card))
        .routes(routes!(namespaces::show_namespace))
        .routes(routes!(namespaces::add_owner, namespaces::remove_owner))
        .routes(routes!(uploads::begin_upload))
        .routes(routes!(uploads::show_upload, uploads::append_upload, uploads::cancel_upload))
        .routes(routes!(collections::create_component, collections::list_components))
        .routes(routes!(collections::show_component))
        .routes(routes!(collections::put_object_by_id, collections::get_object_by_id, collections::delete_by_id))
        .routes(routes!(collections::update_meta_by_id))
        .routes(routes!(collections::put_object_by_name, collections::get_object_by_name, collections::delete_by_name))
        .routes(routes!(collections::update_meta_by_name))
        .routes(routes!(collections::component_package))
}

/// The OpenAPI document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().split_for_parts().1
}

/// The hub's HTTP application: the API under `/api/v1`, `/openapi.json`, and `/docs` (the
/// interactive documentation, served from the binary; its online validator is off, so the
/// page contacts no other host).
pub fn app(state: AppState) -> Router {
    let (router, api) = api_router().split_for_parts();
    let docs = SwaggerUi::new("/docs")
        .url("/openapi.json", api)
        .config(SwaggerConfig::new(["/openapi.json"]).validator_url("none"));
    router
        .merge(docs)
        .route(
            "/",
            axum::routing::get(|| async {
                axum::response::Html(
                    "<!doctype html><title>Tessera hub</title><h1>Tessera hub</h1>\
                     <p><a href=\"/ui\">Dashboard</a> · <a href=\"/docs/\">API documentation</a> · <a href=\"/openapi.json\">OpenAPI document</a> · <a href=\"/metrics\">Metrics</a></p>",
                )
            }),
        )
        .route("/metrics", axum::routing::get(tessera_ports::metrics::http::metrics_page))
        // Explicit, so a router merged into this one (the dashboard's) keeps it.
        .fallback(|| async { ApiError(HubError::NotFound("no such route".into())) })
        .layer(axum::middleware::from_fn(json_errors))
        .route_layer(axum::middleware::from_fn(|req, next| tessera_ports::metrics::http::measure("hub", req, next)))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(answer_panic))
        .with_state(state)
}

/// The most a request body read whole (JSON, metadata) may have, in bytes: axum's default
/// limit, which every route reading its body whole keeps.
const WHOLE_BODY_LIMIT: usize = 2 << 20;

/// Every error answer of the hub is JSON [`ErrorBody`], as the API document says: the
/// handlers' own errors are ([`ApiError`]), and this turns the rest into it: axum's
/// rejections (a query string or a body that does not parse, a body over
/// [`WHOLE_BODY_LIMIT`]), an unknown route or method, a refused range. The answers to
/// `HEAD` keep their empty bodies.
async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let head = req.method() == axum::http::Method::HEAD;
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if head || json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, 64 << 10).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(_) => String::new(),
    };
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE if text.contains("length limit exceeded") => {
            format!("the request body is over this route's limit of {WHOLE_BODY_LIMIT} bytes")
        }
        _ if text.is_empty() => match status {
            StatusCode::NOT_FOUND => "no such route".to_owned(),
            StatusCode::METHOD_NOT_ALLOWED => "the route does not take this method".to_owned(),
            _ => status.canonical_reason().unwrap_or("error").to_owned(),
        },
        _ => text,
    };
    // The headers of the body that is replaced (what it was, how long, where it came from)
    // do not describe the error.
    for h in [
        axum::http::header::CONTENT_LENGTH,
        axum::http::header::CONTENT_TYPE,
        axum::http::header::CONTENT_DISPOSITION,
        axum::http::header::CONTENT_ENCODING,
        axum::http::header::ETAG,
        axum::http::header::LAST_MODIFIED,
    ] {
        parts.headers.remove(h);
    }
    parts.headers.remove(DIGEST_HEADER);
    let mut out = (status, Json(ErrorBody { error })).into_response();
    // Every header the answer had (a repeated one with all its values), but its body's.
    let json_type = out.headers_mut().remove(axum::http::header::CONTENT_TYPE);
    for (k, v) in parts.headers.iter() {
        out.headers_mut().append(k, v.clone());
    }
    if let Some(t) = json_type {
        out.headers_mut().insert(axum::http::header::CONTENT_TYPE, t);
    }
    out
}

/// A handler panicked: one log line, and a 500 that says so (no backtrace per request).
pub fn answer_panic(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic");
    tracing::error!("a request handler panicked: {what}");
    (StatusCode::INTERNAL_SERVER_ERROR, Json(ErrorBody { error: "internal error: the request handler failed".into() }))
        .into_response()
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
async fn health(axum::extract::State(s): axum::extract::State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        key: s.store.key().public().to_string(),
        signatures_required: s.policy.require_signatures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, header};
    use tower::ServiceExt as _;

    /// An error answered as text becomes JSON naming it; the headers of the replaced body go,
    /// the others (all their values) stay.
    #[tokio::test]
    async fn a_text_error_becomes_json_without_its_body_s_headers() {
        let router = Router::new()
            .route(
                "/gone",
                axum::routing::get(|| async {
                    (
                        StatusCode::GONE,
                        axum::response::AppendHeaders([
                            (header::ETAG, "\"b3:00\""),
                            (header::CONTENT_DISPOSITION, "attachment; filename=\"m.bin\""),
                            (header::HeaderName::from_static(DIGEST_HEADER), "b3:00"),
                            (header::VARY, "origin"),
                            (header::VARY, "accept"),
                        ]),
                        "the blob went away",
                    )
                }),
            )
            .layer(axum::middleware::from_fn(json_errors));
        let resp = router.oneshot(Request::get("/gone").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::GONE);
        let h = resp.headers().clone();
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        for gone in [header::ETAG.as_str(), header::CONTENT_DISPOSITION.as_str(), DIGEST_HEADER] {
            assert!(!h.contains_key(gone), "{gone} stayed: {h:?}");
        }
        assert_eq!(h.get_all(header::VARY).iter().count(), 2, "{h:?}");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "the blob went away");
    }
}
