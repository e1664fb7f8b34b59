//! A Component Repository client, written from its README (the routes and example bodies
//! quoted there), against the hub: every route of the four collections.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tessera_core::Digest;
use tessera_hub::{AppState, HubPolicy, HubStore, app};
use tower::ServiceExt;

struct Hub {
    app: Router,
    dir: tempfile::TempDir,
    store: std::sync::Arc<HubStore>,
}

fn hub(policy: HubPolicy) -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(tessera_hub::testing::open_store(dir.path().join("hub")));
    Hub { app: app(AppState::new(store.clone(), policy)), dir, store }
}

const BOUNDARY: &str = "----component-repository-client";

/// A `multipart/form-data` body with one `file` part, as `requests.put(url, files={"file": ...})`
/// sends it.
fn multipart(bytes: &[u8]) -> Vec<u8> {
    let mut b = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"object.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    b.extend_from_slice(bytes);
    b.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    b
}

impl Hub {
    async fn call(&self, method: &str, uri: &str, body: Vec<u8>, ctype: Option<&str>) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(c) = ctype {
            req = req.header("content-type", c);
        }
        let resp = self.app.clone().oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
    }
    async fn json(&self, method: &str, uri: &str, body: Option<&Value>) -> (StatusCode, Value) {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap()).unwrap_or_default();
        let (s, b) = self.call(method, uri, bytes, body.map(|_| "application/json")).await;
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }
    async fn upload(&self, uri: &str, bytes: &[u8]) -> StatusCode {
        let ctype = format!("multipart/form-data; boundary={BOUNDARY}");
        self.call("PUT", uri, multipart(bytes), Some(&ctype)).await.0
    }
    /// Every file under the blob directory.
    fn blob_files(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![self.store.blobs().dir().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }
}

/// The README's example documents, verbatim, with the path naming each.
fn examples() -> Vec<(&'static str, Value, String)> {
    vec![
        (
            "model",
            json!({
                "meta": {
                  "library": "keras",
                  "description": "A CNN (Convolutional Neural Network) designed to solve the CIFAR-10 image classification task. Used as a test model for the development of the Keras library."
                },
                "model_name": "base",
                "model_version": "base2",
                "model_id": "62aae16f6ee3b61c9c6c2921"
            }),
            "base/base2".into(),
        ),
        (
            "transformation",
            json!({
                "id": "custom.preprocess_tensorflow_tensor",
                "description": "A transformation that takes a TensorProto as defined in Tensorflow Core and reshapes it based on the size data",
                "parameter_types": {},
                "default_values": {},
                "outputs": ["np.ndarray"],
                "needs": {
                  "storage": 0,
                  "RAM": 0,
                  "GPU": false,
                  "preinstalled_libraries": {"tensorflow": "2.12.0"},
                  "available_models": {}
                }
            }),
            "custom.preprocess_tensorflow_tensor".into(),
        ),
        (
            "service",
            json!({
                "id": "inference_application.code.services.extended_inference_svc",
                "description": "A general bidirectional gRPC streaming service that accepts a map of TensorProto and returns a map of TensorProto",
                "needs": {
                  "storage": 0,
                  "RAM": 0,
                  "GPU": false,
                  "preinstalled_libraries": {},
                  "available_models": {}
                }
            }),
            "inference_application.code.services.extended_inference_svc".into(),
        ),
        (
            "inferencer",
            json!({
                "id": "inference_application.code.inferencers.torch_rcnn_inferencer",
                "description": "An inferencer that can load and use an RCNN model in Torch",
                "library": "torch",
                "use_cuda": true,
                "needs": {
                  "storage": 0,
                  "RAM": 0,
                  "GPU": false,
                  "preinstalled_libraries": {},
                  "available_models": {}
                }
            }),
            "inference_application.code.inferencers.torch_rcnn_inferencer".into(),
        ),
    ]
}

/// The document as stored: what was sent, but the server's `model_id`.
fn sent_fields(doc: &Value) -> Vec<(String, Value)> {
    doc.as_object().unwrap().iter().filter(|(k, _)| *k != "model_id").map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[tokio::test]
async fn every_route_of_the_four_collections_works_with_the_readme_bodies() {
    let h = hub(HubPolicy::open());
    for (collection, doc, key) in examples() {
        let base = format!("/{collection}");
        let object = format!("/{collection}/{key}");
        let meta_route = format!("/{collection}/meta/{key}");

        // POST /{collection}: create the metadata.
        let (s, created) = h.json("POST", &base, Some(&doc)).await;
        assert_eq!(s, StatusCode::CREATED, "{collection}: {created}");
        let (s, again) = h.json("POST", &base, Some(&doc)).await;
        assert_eq!(s, StatusCode::CONFLICT, "{collection}: a second create is refused: {again}");

        // GET /{collection}: the list has the document as sent.
        let (s, list) = h.json("GET", &base, None).await;
        assert_eq!(s, StatusCode::OK);
        let list = list.as_array().unwrap().clone();
        assert_eq!(list.len(), 1, "{collection}: {list:?}");
        for (k, v) in sent_fields(&doc) {
            assert_eq!(list[0][&k], v, "{collection}: field {k}");
        }
        // No object yet.
        assert_eq!(h.call("GET", &object, vec![], None).await.0, StatusCode::NOT_FOUND, "{collection}");

        // PUT /{collection}/{id}: the object.
        let first = format!("{collection} object, first revision").into_bytes();
        assert_eq!(h.upload(&object, &first).await, StatusCode::NO_CONTENT, "{collection}");
        let (s, got) = h.call("GET", &object, vec![], None).await;
        assert_eq!((s, got.as_slice()), (StatusCode::OK, first.as_slice()), "{collection}");

        // Replacing it: the name moves, the old bytes stay reachable by digest.
        let second = format!("{collection} object, second revision").into_bytes();
        assert_eq!(h.upload(&object, &second).await, StatusCode::NO_CONTENT, "{collection}");
        assert_eq!(h.call("GET", &object, vec![], None).await.1, second, "{collection}");
        let old = Digest::of(&first);
        let (s, old_bytes) = h.call("GET", &format!("/api/v1/blobs/{old}"), vec![], None).await;
        assert_eq!((s, old_bytes), (StatusCode::OK, first.clone()), "{collection}: the first revision by digest");

        // PUT /{collection}/meta/{id}: the metadata.
        let update = if collection == "model" {
            json!({"meta": {"library": "keras", "description": "retrained"}})
        } else {
            let mut d = doc.clone();
            d["description"] = json!("updated description");
            d
        };
        let (s, body) = h.json("PUT", &meta_route, Some(&update)).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{collection}: {body}");

        // The metadata now: GET /model/meta?model_name=&model_version= for models, the
        // list for every collection.
        let shown = if collection == "model" {
            let (s, m) = h.json("GET", "/model/meta?model_name=base&model_version=base2", None).await;
            assert_eq!(s, StatusCode::OK, "{m}");
            assert_eq!(m["meta"]["description"], "retrained");
            assert_eq!(m["model_id"], Digest::of(&second).to_string(), "model_id names the current object");
            m
        } else {
            let (_, list) = h.json("GET", &base, None).await;
            assert_eq!(list[0]["description"], "updated description", "{collection}");
            list[0].clone()
        };
        let revisions = shown["tessera"]["revisions"].as_array().unwrap();
        assert_eq!(revisions.len(), 2, "{collection}: {shown}");
        assert_eq!(revisions[0]["digest"], old.to_string());
        assert_eq!(shown["tessera"]["revision"], 2);

        // DELETE /{collection}/{id}: metadata and objects go, no blob is left behind.
        assert_eq!(h.call("DELETE", &object, vec![], None).await.0, StatusCode::NO_CONTENT, "{collection}");
        assert_eq!(h.call("GET", &object, vec![], None).await.0, StatusCode::NOT_FOUND, "{collection}");
        assert_eq!(h.json("GET", &base, None).await.1, json!([]), "{collection}");
        assert_eq!(h.call("GET", &format!("/api/v1/blobs/{old}"), vec![], None).await.0, StatusCode::NOT_FOUND);
        assert_eq!(h.blob_files(), Vec::<String>::new(), "{collection}: orphaned blobs");
        assert_eq!(h.call("DELETE", &object, vec![], None).await.0, StatusCode::NOT_FOUND, "{collection}");
    }
}

#[tokio::test]
async fn needs_are_read_as_a_modules_needs() {
    let h = hub(HubPolicy::open());
    let (_, doc, _) = examples().into_iter().nth(1).unwrap();
    let (s, created) = h.json("POST", "/transformation", Some(&doc)).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let needs = &created["tessera"]["needs"];
    assert_eq!(needs["libraries"], json!(["tensorflow==2.12.0"]), "{created}");
    assert_eq!((needs["gpu"].as_u64(), needs["memory"].as_u64()), (Some(0), Some(0)), "{created}");
    let big = json!({"id": "big.gpu", "needs": {"storage": 2.5, "RAM": 16, "GPU": true}});
    let (s, created) = h.json("POST", "/inferencer", Some(&big)).await;
    assert_eq!(s, StatusCode::CREATED);
    let needs = &created["tessera"]["needs"];
    assert_eq!(
        (needs["gpu"].as_u64(), needs["memory"].as_u64(), needs["storage"].as_u64()),
        (Some(1), Some(16_000_000_000), Some(2_500_000_000)),
        "{created}"
    );
    // Needs are an object: not a list read by position, nor a number.
    for needs in [json!([5, 3, true, {"numpy": "1.0"}]), json!(7)] {
        let doc = json!({"id": "odd.needs", "needs": needs});
        let (s, body) = h.json("POST", "/inferencer", Some(&doc)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{needs}: {body}");
        assert!(body["error"].as_str().unwrap_or_default().contains("not an object"), "{body}");
    }
}

/// An entry whose object is a Tessera package can be run as that package: its record, with
/// the entry's needs joined to the manifest's, at `/api/v1/components/{c}/{id}/package`;
/// nodes find it by digest. Anything else is refused by name.
#[tokio::test]
async fn an_entry_whose_object_is_a_package_resolves_as_that_package() {
    let h = hub(HubPolicy::open());
    let module = h.dir.path().join("module");
    std::fs::create_dir_all(&module).unwrap();
    std::fs::write(
        module.join("module.yaml"),
        "name: acme.scale\nversion: 1.2.0\nkind: task\nruntime: python\nentry: main.py\nneeds:\n  cpu: 2\n  memory: 1GiB\n  libraries: [numpy]\n",
    )
    .unwrap();
    std::fs::write(module.join("main.py"), "print('scaled')\n").unwrap();
    let packed = tessera_package::pack_dir(&module, &tessera_package::Limits::default()).unwrap();
    let doc = json!({"id": "acme.scale", "needs": {"storage": 0, "RAM": 8, "GPU": true, "preinstalled_libraries": {"scipy": ">=1.11"}}});
    assert_eq!(h.json("POST", "/transformation", Some(&doc)).await.0, StatusCode::CREATED);
    let (s, body) = h.json("GET", "/api/v1/components/transformation/acme.scale/package", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "no object yet: {body}");
    assert_eq!(h.upload("/transformation/acme.scale", &packed.bytes).await, StatusCode::NO_CONTENT);

    let (s, record) = h.json("GET", "/api/v1/components/transformation/acme.scale/package", None).await;
    assert_eq!(s, StatusCode::OK, "{record}");
    assert_eq!((record["name"].as_str(), record["version"].as_str()), (Some("acme.scale"), Some("1.2.0")));
    assert_eq!(record["digest"], json!(packed.digest.to_string()));
    assert_eq!(record["component"], json!("transformation/acme.scale"));
    let needs = &record["manifest"]["needs"];
    assert_eq!(
        (needs["cpu"].as_f64(), needs["memory"].as_u64(), needs["gpu"].as_u64()),
        (Some(2.0), Some(8_000_000_000), Some(1))
    );
    assert_eq!(needs["libraries"], json!(["numpy", "scipy>=1.11"]));
    // By digest (as nodes fetch it): the package's own needs, no entry named.
    let (s, by_digest) = h.json("GET", &format!("/api/v1/digests/{}", packed.digest), None).await;
    assert_eq!(s, StatusCode::OK, "{by_digest}");
    assert_eq!(by_digest["manifest"]["needs"]["memory"].as_u64(), Some(1 << 30));
    assert!(by_digest.get("component").is_none(), "{by_digest}");
    // The same through the store's package source, as the coordinator resolves it.
    let source = tessera_hub::LocalHub(h.store.clone());
    let r =
        tessera_ports::PackageSource::resolve(&source, &"transformation/acme.scale".parse().unwrap()).await.unwrap();
    assert_eq!((r.digest, r.manifest.needs.gpu), (packed.digest, 1));

    // No such entry, a model, names that are no names, and an object that is no package.
    for (uri, status) in [
        ("/api/v1/components/transformation/acme.nothing/package", StatusCode::NOT_FOUND),
        ("/api/v1/components/model/acme.scale/package", StatusCode::BAD_REQUEST),
        ("/api/v1/components/pipeline/acme.scale/package", StatusCode::BAD_REQUEST),
        ("/api/v1/components/transformation/..%2Fx/package", StatusCode::BAD_REQUEST),
        ("/api/v1/components/transformation/meta/package", StatusCode::BAD_REQUEST),
        ("/api/v1/components/service/a%20b/package", StatusCode::BAD_REQUEST),
    ] {
        let (s, body) = h.json("GET", uri, None).await;
        assert_eq!(s, status, "{uri}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{uri}: {body}");
    }
    let long = format!("/api/v1/components/service/{}/package", "a".repeat(10_000));
    assert_eq!(h.json("GET", &long, None).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(h.upload("/transformation/acme.scale", b"a pickle").await, StatusCode::NO_CONTENT);
    let (s, body) = h.json("GET", "/api/v1/components/transformation/acme.scale/package", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().unwrap().contains("not a Tessera package"), "{body}");
    // The earlier revision is still a package by digest; the pickle is none.
    assert_eq!(h.json("GET", &format!("/api/v1/digests/{}", packed.digest), None).await.0, StatusCode::OK);
    let pickle = Digest::of(b"a pickle");
    assert_eq!(h.json("GET", &format!("/api/v1/digests/{pickle}"), None).await.0, StatusCode::NOT_FOUND);

    // An entry of namespace `evil` holding a module of namespace `acme` does not pass it
    // off as acme's: refused by name, and not found by digest.
    std::fs::write(
        module.join("module.yaml"),
        "name: acme.worker\nversion: 9.9.9\nkind: task\nruntime: python\nentry: main.py\n",
    )
    .unwrap();
    let impostor = tessera_package::pack_dir(&module, &tessera_package::Limits::default()).unwrap();
    assert_eq!(h.json("POST", "/service", Some(&json!({"id": "evil.x"}))).await.0, StatusCode::CREATED);
    assert_eq!(h.upload("/service/evil.x", &impostor.bytes).await, StatusCode::NO_CONTENT);
    let (s, body) = h.json("GET", "/api/v1/components/service/evil.x/package", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().unwrap().contains("namespace evil may hold only its own modules"), "{body}");
    let (s, body) = h.json("GET", &format!("/api/v1/digests/{}", impostor.digest), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn hostile_requests_are_refused_and_change_nothing() {
    let h = hub(HubPolicy::open());
    let service = json!({"id": "ops.svc", "description": "kept"});
    assert_eq!(h.json("POST", "/service", Some(&service)).await.0, StatusCode::CREATED);
    assert_eq!(h.upload("/service/ops.svc", b"kept bytes").await, StatusCode::NO_CONTENT);
    let before = (h.json("GET", "/service", None).await.1, h.blob_files());

    let huge = json!({"id": "ops.huge", "description": "x".repeat(2 << 20)});
    let cases: Vec<(&str, String, Vec<u8>, StatusCode)> = vec![
        ("POST", "/models".into(), b"{}".to_vec(), StatusCode::NOT_FOUND),
        ("POST", "/service".into(), b"not json".to_vec(), StatusCode::BAD_REQUEST),
        ("POST", "/service".into(), b"[1,2]".to_vec(), StatusCode::BAD_REQUEST),
        ("POST", "/service".into(), serde_json::to_vec(&json!({"id": ".."})).unwrap(), StatusCode::BAD_REQUEST),
        ("POST", "/service".into(), serde_json::to_vec(&json!({"id": "a..b"})).unwrap(), StatusCode::BAD_REQUEST),
        ("POST", "/service".into(), serde_json::to_vec(&json!({"id": "meta"})).unwrap(), StatusCode::BAD_REQUEST),
        ("POST", "/service".into(), serde_json::to_vec(&json!({"id": 7})).unwrap(), StatusCode::BAD_REQUEST),
        ("POST", "/service".into(), serde_json::to_vec(&json!({"id": "ops.svc"})).unwrap(), StatusCode::CONFLICT),
        (
            "POST",
            "/service".into(),
            serde_json::to_vec(&json!({"id": "ops.n", "needs": {"RAM": 1e300}})).unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/service".into(),
            serde_json::to_vec(&json!({"id": "ops.n", "needs": {"storage": -1}})).unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        ("POST", "/service".into(), serde_json::to_vec(&huge).unwrap(), StatusCode::PAYLOAD_TOO_LARGE),
        ("PUT", "/service/meta/ops.svc".into(), b"{\"id\": \"ops.other\"}".to_vec(), StatusCode::BAD_REQUEST),
        ("PUT", "/service/meta/ops.svc".into(), b"{\"needs\": {\"GPU\": 3}}".to_vec(), StatusCode::BAD_REQUEST),
        ("PUT", "/service/meta/ops.svc".into(), b"[]".to_vec(), StatusCode::BAD_REQUEST),
        ("PUT", "/service/meta/ops.none".into(), b"{}".to_vec(), StatusCode::NOT_FOUND),
        ("PUT", "/service/ops.none".into(), b"bytes".to_vec(), StatusCode::NOT_FOUND),
        ("PUT", "/service/a..b".into(), b"bytes".to_vec(), StatusCode::BAD_REQUEST),
        ("PUT", "/service/ops.svc/extra".into(), b"bytes".to_vec(), StatusCode::NOT_FOUND),
        ("PUT", "/model/ops.m".into(), b"bytes".to_vec(), StatusCode::NOT_FOUND),
        ("PUT", "/model/meta/ops.m".into(), b"{}".to_vec(), StatusCode::NOT_FOUND),
        ("GET", "/model/meta?model_name=ops.m".into(), vec![], StatusCode::BAD_REQUEST),
        ("GET", "/model/meta?model_name=..&model_version=1".into(), vec![], StatusCode::BAD_REQUEST),
        ("GET", "/service/%2e%2e".into(), vec![], StatusCode::BAD_REQUEST),
        ("DELETE", "/service/ops.none".into(), vec![], StatusCode::NOT_FOUND),
        ("DELETE", "/unknown/ops.svc".into(), vec![], StatusCode::NOT_FOUND),
        ("GET", "/service?limit=99999999999999999999999".into(), vec![], StatusCode::BAD_REQUEST),
    ];
    for (method, path, body, expected) in cases {
        let (s, b) = h.call(method, &path, body, Some("application/json")).await;
        assert_eq!(s, expected, "{method} {path}: {}", String::from_utf8_lossy(&b));
        assert_eq!(
            (h.json("GET", "/service", None).await.1, h.blob_files()),
            before,
            "{method} {path} changed the hub"
        );
    }
    // A multipart upload with another part than `file` is refused and leaves nothing.
    let bad = "--b\r\nContent-Disposition: form-data; name=\"meta\"\r\n\r\n{}\r\n--b--\r\n";
    let (s, _) = h.call("PUT", "/service/ops.svc", bad.into(), Some("multipart/form-data; boundary=b")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!((h.json("GET", "/service", None).await.1, h.blob_files()), before);
    let leftovers: Vec<_> = std::fs::read_dir(h.store.blobs().dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    drop(h.dir);
}

#[tokio::test]
async fn a_signed_hub_refuses_unsigned_writes_and_other_owners() {
    use tessera_identity::envelope::HEADER;
    use tessera_identity::{Envelope, KeyPair, KeyType, now_ms};
    let h = hub(HubPolicy::signed());
    let hub_key = h.store.key().public().clone();
    let send = |key: Option<&KeyPair>, method: &'static str, path: &str, body: Vec<u8>| {
        let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
        if let Some(k) = key {
            let env = Envelope::sign(k, &hub_key, method, path, &body, now_ms());
            req = req.header(HEADER, env.to_header());
        }
        let app = h.app.clone();
        async move { app.oneshot(req.body(Body::from(body)).unwrap()).await.unwrap().status() }
    };
    let owner = KeyPair::generate(KeyType::Ed25519);
    let other = KeyPair::generate(KeyType::Ed25519);
    let doc = serde_json::to_vec(&json!({"id": "team.svc", "description": "d"})).unwrap();
    assert_eq!(send(None, "POST", "/service", doc.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(send(Some(&owner), "POST", "/service", doc.clone()).await, StatusCode::CREATED);
    // The namespace `team` is the owner's now: another key may not touch it.
    let other_doc = serde_json::to_vec(&json!({"id": "team.other"})).unwrap();
    assert_eq!(send(Some(&other), "POST", "/service", other_doc).await, StatusCode::FORBIDDEN);
    let update = serde_json::to_vec(&json!({"description": "stolen"})).unwrap();
    assert_eq!(send(Some(&other), "PUT", "/service/meta/team.svc", update).await, StatusCode::FORBIDDEN);
    assert_eq!(send(Some(&other), "DELETE", "/service/team.svc", vec![]).await, StatusCode::FORBIDDEN);
    assert_eq!(send(Some(&other), "PUT", "/service/team.svc", b"bytes".to_vec()).await, StatusCode::FORBIDDEN);
    assert_eq!(send(None, "GET", "/service", vec![]).await, StatusCode::OK, "reads stay open");
    let rec = h.store.component(tessera_hub::Collection::Service, "team.svc").unwrap();
    assert_eq!(rec.document["description"], "d");
    assert!(rec.revisions.is_empty());
    assert_eq!(send(Some(&owner), "DELETE", "/service/team.svc", vec![]).await, StatusCode::NO_CONTENT);
}
