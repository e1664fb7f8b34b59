//! The dashboard: a page at `/ui` that shows a hub's modules (with their cards, manifests
//! and signers) and models (with their lineage as a graph), and, when the hub is given a
//! cluster, its nodes, its runs (federated sessions and swarms, with charts of accuracy
//! and loss per round, round durations, per-participant contributions, failures and the
//! privacy budget spent), and its actors with their calls and queue depths. Runs update
//! live over server-sent events (`/ui/events`).
//!
//! The page is three hand-written files (HTML, JavaScript, CSS) compiled into the binary:
//! nothing is built with npm and nothing is fetched from another host (the page is served
//! with a Content-Security-Policy of `'self'` only). It reads the hub's own API for modules
//! and models and `/ui/api/...` for the cluster, and renders every value as text, never as
//! markup. It is read-only and asks for no signature: whoever reaches the hub sees what
//! `tessera swarm list`, `tessera node list` and `tessera actors` show to whoever reaches
//! the cluster.
//!
//! This crate does not serve the hub's API (that is `tessera-hub`) nor run anything.

mod cluster;

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

pub use cluster::{ACTOR_FETCHES, Cluster, MAX_ACTOR_LIST, MAX_STREAMS};

const INDEX: &str = include_str!("../assets/index.html");
const SCRIPT: &str = include_str!("../assets/app.js");
const STYLE: &str = include_str!("../assets/style.css");

/// Where the page may load from and connect to: this origin only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard's routes: `/ui` (the page and its two assets), and, for the cluster when
/// one is given, `/ui/api/cluster`, `/ui/api/runs`, `/ui/api/runs/{id}`, `/ui/api/actors`
/// and `/ui/events`. Merge it into the hub's router.
pub fn router(cluster: Option<Cluster>) -> Router {
    let cluster = Arc::new(cluster);
    Router::new()
        .route("/ui", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/ui/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/ui/app.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/ui/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .merge(cluster::routes())
        .route_layer(axum::middleware::from_fn(|req, next| tessera_ports::metrics::http::measure("hub", req, next)))
        .with_state(cluster)
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
