//! The hub's REST API, called through the router with no socket.

use std::path::Path;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tessera_core::Digest;
use tessera_hub::{AppState, HubPolicy, HubStore, app};
use tessera_package::{Limits, pack_dir};
use tower::ServiceExt;

struct Hub {
    app: Router,
    _dir: tempfile::TempDir,
    work: tempfile::TempDir,
    store: std::sync::Arc<HubStore>,
}

fn hub() -> Hub {
    hub_with(Limits::default())
}

fn hub_with(limits: Limits) -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(tessera_hub::testing::open_store_with(dir.path().join("hub"), limits));
    Hub {
        app: app(AppState::new(store.clone(), HubPolicy::open())),
        _dir: dir,
        work: tempfile::tempdir().unwrap(),
        store,
    }
}

impl Hub {
    async fn call(&self, method: &str, uri: &str, body: Body, headers: &[(&str, &str)]) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self.app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
        (status, bytes)
    }
    async fn get(&self, uri: &str) -> (StatusCode, Vec<u8>) {
        self.call("GET", uri, Body::empty(), &[]).await
    }
    async fn json(&self, uri: &str) -> (StatusCode, Value) {
        let (s, b) = self.get(uri).await;
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }
    async fn publish(&self, bytes: Vec<u8>) -> (StatusCode, Value) {
        let (s, b) = self.call("POST", "/api/v1/packages", Body::from(bytes), &[]).await;
        (s, serde_json::from_slice(&b).unwrap())
    }
    /// A module folder packed; `extra` changes its content.
    fn package(&self, name: &str, version: &str, extra: &str, tags: &str) -> Vec<u8> {
        let dir = self.work.path().join(format!("{name}-{version}-{}", Digest::of(extra.as_bytes()).hex()));
        write_module(&dir, name, version, extra, tags);
        pack_dir(&dir, &Limits::default()).unwrap().bytes
    }
    fn blob_files(&self) -> usize {
        fn count(p: &Path) -> usize {
            std::fs::read_dir(p).map_or(0, |rd| {
                rd.filter_map(Result::ok).map(|e| if e.path().is_dir() { count(&e.path()) } else { 1 }).sum()
            })
        }
        count(self.store.blobs().dir())
    }
}

fn write_module(dir: &Path, name: &str, version: &str, extra: &str, tags: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("module.yaml"),
        format!("name: {name}\nversion: {version}\nkind: task\nruntime: builtin\nentry: echo\ndescription: A test module {extra}\ntags: [{tags}]\n"),
    )
    .unwrap();
    std::fs::write(dir.join("data.txt"), extra).unwrap();
}

#[tokio::test]
async fn publish_list_show_download() {
    let h = hub();
    let bytes = h.package("fl.softmax.worker", "0.1.0", "a", "fl");
    let digest = Digest::of(&bytes);
    let (s, rec) = h.publish(bytes.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    assert_eq!(rec["digest"], digest.to_string());
    assert_eq!(rec["manifest"]["name"], "fl.softmax.worker");

    // Publishing the very same bytes again is a no-op.
    let (s, _) = h.publish(bytes.clone()).await;
    assert_eq!(s, StatusCode::OK);

    let v2 = h.package("fl.softmax.worker", "0.2.0", "b", "fl");
    assert_eq!(h.publish(v2.clone()).await.0, StatusCode::CREATED);

    let (s, list) = h.json("/api/v1/packages").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1, "latest of each package");
    assert_eq!(list[0]["version"], "0.2.0");
    let (_, all) = h.json("/api/v1/packages?all=true").await;
    assert_eq!(all.as_array().unwrap().len(), 2);
    let (_, versions) = h.json("/api/v1/packages/fl.softmax.worker").await;
    assert_eq!(versions[0]["version"], "0.1.0");
    assert_eq!(versions[1]["version"], "0.2.0");

    let (s, shown) = h.json("/api/v1/packages/fl.softmax.worker/0.1.0").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(shown["digest"], digest.to_string());
    let (_, latest) = h.json("/api/v1/packages/fl.softmax.worker/latest").await;
    assert_eq!(latest["version"], "0.2.0");

    let (s, got) = h.get("/api/v1/packages/fl.softmax.worker/0.1.0/download").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got, bytes);
    let (_, got) = h.get("/api/v1/packages/fl.softmax.worker/latest/download").await;
    assert_eq!(got, v2);
    let (s, got) = h.get(&format!("/api/v1/blobs/{digest}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got, bytes);
}

#[tokio::test]
async fn republishing_a_version_with_other_content_is_refused_and_changes_nothing() {
    let h = hub();
    let original = h.package("a.b", "1.0.0", "original", "x");
    assert_eq!(h.publish(original.clone()).await.0, StatusCode::CREATED);
    let files = h.blob_files();
    let (_, before) = h.json("/api/v1/packages?all=true").await;

    let other = h.package("a.b", "1.0.0", "other", "x");
    let (s, err) = h.publish(other).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(err["error"].as_str().unwrap().contains("immutable"), "{err}");

    let (_, after) = h.json("/api/v1/packages?all=true").await;
    assert_eq!(before, after);
    assert_eq!(h.blob_files(), files, "no blob left behind");
    assert_eq!(h.get("/api/v1/packages/a.b/1.0.0/download").await.1, original);
}

#[tokio::test]
async fn uploads_are_checked_before_anything_is_stored() {
    let h = hub_with(Limits { max_package_bytes: 64 << 10, ..Limits::default() });
    let bytes = h.package("a.b", "1.0.0", "x", "x");

    // Announced digest does not match.
    let wrong = Digest::of(b"something else").to_string();
    let (s, b) = h.call("POST", "/api/v1/packages", Body::from(bytes.clone()), &[("x-tessera-digest", &wrong)]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&b).contains("digest mismatch"));
    let (s, _) =
        h.call("POST", "/api/v1/packages", Body::from(bytes.clone()), &[("x-tessera-digest", "b3:nothex")]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Not a package at all, truncated, empty, too large.
    for body in [b"hello".to_vec(), bytes[..bytes.len() / 2].to_vec(), Vec::new()] {
        let (s, b) = h.call("POST", "/api/v1/packages", Body::from(body), &[]).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&b));
    }
    let (s, _) = h.call("POST", "/api/v1/packages", Body::from(vec![0u8; 65 << 10]), &[]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);

    // A package with a path-traversal entry.
    let mut tar = tar::Builder::new(Vec::new());
    let manifest = b"name: a.b\nversion: 1.0.0\nkind: task\nruntime: builtin\nentry: echo\n";
    let mut hd = tar::Header::new_gnu();
    hd.set_size(manifest.len() as u64);
    hd.set_mode(0o644);
    tar.append_data(&mut hd, "module.yaml", &manifest[..]).unwrap();
    let mut hd = tar::Header::new_gnu();
    hd.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
    hd.set_size(1);
    hd.set_mode(0o644);
    hd.set_cksum();
    tar.append(&hd, &b"x"[..]).unwrap();
    let evil = zstd::encode_all(&tar.into_inner().unwrap()[..], 3).unwrap();
    let (s, b) = h.call("POST", "/api/v1/packages", Body::from(evil), &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&b).contains("../escape"));

    assert_eq!(h.json("/api/v1/packages").await.1, json!([]));
    assert_eq!(h.blob_files(), 0, "nothing stored");

    // Every route that takes a model binary or a component object checks the digest the
    // header declares, and keeps nothing when it differs.
    for c in ["model", "transformation", "service", "inferencer"] {
        let doc = if c == "model" { json!({"model_name": "a.m", "model_version": "1"}) } else { json!({"id": "a.t"}) };
        let (s, b) = h
            .call("POST", &format!("/{c}"), Body::from(doc.to_string()), &[("content-type", "application/json")])
            .await;
        assert!(s.is_success(), "{c}: {s} {}", String::from_utf8_lossy(&b));
    }
    let routes = [
        ("PUT", "/api/v1/models/a.m/1.0.0"),
        ("POST", "/api/v1/models/a.m"),
        ("PUT", "/model/a.m/1"),
        ("PUT", "/transformation/a.t"),
        ("PUT", "/service/a.t"),
        ("PUT", "/inferencer/a.t"),
    ];
    for (method, uri) in routes {
        for declared in [wrong.as_str(), "b3:nothex"] {
            let (s, b) = h.call(method, uri, Body::from(&b"weights"[..]), &[("x-tessera-digest", declared)]).await;
            let b = String::from_utf8_lossy(&b);
            assert_eq!(s, StatusCode::BAD_REQUEST, "{method} {uri} with {declared}: {b}");
            assert!(b.contains("x-tessera-digest"), "{method} {uri}: {b}");
        }
        // The right digest is taken.
        let right = Digest::of(b"weights").to_string();
        let (s, b) = h.call(method, uri, Body::from(&b"weights"[..]), &[("x-tessera-digest", &right)]).await;
        assert!(s.is_success(), "{method} {uri}: {s} {}", String::from_utf8_lossy(&b));
    }
    // So does naming bytes the hub holds already, by digest.
    let named = format!("/api/v1/models/a.m/3.0.0?upload={}", Digest::of(b"weights"));
    let (s, b) = h.call("PUT", &named, Body::empty(), &[("x-tessera-digest", wrong.as_str())]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&b));
    assert!(String::from_utf8_lossy(&b).contains("x-tessera-digest"));
    assert_eq!(h.json("/api/v1/models/a.m/3.0.0/meta").await.0, StatusCode::NOT_FOUND);
    assert_eq!(h.json("/api/v1/models").await.1.as_array().map(Vec::len), Some(2), "only the right digests' models");
    assert_eq!(h.blob_files(), 1, "the one right body, stored once");
    let (_, stored) = h.json("/api/v1/models/a.m/1.0.0/meta").await;
    assert_eq!(stored["digest"], Digest::of(b"weights").to_string());
}

/// Every error answer is JSON with an `error` that says what was wrong, axum's own
/// refusals (a query string or body that does not parse, a body past the limit, an
/// unknown route or method) included.
#[tokio::test]
async fn every_error_is_json_naming_what_was_wrong() {
    let h = hub();
    let big = vec![b' '; 3 << 20];
    let cases: Vec<(&str, &str, Vec<u8>, StatusCode, &str)> = vec![
        ("GET", "/api/v1/models?limit=-1", vec![], StatusCode::BAD_REQUEST, "limit"),
        ("GET", "/api/v1/models?limit=1&limit=2", vec![], StatusCode::BAD_REQUEST, "duplicate"),
        ("GET", "/api/v1/packages?offset=99999999999999999999999", vec![], StatusCode::BAD_REQUEST, "offset"),
        ("POST", "/api/v1/models", big.clone(), StatusCode::PAYLOAD_TOO_LARGE, "limit of 2097152 bytes"),
        ("POST", "/transformation", big, StatusCode::PAYLOAD_TOO_LARGE, "limit"),
        ("GET", "/api/v1/no-such-thing", vec![], StatusCode::NOT_FOUND, "not found"),
        ("GET", "/docs/nothing/here", vec![], StatusCode::NOT_FOUND, ""),
        ("DELETE", "/api/v1/health", vec![], StatusCode::METHOD_NOT_ALLOWED, "method"),
    ];
    // Merged with another router (the binary adds the dashboard's), unknown routes still
    // answer JSON.
    let merged = h.app.clone().merge(Router::new().route("/ui", axum::routing::get(|| async { "ui" })));
    let resp =
        merged.oneshot(Request::builder().uri("/nothing/here/at/all/x").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&b).unwrap_or_default();
    assert!(v["error"].as_str().is_some_and(|e| e.starts_with("not found")), "{}", String::from_utf8_lossy(&b));
    for (method, uri, body, status, says) in cases {
        let (s, b) = h.call(method, uri, Body::from(body), &[("content-type", "application/json")]).await;
        assert_eq!(s, status, "{method} {uri}: {}", String::from_utf8_lossy(&b));
        let v: Value = serde_json::from_slice(&b).unwrap_or_else(|_| panic!("{method} {uri}: not JSON"));
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{method} {uri}: {error:?} does not say {says:?}");
    }
}

#[tokio::test]
async fn delete_keeps_the_version_number_reserved() {
    let h = hub();
    let bytes = h.package("a.b", "1.0.0", "x", "x");
    h.publish(bytes.clone()).await;
    let (s, _) = h.call("DELETE", "/api/v1/packages/a.b/1.0.0", Body::empty(), &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h.get("/api/v1/packages/a.b/1.0.0").await.0, StatusCode::NOT_FOUND);
    assert_eq!(h.get(&format!("/api/v1/blobs/{}", Digest::of(&bytes))).await.0, StatusCode::NOT_FOUND);
    assert_eq!(h.blob_files(), 0);
    assert_eq!(h.call("DELETE", "/api/v1/packages/a.b/1.0.0", Body::empty(), &[]).await.0, StatusCode::NOT_FOUND);
    // Other bytes can never take the number; the same bytes can come back.
    assert_eq!(h.publish(h.package("a.b", "1.0.0", "y", "x")).await.0, StatusCode::CONFLICT);
    assert_eq!(h.publish(bytes.clone()).await.0, StatusCode::CREATED);
    assert_eq!(h.get("/api/v1/packages/a.b/1.0.0/download").await.1, bytes);
}

#[tokio::test]
async fn search_and_aliases() {
    let h = hub();
    h.publish(h.package("fl.softmax.worker", "0.1.0", "softmax", "fl")).await;
    h.publish(h.package("fl.fedavg.aggregator", "0.1.0", "averaging", "fl,agg")).await;
    h.publish(h.package("flow.step", "0.1.0", "flow", "dataflow")).await;
    let names =
        |v: Value| v.as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(names(h.json("/api/v1/packages?prefix=fl").await.1), ["fl.fedavg.aggregator", "fl.softmax.worker"]);
    assert_eq!(names(h.json("/api/v1/packages?tag=agg").await.1), ["fl.fedavg.aggregator"]);
    assert_eq!(names(h.json("/api/v1/packages?q=SOFTMAX").await.1), ["fl.softmax.worker"]);
    assert_eq!(names(h.json("/api/v1/packages?kind=task").await.1).len(), 3);
    assert!(names(h.json("/api/v1/packages?kind=model").await.1).is_empty());
    assert_eq!(h.get("/api/v1/packages?kind=widget").await.0, StatusCode::BAD_REQUEST);

    h.publish(h.package("flow.step", "0.2.0", "flow2", "dataflow")).await;
    async fn put(h: &Hub, alias: &str, version: &str) -> StatusCode {
        let uri = format!("/api/v1/packages/flow.step/aliases/{alias}");
        let body = Body::from(json!({"version": version}).to_string());
        h.call("PUT", &uri, body, &[("content-type", "application/json")]).await.0
    }
    assert_eq!(put(&h, "stable", "0.1.0").await, StatusCode::OK);
    assert_eq!(h.json("/api/v1/packages/flow.step/stable").await.1["version"], "0.1.0");
    assert_eq!(h.json("/api/v1/packages/flow.step/latest").await.1["version"], "0.2.0");
    assert_eq!(put(&h, "latest", "0.1.0").await, StatusCode::BAD_REQUEST);
    assert_eq!(put(&h, "stable", "9.9.9").await, StatusCode::NOT_FOUND);
    assert_eq!(h.get("/api/v1/packages/flow.step/nightly").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_names_and_versions_are_refused() {
    let h = hub();
    for uri in [
        "/api/v1/packages/Bad..Name",
        "/api/v1/packages/a.b/1.0",
        "/api/v1/packages/a.b/-x",
        "/api/v1/blobs/b3:zz",
        "/api/v1/models/Bad/1.0.0/meta",
    ] {
        let (s, b) = h.get(uri).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {}", String::from_utf8_lossy(&b));
        let body: Value = serde_json::from_slice(&b).unwrap();
        assert!(body["error"].is_string());
    }
    assert_eq!(h.get("/api/v1/packages/a.b/1.0.0").await.0, StatusCode::NOT_FOUND);
    // A new version is at most 128 bytes; a longer one is still looked up (stored before the
    // bound, or restored from such a hub).
    let long = format!("1.0.0-{}", "a".repeat(200));
    let create = json!({"name": "a.b", "version": long});
    let json_type = [("content-type", "application/json")];
    let (s, b) = h.call("POST", "/api/v1/models", Body::from(create.to_string()), &json_type).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&b));
    assert!(String::from_utf8_lossy(&b).contains("the most is 128"), "{}", String::from_utf8_lossy(&b));
    let (s, _) = h.call("PUT", &format!("/api/v1/models/a.b/{long}"), Body::from(vec![1u8, 2]), &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(h.get(&format!("/api/v1/models/a.b/{long}/meta")).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn models_with_metadata_lineage_and_immutable_binaries() {
    let h = hub();
    let create =
        json!({"name": "digits.softmax", "version": "0.1.0", "metadata": {"library": "tessera", "accuracy": 0.95}});
    let (s, b) =
        h.call("POST", "/api/v1/models", Body::from(create.to_string()), &[("content-type", "application/json")]).await;
    assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
    let (s, _) =
        h.call("POST", "/api/v1/models", Body::from(create.to_string()), &[("content-type", "application/json")]).await;
    assert_eq!(s, StatusCode::CONFLICT);

    let weights = vec![1u8, 2, 3, 4];
    let (s, b) = h.call("PUT", "/api/v1/models/digits.softmax/0.1.0", Body::from(weights.clone()), &[]).await;
    assert_eq!(s, StatusCode::CREATED);
    let rec: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(rec["digest"], Digest::of(&weights).to_string());
    assert_eq!(rec["metadata"]["library"], "tessera");
    assert_eq!(
        h.call("PUT", "/api/v1/models/digits.softmax/0.1.0", Body::from(weights.clone()), &[]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        h.call("PUT", "/api/v1/models/digits.softmax/0.1.0", Body::from(vec![9u8]), &[]).await.0,
        StatusCode::CONFLICT
    );
    assert_eq!(h.get("/api/v1/models/digits.softmax/0.1.0").await.1, weights);

    // A binary pushed without a record first gets one.
    assert_eq!(
        h.call("PUT", "/api/v1/models/digits.softmax/0.2.0", Body::from(vec![5u8]), &[]).await.0,
        StatusCode::CREATED
    );
    assert_eq!(h.get("/api/v1/models/digits.softmax/latest").await.1, vec![5u8]);
    assert_eq!(h.json("/api/v1/models/digits.softmax/latest/meta").await.1["version"], "0.2.0");

    let meta = json!({"metadata": {"note": "retrained"}});
    let (s, b) = h
        .call(
            "PUT",
            "/api/v1/models/digits.softmax/0.1.0/meta",
            Body::from(meta.to_string()),
            &[("content-type", "application/json")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert_eq!(h.json("/api/v1/models/digits.softmax/0.1.0/meta").await.1["metadata"]["note"], "retrained");
    let bad = json!({"metadata": [1, 2]});
    let (s, _) = h
        .call(
            "PUT",
            "/api/v1/models/digits.softmax/0.1.0/meta",
            Body::from(bad.to_string()),
            &[("content-type", "application/json")],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let (_, list) = h.json("/api/v1/models?prefix=digits").await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(h.call("DELETE", "/api/v1/models/digits.softmax/0.2.0", Body::empty(), &[]).await.0, StatusCode::OK);
    assert_eq!(h.get("/api/v1/models/digits.softmax/0.2.0").await.0, StatusCode::NOT_FOUND);
    assert_eq!(h.get("/api/v1/models/digits.softmax/0.1.0").await.1, weights);
}

#[tokio::test]
async fn the_docs_list_every_route() {
    let h = hub();
    let (s, doc) = h.json("/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    let paths: std::collections::BTreeSet<String> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, item)| item.as_object().unwrap().keys().map(move |m| format!("{} {p}", m.to_uppercase())))
        .collect();
    let expected = [
        "GET /api/v1/health",
        "POST /api/v1/packages",
        "GET /api/v1/packages",
        "GET /api/v1/packages/{name}",
        "GET /api/v1/packages/{name}/{version}",
        "DELETE /api/v1/packages/{name}/{version}",
        "GET /api/v1/packages/{name}/{version}/download",
        "PUT /api/v1/packages/{name}/aliases/{alias}",
        "GET /api/v1/blobs/{digest}",
        "POST /api/v1/models",
        "GET /api/v1/models",
        "POST /api/v1/models/{name}",
        "PUT /api/v1/models/{name}/{version}",
        "GET /api/v1/models/{name}/{version}",
        "DELETE /api/v1/models/{name}/{version}",
        "GET /api/v1/models/{name}/{version}/meta",
        "PUT /api/v1/models/{name}/{version}/meta",
        "GET /api/v1/namespaces/{namespace}",
        "PUT /api/v1/namespaces/{namespace}/owners/{key}",
        "DELETE /api/v1/namespaces/{namespace}/owners/{key}",
        "GET /api/v1/digests/{digest}",
        "GET /api/v1/packages/{name}/grants",
        "PUT /api/v1/packages/{name}/grants/{key}",
        "DELETE /api/v1/packages/{name}/grants/{key}",
        "GET /api/v1/accounts/{key}/usage",
        "GET /api/v1/models/{name}/{version}/tensors",
        "GET /api/v1/models/{name}/{version}/card",
        "GET /api/v1/models/{name}/{version}/lineage",
        "GET /api/v1/packages/{name}/{version}/card",
        "POST /api/v1/uploads",
        "GET /api/v1/uploads/{id}",
        "PATCH /api/v1/uploads/{id}",
        "DELETE /api/v1/uploads/{id}",
        "POST /{collection}",
        "GET /{collection}",
        "GET /{collection}/meta",
        "GET /api/v1/components/{collection}/{id}/package",
        "PUT /{collection}/{id}",
        "GET /{collection}/{id}",
        "DELETE /{collection}/{id}",
        "PUT /{collection}/meta/{id}",
        "PUT /{collection}/{model_name}/{model_version}",
        "GET /{collection}/{model_name}/{model_version}",
        "DELETE /{collection}/{model_name}/{model_version}",
        "PUT /{collection}/meta/{model_name}/{model_version}",
    ];
    let expected: std::collections::BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    assert_eq!(paths, expected);
    assert!(doc["components"]["schemas"]["PackageRecord"].is_object());
    // The signature header is a security scheme, and the routes that take it say so.
    let scheme = &doc["components"]["securitySchemes"]["tessera_signature"];
    assert_eq!((scheme["type"].as_str(), scheme["in"].as_str()), (Some("apiKey"), Some("header")), "{scheme}");
    assert_eq!(scheme["name"], "x-tessera-signature");
    let publish = &doc["paths"]["/api/v1/packages"]["post"]["security"];
    assert!(publish.to_string().contains("tessera_signature"), "{publish}");

    let (s, page) = h.get("/docs/").await;
    assert_eq!(s, StatusCode::OK);
    let page = String::from_utf8(page).unwrap();
    assert!(page.contains("swagger-ui"), "{page}");
    // The page's assets are served by the hub itself (no CDN).
    assert!(!page.contains("https://"), "the docs page must work offline");
    // Swagger's online validator is off: opening the page contacts no other host.
    let (s, init) = h.get("/docs/swagger-initializer.js").await;
    assert_eq!(s, StatusCode::OK);
    let init = String::from_utf8(init).unwrap();
    assert!(init.contains(r#""validatorUrl": "none""#), "{init}");
    let (s, js) = h.get("/docs/swagger-ui-bundle.js").await;
    assert_eq!(s, StatusCode::OK);
    assert!(js.len() > 100_000);
    assert_eq!(h.json("/api/v1/health").await.1["status"], "ok");
}
