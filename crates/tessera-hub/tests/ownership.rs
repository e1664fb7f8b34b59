//! One ownership rule for everything named: for every route the router serves (listed from
//! the OpenAPI document, which the router is built from), a signed key that owns nothing
//! changes nothing and reads nothing private. A route without a case here fails the test.
//! Then the reproductions of holes found by trying the hub as an attacker would.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tessera_core::Digest;
use tessera_hub::{AppState, HubPolicy, HubStore, app};
use tessera_identity::envelope::HEADER;
use tessera_identity::{Envelope, KeyPair, KeyType, PACKAGE_SIGNATURE_HEADER, PackageSignature, PublicKey, now_ms};
use tessera_package::{Limits, pack_dir};
use tower::ServiceExt;

const SECRET: &str = "s3cr3t-token-in-the-config";

struct Hub {
    app: Router,
    store: Arc<HubStore>,
    work: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

struct Req {
    method: &'static str,
    path: String,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
}

fn hub() -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(tessera_hub::testing::open_store(dir.path().join("hub")));
    Hub {
        app: app(AppState::new(store.clone(), HubPolicy::signed())),
        store,
        work: tempfile::tempdir().unwrap(),
        _dir: dir,
    }
}

fn write_module(dir: &Path, name: &str, version: &str, note: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("module.yaml"),
        // Only private modules carry the secret (a public module's config is public).
        if name.contains("secret") {
            format!("name: {name}\nversion: {version}\nkind: task\nruntime: builtin\nentry: echo\nconfig:\n  token: {SECRET}\n")
        } else {
            format!("name: {name}\nversion: {version}\nkind: task\nruntime: builtin\nentry: echo\n")
        },
    )
    .unwrap();
    std::fs::write(dir.join("notes.txt"), note).unwrap();
}

impl Hub {
    fn key(&self) -> PublicKey {
        self.store.key().public().clone()
    }
    fn package(&self, name: &str, version: &str, note: &str) -> Vec<u8> {
        let dir = self.work.path().join(format!("{name}-{version}-{}", Digest::of(note.as_bytes()).hex()));
        write_module(&dir, name, version, note);
        pack_dir(&dir, &Limits::default()).unwrap().bytes
    }
    async fn send(&self, r: Req) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(r.method).uri(&r.path);
        for (k, v) in &r.headers {
            req = req.header(k, v);
        }
        let resp = self.app.clone().oneshot(req.body(Body::from(r.body)).unwrap()).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
    }
    async fn json(&self, r: Req) -> (StatusCode, Value) {
        let (s, b) = self.send(r).await;
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }
    /// Everything the hub holds, as its owner sees it: records, namespaces, grants, aliases
    /// resolved, model metadata and binaries' digests, and the blob files.
    async fn state(&self, owner: &KeyPair) -> Value {
        let mut out = BTreeMap::new();
        for path in [
            "/api/v1/packages?all=true",
            "/api/v1/models",
            "/api/v1/namespaces/team",
            "/api/v1/namespaces/solo",
            "/api/v1/packages/team.pkg/stable",
            "/api/v1/models/team.weights/1.0.0/meta",
            "/api/v1/models/solo.weights/1.0.0/meta",
            "/service",
            "/model",
            "/service/team.svc",
            "/model/team/v1",
        ] {
            out.insert(path.to_owned(), self.json(get(path)).await.1);
        }
        let grants = self.json(signed(owner, &self.key(), "GET", "/api/v1/packages/team.secret/grants", vec![])).await;
        out.insert("grants".into(), grants.1);
        let mut blobs: Vec<String> = walk(&self.store.blobs().dir().to_path_buf());
        blobs.sort();
        out.insert("blobs".into(), json!(blobs));
        // Download counters are what a read may change.
        let mut state = json!(out);
        drop_downloads(&mut state);
        state
    }
}

fn drop_downloads(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("downloads");
            m.values_mut().for_each(drop_downloads);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_downloads),
        _ => {}
    }
}

fn walk(dir: &std::path::PathBuf) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    out
}

fn get(path: &str) -> Req {
    Req { method: "GET", path: path.into(), body: Vec::new(), headers: Vec::new() }
}

fn signed(key: &KeyPair, audience: &PublicKey, method: &'static str, path: &str, body: Vec<u8>) -> Req {
    let env = Envelope::sign(key, audience, method, path, &body, now_ms());
    Req { method, path: path.into(), body, headers: vec![(HEADER.into(), env.to_header())] }
}

fn publish(h: &Hub, key: &KeyPair, bytes: Vec<u8>) -> Req {
    let sig = PackageSignature::sign(key, &Digest::of(&bytes));
    let mut r = signed(key, &h.key(), "POST", "/api/v1/packages", bytes);
    r.headers.push((PACKAGE_SIGNATURE_HEADER.into(), sig.to_header()));
    r.headers.extend(declared(&r.body));
    r
}

/// The `x-tessera-package` declaration of a (plain) package's bytes; none for anything else.
fn declared(bytes: &[u8]) -> Option<(String, String)> {
    let m = tessera_package::inspect(bytes, &tessera_package::Limits::default()).ok()?.manifest;
    Some(("x-tessera-package".into(), format!("{}@{}", m.name, m.version)))
}

fn private_manifest(name: &str) -> String {
    let m = json!({"name": name, "version": "1.0.0", "kind": "task", "runtime": "builtin", "entry": "echo",
                   "description": "a private module", "config": {"token": SECRET}});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(m.to_string())
}

/// A hub where `owner` has published team.pkg (aliased `stable`), a private team.secret
/// sealed for `reader`, pushed team.weights and, in a namespace that holds only models,
/// solo.weights.
async fn populated(h: &Hub, owner: &KeyPair, reader: &KeyPair) -> String {
    let k = h.key();
    assert_eq!(h.send(publish(h, owner, h.package("team.pkg", "1.0.0", "a"))).await.0, StatusCode::CREATED);
    let alias = serde_json::to_vec(&json!({"version": "1.0.0"})).unwrap();
    assert_eq!(
        h.send(signed(owner, &k, "PUT", "/api/v1/packages/team.pkg/aliases/stable", alias)).await.0,
        StatusCode::OK
    );
    let plain = h.package("team.secret", "1.0.0", "private");
    let sealed = tessera_identity::seal::seal(&plain, &[reader.public().clone()]).unwrap();
    let mut r = publish(h, owner, sealed);
    r.headers.push(("x-tessera-manifest".into(), private_manifest("team.secret")));
    let (s, rec) = h.json(r).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    for name in ["team.weights", "solo.weights"] {
        let path = format!("/api/v1/models/{name}/1.0.0");
        let (s, b) = h.json(signed(owner, &k, "PUT", &path, b"weights of the owner".to_vec())).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let meta = serde_json::to_vec(&json!({"metadata": {"accuracy": 0.9}})).unwrap();
        assert_eq!(h.send(signed(owner, &k, "PUT", &format!("{path}/meta"), meta)).await.0, StatusCode::OK);
    }
    // Component Repository entries under the owner's namespace, with objects.
    for (collection, doc, object) in [
        ("service", json!({"id": "team.svc", "description": "the owner's"}), "/service/team.svc"),
        ("model", json!({"model_name": "team", "model_version": "v1", "meta": {}}), "/model/team/v1"),
    ] {
        let (s, b) =
            h.json(signed(owner, &k, "POST", &format!("/{collection}"), serde_json::to_vec(&doc).unwrap())).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        assert_eq!(
            h.send(signed(owner, &k, "PUT", object, b"the owner's object".to_vec())).await.0,
            StatusCode::NO_CONTENT
        );
    }
    rec["digest"].as_str().unwrap().to_owned()
}

/// Route templates the router serves, as `METHOD /path`.
async fn routes(h: &Hub) -> BTreeSet<String> {
    let (_, doc) = h.json(get("/openapi.json")).await;
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, item)| item.as_object().unwrap().keys().map(move |m| format!("{} {p}", m.to_uppercase())))
        .collect()
}

#[tokio::test]
async fn a_key_that_owns_nothing_changes_nothing_and_reads_nothing_private_on_any_route() {
    let h = hub();
    let owner = KeyPair::generate(KeyType::Ed25519);
    let reader = KeyPair::generate(KeyType::Ed25519);
    let other = KeyPair::generate(KeyType::Ed25519);
    let secret_digest = populated(&h, &owner, &reader).await;
    let k = h.key();
    let o = &other;
    let json_body = |v: Value| serde_json::to_vec(&v).unwrap();
    // For each route: the stranger's request, and the statuses that may answer it.
    let forbidden = &[StatusCode::FORBIDDEN][..];
    let public = &[StatusCode::OK][..];
    let mut cases: BTreeMap<&str, (Req, &[StatusCode])> = BTreeMap::new();
    cases.insert("GET /api/v1/health", (get("/api/v1/health"), public));
    cases.insert("POST /api/v1/packages", (publish(&h, o, h.package("team.pkg", "2.0.0", "mine now")), forbidden));
    cases.insert("GET /api/v1/packages", (signed(o, &k, "GET", "/api/v1/packages?all=true", vec![]), public));
    cases.insert("GET /api/v1/packages/{name}", (signed(o, &k, "GET", "/api/v1/packages/team.secret", vec![]), public));
    cases.insert(
        "GET /api/v1/packages/{name}/{version}",
        (signed(o, &k, "GET", "/api/v1/packages/team.secret/1.0.0", vec![]), public),
    );
    cases.insert(
        "DELETE /api/v1/packages/{name}/{version}",
        (signed(o, &k, "DELETE", "/api/v1/packages/team.pkg/1.0.0", vec![]), forbidden),
    );
    cases.insert(
        "GET /api/v1/packages/{name}/{version}/download",
        (signed(o, &k, "GET", "/api/v1/packages/team.secret/1.0.0/download", vec![]), forbidden),
    );
    cases.insert(
        "PUT /api/v1/packages/{name}/aliases/{alias}",
        (
            signed(o, &k, "PUT", "/api/v1/packages/team.pkg/aliases/stable", json_body(json!({"version": "1.0.0"}))),
            forbidden,
        ),
    );
    cases.insert(
        "GET /api/v1/blobs/{digest}",
        (signed(o, &k, "GET", &format!("/api/v1/blobs/{secret_digest}"), vec![]), forbidden),
    );
    cases.insert(
        "GET /api/v1/digests/{digest}",
        (signed(o, &k, "GET", &format!("/api/v1/digests/{secret_digest}"), vec![]), public),
    );
    cases.insert(
        "GET /api/v1/packages/{name}/grants",
        (signed(o, &k, "GET", "/api/v1/packages/team.secret/grants", vec![]), forbidden),
    );
    cases.insert(
        "PUT /api/v1/packages/{name}/grants/{key}",
        (signed(o, &k, "PUT", &format!("/api/v1/packages/team.secret/grants/{}", o.public()), vec![]), forbidden),
    );
    cases.insert(
        "DELETE /api/v1/packages/{name}/grants/{key}",
        (
            signed(o, &k, "DELETE", &format!("/api/v1/packages/team.secret/grants/{}", reader.public()), vec![]),
            forbidden,
        ),
    );
    cases.insert(
        "GET /api/v1/accounts/{key}/usage",
        (signed(o, &k, "GET", &format!("/api/v1/accounts/{}/usage", owner.public()), vec![]), forbidden),
    );
    cases.insert(
        "POST /api/v1/models",
        (
            signed(o, &k, "POST", "/api/v1/models", json_body(json!({"name": "team.new", "version": "1.0.0"}))),
            forbidden,
        ),
    );
    cases.insert("GET /api/v1/models", (signed(o, &k, "GET", "/api/v1/models", vec![]), public));
    cases.insert(
        "POST /api/v1/models/{name}",
        (signed(o, &k, "POST", "/api/v1/models/team.weights", b"x".to_vec()), forbidden),
    );
    cases.insert(
        "PUT /api/v1/models/{name}/{version}",
        (signed(o, &k, "PUT", "/api/v1/models/team.weights/1.0.0", b"weights of the owner".to_vec()), forbidden),
    );
    cases.insert(
        "GET /api/v1/models/{name}/{version}",
        (signed(o, &k, "GET", "/api/v1/models/team.weights/1.0.0", vec![]), public),
    );
    cases.insert(
        "DELETE /api/v1/models/{name}/{version}",
        (signed(o, &k, "DELETE", "/api/v1/models/team.weights/1.0.0", vec![]), forbidden),
    );
    cases.insert(
        "GET /api/v1/models/{name}/{version}/meta",
        (signed(o, &k, "GET", "/api/v1/models/team.weights/1.0.0/meta", vec![]), public),
    );
    cases.insert(
        "PUT /api/v1/models/{name}/{version}/meta",
        (
            signed(o, &k, "PUT", "/api/v1/models/team.weights/1.0.0/meta", json_body(json!({"metadata": {"x": 1}}))),
            forbidden,
        ),
    );
    cases.insert(
        "GET /api/v1/namespaces/{namespace}",
        (signed(o, &k, "GET", "/api/v1/namespaces/team", vec![]), public),
    );
    cases.insert(
        "PUT /api/v1/namespaces/{namespace}/owners/{key}",
        (signed(o, &k, "PUT", &format!("/api/v1/namespaces/solo/owners/{}", o.public()), vec![]), forbidden),
    );
    cases.insert(
        "DELETE /api/v1/namespaces/{namespace}/owners/{key}",
        (signed(o, &k, "DELETE", &format!("/api/v1/namespaces/team/owners/{}", owner.public()), vec![]), forbidden),
    );
    let doc = |v: Value| json_body(v);
    cases.insert(
        "GET /api/v1/models/{name}/{version}/tensors",
        (signed(o, &k, "GET", "/api/v1/models/team.weights/1.0.0/tensors", vec![]), &[StatusCode::BAD_REQUEST][..]),
    );
    cases.insert(
        "GET /api/v1/models/{name}/{version}/card",
        (signed(o, &k, "GET", "/api/v1/models/team.weights/1.0.0/card", vec![]), &[StatusCode::NOT_FOUND][..]),
    );
    cases.insert(
        "GET /api/v1/models/{name}/{version}/lineage",
        (signed(o, &k, "GET", "/api/v1/models/team.weights/1.0.0/lineage", vec![]), public),
    );
    // A private package has no card the hub could read.
    cases.insert(
        "GET /api/v1/packages/{name}/{version}/card",
        (signed(o, &k, "GET", "/api/v1/packages/team.secret/1.0.0/card", vec![]), &[StatusCode::NOT_FOUND][..]),
    );
    // The owner's upload in progress: a stranger neither sees it nor adds to it.
    let owners_upload = {
        let body = doc(json!({"digest": Digest::of(b"the owner's upload").to_string(), "size": 18}));
        let (s, up) = h.json(signed(&owner, &k, "POST", "/api/v1/uploads", body)).await;
        assert_eq!(s, StatusCode::OK, "{up}");
        up["id"].as_str().unwrap().to_owned()
    };
    cases.insert(
        "POST /api/v1/uploads",
        (
            // Bytes the hub serves as a model: complete at once, nothing written.
            signed(
                o,
                &k,
                "POST",
                "/api/v1/uploads",
                doc(json!({"digest": Digest::of(b"weights of the owner").to_string(), "size": 20})),
            ),
            public,
        ),
    );
    cases.insert(
        "GET /api/v1/uploads/{id}",
        (signed(o, &k, "GET", &format!("/api/v1/uploads/{owners_upload}"), vec![]), &[StatusCode::NOT_FOUND][..]),
    );
    let mut piece = signed(o, &k, "PATCH", &format!("/api/v1/uploads/{owners_upload}"), b"a stranger's".to_vec());
    piece.headers.push(("upload-offset".into(), "0".into()));
    cases.insert("PATCH /api/v1/uploads/{id}", (piece, &[StatusCode::NOT_FOUND][..]));
    cases.insert(
        "DELETE /api/v1/uploads/{id}",
        (signed(o, &k, "DELETE", &format!("/api/v1/uploads/{owners_upload}"), vec![]), &[StatusCode::NOT_FOUND][..]),
    );
    cases.insert(
        "POST /{collection}",
        (signed(o, &k, "POST", "/service", doc(json!({"id": "team.mine", "description": "x"}))), forbidden),
    );
    cases.insert("GET /{collection}", (signed(o, &k, "GET", "/service", vec![]), public));
    cases.insert("GET /{collection}/meta", (signed(o, &k, "GET", "/service/meta?id=team.svc", vec![]), public));
    // Anyone may read an entry as a package; this one's object is none, which anyone is told.
    cases.insert(
        "GET /api/v1/components/{collection}/{id}/package",
        (signed(o, &k, "GET", "/api/v1/components/service/team.svc/package", vec![]), &[StatusCode::BAD_REQUEST][..]),
    );
    cases.insert(
        "PUT /{collection}/{id}",
        (signed(o, &k, "PUT", "/service/team.svc", b"a stranger's object".to_vec()), forbidden),
    );
    cases.insert("GET /{collection}/{id}", (signed(o, &k, "GET", "/service/team.svc", vec![]), public));
    cases.insert("DELETE /{collection}/{id}", (signed(o, &k, "DELETE", "/service/team.svc", vec![]), forbidden));
    cases.insert(
        "PUT /{collection}/meta/{id}",
        (signed(o, &k, "PUT", "/service/meta/team.svc", doc(json!({"description": "a stranger's"}))), forbidden),
    );
    cases.insert(
        "PUT /{collection}/{model_name}/{model_version}",
        (signed(o, &k, "PUT", "/model/team/v1", b"a stranger's object".to_vec()), forbidden),
    );
    cases.insert(
        "GET /{collection}/{model_name}/{model_version}",
        (signed(o, &k, "GET", "/model/team/v1", vec![]), public),
    );
    cases.insert(
        "DELETE /{collection}/{model_name}/{model_version}",
        (signed(o, &k, "DELETE", "/model/team/v1", vec![]), forbidden),
    );
    cases.insert(
        "PUT /{collection}/meta/{model_name}/{model_version}",
        (signed(o, &k, "PUT", "/model/meta/team/v1", doc(json!({"meta": {"x": "a stranger's"}}))), forbidden),
    );

    let served = routes(&h).await;
    let covered: BTreeSet<String> = cases.keys().map(|s| s.to_string()).collect();
    assert_eq!(served, covered, "every route the hub serves needs a case here (and every case a route)");

    for (route, (req, allowed)) in cases {
        let before = h.state(&owner).await;
        let (status, body) = h.send(req).await;
        let text = String::from_utf8_lossy(&body);
        assert!(allowed.contains(&status), "{route}: {status} {text}");
        assert!(!text.contains(SECRET), "{route} revealed a private manifest's config: {text}");
        assert!(!tessera_identity::seal::is_sealed(&body), "{route} served the private package's bytes");
        assert_eq!(h.state(&owner).await, before, "{route} changed the hub");
    }
    // The same stranger, unsigned, on every write: 401, nothing changed (the policy wants
    // signatures; checked from the headers).
    let before = h.state(&owner).await;
    for (method, path) in [
        ("DELETE", "/api/v1/packages/team.pkg/1.0.0"),
        ("PUT", "/api/v1/models/team.weights/1.0.0/meta"),
        ("PUT", "/api/v1/models/team.weights/9.0.0"),
        ("POST", "/api/v1/models/team.weights"),
        ("POST", "/service"),
        ("PUT", "/service/team.svc"),
        ("PUT", "/service/meta/team.svc"),
        ("DELETE", "/model/team/v1"),
    ] {
        let (s, _) = h.send(Req { method, path: path.into(), body: b"{}".to_vec(), headers: vec![] }).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    assert_eq!(h.state(&owner).await, before);
}

/// `other` deletes `owner`'s model and pushes its own bytes under the version; edits its
/// metadata; claims a namespace that holds only models.
#[tokio::test]
async fn models_claim_their_namespace_and_deleted_versions_stay_reserved() {
    let h = hub();
    let owner = KeyPair::generate(KeyType::Ed25519);
    let other = KeyPair::generate(KeyType::Ed25519);
    let k = h.key();
    let (s, rec) = h.json(signed(&owner, &k, "PUT", "/api/v1/models/team.weights/1.0.0", b"v1".to_vec())).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    assert_eq!(rec["signer"], owner.public().to_string(), "the record says who signed the binary");
    let (_, ns) = h.json(get("/api/v1/namespaces/team")).await;
    assert_eq!(ns["owners"], json!([owner.public().to_string()]), "pushing a model claims the namespace");

    let del = |key: &KeyPair| signed(key, &k, "DELETE", "/api/v1/models/team.weights/1.0.0", vec![]);
    assert_eq!(h.send(del(&other)).await.0, StatusCode::FORBIDDEN);
    let meta = serde_json::to_vec(&json!({"metadata": {"accuracy": 0.01}})).unwrap();
    let (s, _) = h.send(signed(&other, &k, "PUT", "/api/v1/models/team.weights/1.0.0/meta", meta)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) =
        h.send(signed(&other, &k, "PUT", &format!("/api/v1/namespaces/team/owners/{}", other.public()), vec![])).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // The owner deletes; the number stays reserved for the same bytes, even for the owner.
    assert_eq!(h.send(del(&owner)).await.0, StatusCode::OK);
    assert_eq!(h.send(get("/api/v1/models/team.weights/1.0.0")).await.0, StatusCode::NOT_FOUND);
    let (s, _) = h.send(signed(&other, &k, "PUT", "/api/v1/models/team.weights/1.0.0", b"evil".to_vec())).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, body) = h.json(signed(&owner, &k, "PUT", "/api/v1/models/team.weights/1.0.0", b"v1-other".to_vec())).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].as_str().unwrap().contains("never reused"), "{body}");
    let (s, _) = h.send(signed(&owner, &k, "PUT", "/api/v1/models/team.weights/1.0.0", b"v1".to_vec())).await;
    assert_eq!(s, StatusCode::CREATED, "the same bytes bring it back");
    let (s, bytes) = h.send(get("/api/v1/models/team.weights/1.0.0")).await;
    assert_eq!((s, bytes), (StatusCode::OK, b"v1".to_vec()));
}

/// A session publishing its model (what `swarm run` does) claims the model's namespace for
/// the coordinator's key, so the result is not open to any key.
#[tokio::test]
async fn publishing_a_new_model_version_claims_the_namespace() {
    let h = hub();
    let coordinator = KeyPair::generate(KeyType::Ed25519);
    let other = KeyPair::generate(KeyType::Ed25519);
    let k = h.key();
    let (s, rec) = h.json(signed(&coordinator, &k, "POST", "/api/v1/models/digits.softmax", b"model".to_vec())).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    assert_eq!(rec["version"], "0.1.0");
    let (_, ns) = h.json(get("/api/v1/namespaces/digits")).await;
    assert_eq!(ns["owners"], json!([coordinator.public().to_string()]));
    let (s, _) = h.send(signed(&other, &k, "POST", "/api/v1/models/digits.softmax", b"mine".to_vec())).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

/// An unsigned upload to a hub that wants signatures, and a stranger's upload of a model,
/// are refused from the headers, before the body is read.
#[tokio::test]
async fn uploads_are_refused_before_their_bytes_are_read() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let h = hub();
    let owner = KeyPair::generate(KeyType::Ed25519);
    let other = KeyPair::generate(KeyType::Ed25519);
    let k = h.key();
    assert_eq!(
        h.send(signed(&owner, &k, "PUT", "/api/v1/models/team.weights/1.0.0", b"v1".to_vec())).await.0,
        StatusCode::CREATED
    );
    // A body of "1 GiB" that counts what is read of it.
    let big = |read: Arc<AtomicU64>| {
        let chunks = (0..1024).map(move |_| {
            read.fetch_add(1 << 20, Ordering::Relaxed);
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![0u8; 1 << 20]))
        });
        Body::from_stream(futures::stream::iter(chunks))
    };
    let gib = (1u64 << 30).to_string();
    for (what, path, key) in [
        ("unsigned model", "/api/v1/models/team.big/1.0.0", None),
        ("unsigned package", "/api/v1/packages", None),
        ("stranger's model", "/api/v1/models/team.big/1.0.0", Some(&other)),
    ] {
        let read = Arc::new(AtomicU64::new(0));
        let mut req = Request::builder()
            .method(if path.ends_with("packages") { "POST" } else { "PUT" })
            .uri(path)
            .header("content-length", &gib);
        if let Some(key) = key {
            let env = Envelope::sign_digest(key, &k, "PUT", path, Digest::of(b"claimed"), now_ms());
            req = req.header(HEADER, env.to_header());
        }
        let resp = h.app.clone().oneshot(req.body(big(read.clone())).unwrap()).await.unwrap();
        let status = resp.status();
        assert!(status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN, "{what}: {status}");
        assert_eq!(read.load(Ordering::Relaxed), 0, "{what}: the body was read");
    }
    assert!(walk(&h.store.blobs().dir().to_path_buf()).iter().all(|f| !f.starts_with(".tmp")), "no temporary file");
}

/// One account may have a few uploads in flight; more are refused with 429 until one ends.
#[tokio::test]
async fn concurrent_uploads_per_account_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(tessera_hub::testing::open_store(dir.path().join("hub")));
    let policy = HubPolicy { max_uploads_per_account: 2, ..HubPolicy::signed() };
    let router = app(AppState::new(store.clone(), policy));
    let owner = KeyPair::generate(KeyType::Ed25519);
    let k = store.key().public().clone();
    let mut senders = Vec::new();
    let mut pending = Vec::new();
    for i in 0..2 {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(1);
        let path = format!("/api/v1/models/team.m{i}/1.0.0");
        let env = Envelope::sign(&owner, &k, "PUT", &path, b"abc", now_ms());
        let req = Request::builder()
            .method("PUT")
            .uri(&path)
            .header(HEADER, env.to_header())
            .body(Body::from_stream(tokio_stream_from(rx)))
            .unwrap();
        let r = router.clone();
        pending.push(tokio::spawn(async move { r.oneshot(req).await.unwrap().status() }));
        senders.push(tx);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let path = "/api/v1/models/team.m9/1.0.0";
    let env = Envelope::sign(&owner, &k, "PUT", path, b"abc", now_ms());
    let req =
        Request::builder().method("PUT").uri(path).header(HEADER, env.to_header()).body(Body::from("abc")).unwrap();
    assert_eq!(router.clone().oneshot(req).await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    for tx in senders {
        tx.send(Ok(bytes::Bytes::from_static(b"abc"))).await.unwrap();
    }
    for p in pending {
        assert_eq!(p.await.unwrap(), StatusCode::CREATED);
    }
    let env = Envelope::sign(&owner, &k, "PUT", path, b"abc", now_ms());
    let req =
        Request::builder().method("PUT").uri(path).header(HEADER, env.to_header()).body(Body::from("abc")).unwrap();
    assert_eq!(router.oneshot(req).await.unwrap().status(), StatusCode::CREATED, "room again");
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Numbers from outside never panic a handler: a timestamp at the end of time, a grant
/// expiring past the end of time, a huge content length.
#[tokio::test]
async fn extreme_numbers_are_refused_without_panicking() {
    let h = hub();
    let owner = KeyPair::generate(KeyType::Ed25519);
    let k = h.key();
    let path = "/api/v1/models/team.w/1.0.0/meta";
    let body = serde_json::to_vec(&json!({"metadata": {}})).unwrap();
    for ts in [u64::MAX, 0, u64::MAX / 2] {
        let env = Envelope::sign(&owner, &k, "PUT", path, &body, ts);
        let r = Req {
            method: "PUT",
            path: path.into(),
            body: body.clone(),
            headers: vec![(HEADER.into(), env.to_header())],
        };
        let (s, b) = h.json(r).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "ts={ts}: {b}");
    }
    let header = format!(
        "v1;key={};ts=18446744073709551615;nonce=abcdefghijklmnopqr;aud={k};body={};sig=AAAA",
        owner.public(),
        Digest::of(&body)
    );
    let r = Req { method: "PUT", path: path.into(), body: body.clone(), headers: vec![(HEADER.into(), header)] };
    assert_eq!(h.send(r).await.0, StatusCode::UNAUTHORIZED);
    let r = Req {
        method: "PUT",
        path: "/api/v1/models/team.w/1.0.0".into(),
        body: vec![],
        headers: vec![("content-length".into(), "0".into()), ("x-tessera-digest".into(), "b3:zz".into())],
    };
    assert_ne!(h.send(r).await.0, StatusCode::INTERNAL_SERVER_ERROR);
    // A grant until the year 9999 and one past what milliseconds can hold.
    for expires in ["9999-12-31T23:59:59Z", "99999-01-01T00:00:00Z"] {
        let body = serde_json::to_vec(&json!({"expires": expires})).unwrap();
        let p = format!("/api/v1/packages/team.x/grants/{}", owner.public());
        let (s, b) = h.json(signed(&owner, &k, "PUT", &p, body)).await;
        assert!(s.is_client_error(), "{expires}: {s} {b}");
    }
    // A panicking handler is answered 500 with a message, not a dropped connection.
    let resp = tessera_hub::answer_panic(Box::new("boom"));
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

/// Namespaces written unsigned on an open hub have no owner; when the hub starts requiring
/// signatures they go to the hub's key (nobody can claim them by writing first), and the
/// operator hands them on.
#[tokio::test]
async fn unowned_namespaces_go_to_the_hubs_key_and_the_operator_hands_them_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(tessera_hub::testing::open_store(dir.path().join("hub")));
    let work = tempfile::tempdir().unwrap();
    let m = work.path().join("m");
    write_module(&m, "legacy.tool", "1.0.0", "x");
    store.publish(&pack_dir(&m, &Limits::default()).unwrap().bytes, None, None).unwrap();
    store.put_model("oldmodels.w", "1.0.0", b"w", None).unwrap();
    // An entry written only through the Component Repository's routes.
    let doc = json!({"id": "zz.a"});
    store.create_component(tessera_hub::Collection::Transformation, "zz.a", doc.as_object().unwrap(), None).unwrap();
    assert_eq!(store.unowned_namespaces().unwrap(), ["legacy", "oldmodels", "zz"]);
    assert_eq!(store.adopt_unowned().unwrap(), ["legacy", "oldmodels", "zz"]);
    let hub_key = store.key().public().clone();
    assert_eq!(store.owners("legacy").unwrap(), Some(vec![hub_key.clone()]));
    assert_eq!(store.owners("zz").unwrap(), Some(vec![hub_key.clone()]));
    // Only bare namespaces name one: `zz.a` is not read as namespace `zz` (nor `a..b` as `a`).
    for not_bare in ["zz.a", "a..b", ""] {
        let e = store.owners(not_bare).unwrap_err();
        assert!(matches!(e, tessera_hub::HubError::BadRequest(_)), "{not_bare}: {e}");
        let e = store.add_owner(not_bare, &hub_key, &hub_key).unwrap_err();
        assert!(matches!(e, tessera_hub::HubError::BadRequest(_)), "{not_bare}: {e}");
    }
    assert_eq!(store.owners("a").unwrap(), None);
    // A stranger's first signed write no longer claims them.
    let stranger = KeyPair::generate(KeyType::Ed25519);
    let e = store.put_model("oldmodels.w", "2.0.0", b"mine", Some(stranger.public())).unwrap_err();
    assert!(matches!(e, tessera_hub::HubError::Forbidden(_)), "{e}");
    // The operator hands one on.
    let team = KeyPair::generate(KeyType::Ed25519);
    store.assign_owners("oldmodels", &[team.public().clone()]).unwrap();
    store.put_model("oldmodels.w", "2.0.0", b"ours", Some(team.public())).unwrap();
    assert!(store.adopt_unowned().unwrap().is_empty());
}

/// A package signature is public (it is on the record): on an open hub, sending it with an
/// unsigned request does not act as its signer.
#[tokio::test]
async fn a_copied_package_signature_does_not_act_as_its_signer() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(tessera_hub::testing::open_store(dir.path().join("hub")));
    let h = Hub {
        app: app(AppState::new(store.clone(), HubPolicy::open())),
        store,
        work: tempfile::tempdir().unwrap(),
        _dir: dir,
    };
    let owner = KeyPair::generate(KeyType::Ed25519);
    let bytes = h.package("acme.tool", "1.2.0", "withdrawn");
    assert_eq!(h.send(publish(&h, &owner, bytes.clone())).await.0, StatusCode::CREATED);
    assert_eq!(
        h.send(signed(&owner, &h.key(), "DELETE", "/api/v1/packages/acme.tool/1.2.0", vec![])).await.0,
        StatusCode::OK
    );
    // The replay: the owner's package signature, no request signature.
    let sig = PackageSignature::sign(&owner, &Digest::of(&bytes));
    let r = Req {
        method: "POST",
        path: "/api/v1/packages".into(),
        body: bytes,
        headers: vec![
            (PACKAGE_SIGNATURE_HEADER.into(), sig.to_header()),
            ("x-tessera-package".into(), "acme.tool@1.2.0".into()),
        ],
    };
    assert_eq!(h.send(r).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(h.send(get("/api/v1/packages/acme.tool/1.2.0")).await.0, StatusCode::NOT_FOUND, "still withdrawn");
}

/// A signed upload is judged by when it started: a body that takes longer than the window
/// to arrive is still accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_judged_by_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(tessera_hub::testing::open_store(dir.path().join("hub")));
    let policy = HubPolicy { window_ms: 500, ..HubPolicy::signed() };
    let router = app(AppState::new(store.clone(), policy));
    let owner = KeyPair::generate(KeyType::Ed25519);
    let path = "/api/v1/models/team.slow/1.0.0";
    let body = b"slowly arriving weights".to_vec();
    let env = Envelope::sign(&owner, store.key().public(), "PUT", path, &body, now_ms());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(1);
    let req = Request::builder()
        .method("PUT")
        .uri(path)
        .header(HEADER, env.to_header())
        .body(Body::from_stream(tokio_stream_from(rx)))
        .unwrap();
    let send = tokio::spawn(async move { router.oneshot(req).await.unwrap().status() });
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    tx.send(Ok(bytes::Bytes::from(body))).await.unwrap();
    drop(tx);
    assert_eq!(send.await.unwrap(), StatusCode::CREATED);
}

/// Publishing the same bytes again restores what was lost: a deleted private version comes
/// back, and a blob missing from disk is written again.
#[tokio::test]
async fn the_same_bytes_again_restore_what_was_lost() {
    let h = hub();
    let owner = KeyPair::generate(KeyType::Ed25519);
    let reader = KeyPair::generate(KeyType::Ed25519);
    let sealed =
        tessera_identity::seal::seal(&h.package("team.secret", "1.0.0", "s"), &[reader.public().clone()]).unwrap();
    let private = |h: &Hub| {
        let mut r = publish(h, &owner, sealed.clone());
        r.headers.push(("x-tessera-manifest".into(), private_manifest("team.secret")));
        r
    };
    assert_eq!(h.send(private(&h)).await.0, StatusCode::CREATED);
    let del = signed(&owner, &h.key(), "DELETE", "/api/v1/packages/team.secret/1.0.0", vec![]);
    assert_eq!(h.send(del).await.0, StatusCode::OK);
    let (s, rec) = h.json(private(&h)).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    assert_eq!(rec["signer"], owner.public().to_string());
    // A blob lost from disk comes back with the same bytes.
    let bytes = h.package("team.pkg", "1.0.0", "p");
    let (_, rec) = h.json(publish(&h, &owner, bytes.clone())).await;
    let digest: Digest = rec["digest"].as_str().unwrap().parse().unwrap();
    std::fs::remove_file(h.store.blobs().path_of(&digest)).unwrap();
    assert_eq!(h.send(publish(&h, &owner, bytes)).await.0, StatusCode::OK);
    assert!(h.store.blobs().path_of(&digest).exists());
}
