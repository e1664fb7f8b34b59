//! The cluster's side of the dashboard: nodes, runs and actors read from the backend the
//! hub was given (NATS, or the in-process one of `tessera quickstart --ui`), and the event
//! stream that tells the page when they change.
//!
//! Bounded work: one poller per hub reads the runs and nodes once a second, and only while
//! a page listens; every open event stream reads what it found (at most
//! [`MAX_STREAMS`] at once). The actor listing asks at most [`ACTOR_FETCHES`] gateways at
//! once, follows no redirect and reads at most [`MAX_ACTOR_LIST`] bytes from each.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{Value, json};
use tessera_coordinator::{Coordinator, RunRecord, RunSummary};
use tessera_core::wire::{ActorInfo, NodeRecord};
use tessera_ports::Backend;
use tokio::sync::{Semaphore, watch};

/// How often the poller looks for changes.
const POLL: Duration = Duration::from_secs(1);

/// Runs listed at most (newest first).
const MAX_RUNS: usize = 200;

/// Event streams open at once; more are answered 503.
pub const MAX_STREAMS: usize = 64;

/// Gateways asked for their actors at once.
pub const ACTOR_FETCHES: usize = 8;

/// Largest actor list read from one gateway, in bytes (1 MiB).
pub const MAX_ACTOR_LIST: usize = 1 << 20;

/// How long one gateway may take to list its actors.
const ACTOR_TIMEOUT: Duration = Duration::from_secs(3);

/// What the poller last saw: the run summaries and the node records, as JSON.
#[derive(Clone, Default, PartialEq)]
struct Snapshot {
    runs: Arc<str>,
    nodes: Arc<str>,
}

/// The cluster a dashboard shows.
pub struct Cluster {
    backend: Backend,
    runs: Coordinator,
    http: reqwest::Client,
    seen: watch::Sender<Option<Snapshot>>,
    polling: AtomicBool,
    streams: Arc<Semaphore>,
}

impl Cluster {
    /// A cluster on `backend`; `runs` reads its runs (a coordinator that sends nothing:
    /// `Coordinator::new(backend, source, None)`).
    pub fn new(backend: Backend, runs: Coordinator) -> Cluster {
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap_or_else(|e| {
            tracing::warn!("dashboard: {e}; using a default HTTP client");
            reqwest::Client::new()
        });
        Cluster {
            backend,
            runs,
            http,
            seen: watch::channel(None).0,
            polling: AtomicBool::new(false),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        }
    }

    async fn nodes(&self) -> Vec<NodeRecord> {
        match tessera_node::list_nodes(self.backend.members.as_ref()).await {
            Ok(mut n) => {
                n.sort_by(|a, b| a.id.cmp(&b.id));
                n
            }
            Err(e) => {
                tracing::warn!("dashboard: listing nodes: {e}");
                Vec::new()
            }
        }
    }

    async fn summaries(&self) -> Vec<RunSummary> {
        match self.runs.summaries().await {
            Ok(mut runs) => {
                runs.truncate(MAX_RUNS);
                runs
            }
            Err(e) => {
                tracing::warn!("dashboard: listing runs: {e}");
                Vec::new()
            }
        }
    }

    /// Every node's actors (from its gateway, unsigned: a node that checks grants shows
    /// none), each with the depth of its `in` and `out` queues.
    async fn actors(&self) -> Vec<Value> {
        let endpoints: Vec<(String, String)> =
            self.nodes().await.into_iter().filter_map(|n| Some((n.id, gateway(n.endpoint.as_deref()?)?))).collect();
        let lists: Vec<Vec<ActorInfo>> = futures::stream::iter(endpoints)
            .map(|(node, url)| async move {
                self.actor_list(&url).await.unwrap_or_else(|why| {
                    tracing::debug!(%node, "dashboard: actors: {why}");
                    Vec::new()
                })
            })
            .buffer_unordered(ACTOR_FETCHES)
            .collect()
            .await;
        let mut out = Vec::new();
        for a in lists.into_iter().flatten() {
            let depth_in = self.backend.bus.len(&format!("{}.in", a.name)).await.ok();
            let depth_out = self.backend.bus.len(&format!("{}.out", a.name)).await.ok();
            let mut v = serde_json::to_value(&a).unwrap_or(Value::Null);
            v["queues"] = json!({ "in": depth_in, "out": depth_out });
            out.push(v);
        }
        out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        out
    }

    /// One gateway's own actors, read up to [`MAX_ACTOR_LIST`] bytes.
    async fn actor_list(&self, url: &str) -> Result<Vec<ActorInfo>, String> {
        let mut r = self.http.get(url).timeout(ACTOR_TIMEOUT).send().await.map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("HTTP {}", r.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = r.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_ACTOR_LIST {
                return Err(format!("an actor list over {MAX_ACTOR_LIST} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    }
}

/// The actor listing URL of a node's announced gateway, when it is an http(s) URL.
pub(crate) fn gateway(endpoint: &str) -> Option<String> {
    let url = reqwest::Url::parse(endpoint).ok()?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() || url.query().is_some() {
        return None;
    }
    Some(format!("{}/api/v1/actors?scope=local", endpoint.trim_end_matches('/')))
}

type Shared = Arc<Option<Cluster>>;

pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/ui/api/cluster", get(cluster))
        .route("/ui/api/runs", get(runs))
        .route("/ui/api/runs/{id}", get(run))
        .route("/ui/api/actors", get(actors))
        .route("/ui/events", get(events))
}

/// `{connected, nodes}`: whether the hub was given a cluster, and its nodes.
async fn cluster(State(c): State<Shared>) -> Json<Value> {
    match c.as_ref() {
        Some(c) => Json(json!({ "connected": true, "nodes": c.nodes().await })),
        None => Json(json!({ "connected": false, "nodes": [] })),
    }
}

/// The runs, newest first, as `tessera swarm list --json` prints them.
async fn runs(State(c): State<Shared>) -> Json<Vec<RunSummary>> {
    match c.as_ref() {
        Some(c) => Json(c.summaries().await),
        None => Json(Vec::new()),
    }
}

/// A run's stored state, as `tessera swarm status --json` prints it, less what is not the
/// page's to show ([`redacted`]).
async fn run(State(c): State<Shared>, Path(id): Path<String>) -> Response {
    let Some(c) = c.as_ref() else {
        return error(StatusCode::NOT_FOUND, "this hub was started without a cluster".into());
    };
    match c.runs.record(&id).await {
        Ok(Some(r)) => Json(redacted(&r)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no run {id}")),
        Err(tessera_coordinator::SessionError::Config(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// A run's state without what only its coordinator's operator should read: a session's
/// worker `config` (it may hold credentials) and the paths of the coordinator's data sets;
/// a swarm's globals, task configurations, carried outputs and source lines (its `spec`
/// keeps `name`, `iterations` and the task names).
fn redacted(r: &RunRecord) -> Value {
    match r {
        RunRecord::Session(s) => {
            let mut v = json!(s);
            if let Some(o) = v.as_object_mut() {
                o.remove("coordinator_datasets");
                if let Some(cfg) = o.get_mut("config").and_then(Value::as_object_mut) {
                    cfg.remove("config");
                }
            }
            v
        }
        RunRecord::Swarm(s) => {
            let mut v = json!(s);
            if let Some(o) = v.as_object_mut() {
                o.remove("carried");
                o.insert(
                    "spec".into(),
                    json!({
                        "name": s.spec.name,
                        "iterations": s.spec.iterations,
                        "tasks": s.spec.tasks.keys().collect::<Vec<_>>(),
                    }),
                );
            }
            v
        }
    }
}

/// The actors of every node with a gateway, with their queue depths.
async fn actors(State(c): State<Shared>) -> Json<Vec<Value>> {
    match c.as_ref() {
        Some(c) => Json(c.actors().await),
        None => Json(Vec::new()),
    }
}

fn error(status: StatusCode, error: String) -> Response {
    (status, Json(json!({ "error": error }))).into_response()
}

/// Reads the runs and nodes once a second while any event stream is open, and publishes
/// what changed. Started by the first stream; runs as long as the hub.
async fn poll(shared: Shared) {
    let Some(c) = shared.as_ref() else { return };
    loop {
        if c.seen.receiver_count() > 0 {
            let runs = serde_json::to_string(&c.summaries().await).unwrap_or_default();
            let nodes = serde_json::to_string(&c.nodes().await).unwrap_or_default();
            let now = Snapshot { runs: runs.into(), nodes: nodes.into() };
            c.seen.send_if_modified(|old| {
                let changed = old.as_ref() != Some(&now);
                *old = Some(now);
                changed
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Server-sent events: `runs` (the run summaries) and `nodes` (the node records), each sent
/// when the stream opens and again whenever it changes. 503 when [`MAX_STREAMS`] are open.
async fn events(State(shared): State<Shared>) -> Response {
    let Some(c) = shared.as_ref() else {
        // No cluster: nothing will change; the stream stays open quietly.
        return Sse::new(futures::stream::pending::<Result<Event, Infallible>>())
            .keep_alive(KeepAlive::default())
            .into_response();
    };
    let Ok(permit) = c.streams.clone().try_acquire_owned() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, format!("{MAX_STREAMS} dashboards are open already"));
    };
    let mut rx = c.seen.subscribe();
    rx.mark_changed();
    if !c.polling.swap(true, Ordering::SeqCst) {
        tokio::spawn(poll(shared.clone()));
    }
    let stream = futures::stream::unfold((rx, Snapshot::default(), permit), |(mut rx, mut sent, permit)| async move {
        loop {
            rx.changed().await.ok()?;
            let Some(now) = rx.borrow_and_update().clone() else { continue };
            let mut batch: Vec<Result<Event, Infallible>> = Vec::new();
            if now.runs != sent.runs {
                batch.push(Ok(Event::default().event("runs").data(&*now.runs)));
            }
            if now.nodes != sent.nodes {
                batch.push(Ok(Event::default().event("nodes").data(&*now.nodes)));
            }
            sent = now;
            if !batch.is_empty() {
                return Some((futures::stream::iter(batch), (rx, sent, permit)));
            }
        }
    });
    Sse::new(stream.flatten()).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::gateway;

    #[test]
    fn only_plain_http_gateways_are_asked() {
        assert_eq!(gateway("http://10.0.0.5:7800/").as_deref(), Some("http://10.0.0.5:7800/api/v1/actors?scope=local"));
        assert!(gateway("https://node.example:7800").is_some());
        for bad in [
            "",
            "not a url",
            "ftp://node:21",
            "file:///etc/passwd",
            "http://internal/x?",
            "http://internal/x?a=b",
            "unix:/run/x",
        ] {
            assert_eq!(gateway(bad), None, "{bad}");
        }
    }
}
