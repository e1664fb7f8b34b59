//! The dashboard's routes over a real cluster (a digits session on the in-process backend
//! and on NATS), without one, and with hostile input. What the page draws from them is
//! checked in a browser by `tessera-cli/tests/dashboard.rs`.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use tessera_cluster::{Cluster, ClusterConfig, digits};
use tessera_coordinator::{Quiet, SessionConfig};
use tessera_ports::Backend;
use tower::ServiceExt;

async fn get(app: &axum::Router, uri: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let r = app.clone().oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
    let (parts, body) = r.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes().to_vec())
}

async fn json(app: &axum::Router, uri: &str) -> Value {
    let (s, _, b) = get(app, uri).await;
    assert_eq!(s, StatusCode::OK, "{uri}: {}", String::from_utf8_lossy(&b));
    serde_json::from_slice(&b).unwrap()
}

#[tokio::test]
async fn the_page_and_its_assets_come_with_a_self_only_policy() {
    let app = tessera_dashboard::router(None);
    for (uri, ctype) in
        [("/ui", "text/html"), ("/ui/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")]
    {
        let (s, h, body) = get(&app, uri).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
        assert!(h[header::CONTENT_TYPE].to_str().unwrap().starts_with(ctype), "{uri}");
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], tessera_dashboard::CONTENT_SECURITY_POLICY);
        let text = String::from_utf8(body).unwrap();
        // Nothing names another host: no http(s) URL but the SVG namespace.
        for (i, _) in text.match_indices("http") {
            let rest = &text[i..];
            assert!(
                rest.starts_with("http://www.w3.org/2000/svg"),
                "{uri} names another host: {}",
                &rest[..60.min(rest.len())]
            );
        }
        // Data from the hub is never parsed as markup.
        assert!(!text.contains("innerHTML") && !text.contains("insertAdjacentHTML"), "{uri}");
    }
    // Without a cluster: nothing connected, nothing listed, no run.
    assert_eq!(json(&app, "/ui/api/cluster").await, serde_json::json!({"connected": false, "nodes": []}));
    assert_eq!(json(&app, "/ui/api/runs").await, serde_json::json!([]));
    assert_eq!(json(&app, "/ui/api/actors").await, serde_json::json!([]));
    assert_eq!(get(&app, "/ui/api/runs/s-1").await.0, StatusCode::NOT_FOUND);
}

async fn a_session_s_runs_and_nodes_are_listed_and_streamed(backend: Backend) {
    let home = tempfile::tempdir().unwrap();
    let prepared = digits::prepare(&home.path().join("data"), 2, 0.2, 42).unwrap();
    let config = ClusterConfig::digits(home.path(), &prepared, tessera_wasm::WasmLimits::default());
    let cluster = Cluster::start_on(config, backend).await.unwrap();
    let dir = home.path().join("worker");
    tessera_modules::write_softmax_worker(&dir).unwrap();
    cluster.publish_dir(&dir).unwrap();
    let mut cfg = SessionConfig::new("fl.softmax.worker@0.1.2");
    cfg.rounds = 2;
    cfg.eval_dataset = Some("digits-test".into());
    cfg.config = serde_json::json!({"lr": 0.5, "api_token": "do-not-show"});
    cluster.coordinator().run("s-dash", &cfg, &Quiet).await.unwrap();

    let reader = tessera_coordinator::Coordinator::new(
        cluster.backend.clone(),
        std::sync::Arc::new(tessera_hub::LocalHub(cluster.hub.clone())),
        None,
    );
    let app = tessera_dashboard::router(Some(tessera_dashboard::Cluster::new(cluster.backend.clone(), reader)));

    let c = json(&app, "/ui/api/cluster").await;
    assert_eq!(c["connected"], true);
    let ids: Vec<&str> = c["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["node-0", "node-1"]);
    let runs = json(&app, "/ui/api/runs").await;
    assert_eq!(runs[0]["id"], "s-dash");
    assert_eq!(
        (runs[0]["done"].as_u64(), runs[0]["total"].as_u64(), runs[0]["finished"].as_bool()),
        (Some(2), Some(2), Some(true))
    );
    let run = json(&app, "/ui/api/runs/s-dash").await;
    assert_eq!(run["reports"].as_array().unwrap().len(), 2);
    assert!(run["reports"][1]["eval_accuracy"].as_f64().unwrap() > 0.5);
    // The worker's config is the coordinator operator's, not the page's.
    assert!(run["config"]["config"].is_null() && !run.to_string().contains("do-not-show"), "{run}");
    assert!(run.get("coordinator_datasets").is_none());
    // No actors: no node has a gateway.
    assert_eq!(json(&app, "/ui/api/actors").await, serde_json::json!([]));

    // Hostile run ids: refused or not found, never a panic or another key's state.
    for (id, expected) in [
        ("..", StatusCode::BAD_REQUEST),
        ("..%2F..%2Fsessions", StatusCode::BAD_REQUEST),
        ("s-dash%00", StatusCode::BAD_REQUEST),
        ("no-such-run", StatusCode::NOT_FOUND),
    ] {
        let (s, _, b) = get(&app, &format!("/ui/api/runs/{id}")).await;
        assert_eq!(s, expected, "{id}: {}", String::from_utf8_lossy(&b));
    }
    let long = "a".repeat(10_000);
    let (s, _, _) = get(&app, &format!("/ui/api/runs/{long}")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // The event stream opens with the runs and the nodes.
    let r = app.clone().oneshot(Request::get("/ui/events").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(r.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = r.into_body();
    let mut text = String::new();
    while !(text.contains("event: runs") && text.contains("event: nodes")) {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame()).await.unwrap().unwrap().unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(text.contains("\"id\":\"s-dash\"") && text.contains("\"id\":\"node-1\""), "{text}");
    drop(body);

    // Streams are bounded: the one past the limit is refused, and a closed one frees its place.
    let mut open = Vec::new();
    for _ in 0..tessera_dashboard::MAX_STREAMS {
        let r = app.clone().oneshot(Request::get("/ui/events").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        open.push(r);
    }
    assert_eq!(get(&app, "/ui/events").await.0, StatusCode::SERVICE_UNAVAILABLE);
    open.pop();
    let r = app.clone().oneshot(Request::get("/ui/events").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    cluster.stop().await;
}

#[tokio::test]
async fn on_the_in_process_backend() {
    a_session_s_runs_and_nodes_are_listed_and_streamed(Backend::in_process(Duration::from_secs(30))).await;
}

#[tokio::test]
async fn on_nats() {
    let nats = tessera_nats::testing::NatsServer::start();
    let backend = tessera_nats::backend(&nats.url(), &tessera_nats::NatsOptions::default()).await.unwrap();
    a_session_s_runs_and_nodes_are_listed_and_streamed(backend).await;
}
