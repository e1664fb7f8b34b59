//! The registry stays consistent: every write route the router serves has a case here in
//! which its write is refused (to the namespace's own owner: a conflict, a bad body, a
//! missing thing), and the stored state (every table, every blob file) is the same after;
//! `latest` only names complete versions; build metadata does not make another version.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tessera_core::Digest;
use tessera_hub::{AppState, HubPolicy, HubStore, app};
use tessera_identity::envelope::HEADER;
use tessera_identity::{Envelope, KeyPair, KeyType, PACKAGE_SIGNATURE_HEADER, PackageSignature, PublicKey, now_ms};
use tessera_package::{Limits, pack_dir};
use tower::ServiceExt;

struct Hub {
    app: Router,
    store: Arc<HubStore>,
    dir: tempfile::TempDir,
    work: tempfile::TempDir,
}

fn hub() -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(tessera_hub::testing::open_store(dir.path().join("hub")));
    Hub { app: app(AppState::new(store.clone(), HubPolicy::signed())), store, dir, work: tempfile::tempdir().unwrap() }
}

struct Req {
    method: &'static str,
    path: String,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
}

impl Hub {
    fn key(&self) -> PublicKey {
        self.store.key().public().clone()
    }
    fn package(&self, name: &str, version: &str, note: &str) -> Vec<u8> {
        let m = self.work.path().join(format!("{name}-{version}-{}", Digest::of(note.as_bytes()).hex()));
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(
            m.join("module.yaml"),
            format!("name: {name}\nversion: {version}\nkind: task\nruntime: builtin\nentry: echo\n"),
        )
        .unwrap();
        std::fs::write(m.join("notes.txt"), note).unwrap();
        pack_dir(&m, &Limits::default()).unwrap().bytes
    }
    async fn send(&self, r: Req) -> (StatusCode, Value) {
        let mut req = Request::builder().method(r.method).uri(&r.path);
        for (k, v) in &r.headers {
            req = req.header(k, v);
        }
        let resp = self.app.clone().oneshot(req.body(Body::from(r.body)).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
    /// Everything stored: every row of every table but the usage meters (every signed
    /// request counts), and the blob files.
    fn dump(&self) -> Value {
        // The hub's own dump (every table of either database, rows in insertion order), but
        // the request meter, which counts refused requests with valid signatures too.
        let file = self.dir.path().join(format!("state-{}.dump", now_ms()));
        self.store.dump(&file).unwrap();
        let mut out = BTreeMap::new();
        let mut archive = tar::Archive::new(std::fs::File::open(&file).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let Some(table) = path.strip_prefix("tables/").and_then(|t| t.strip_suffix(".jsonl")) else { continue };
            if table == "usage" {
                continue;
            }
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
            let rows: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            out.insert(table.to_owned(), json!(rows));
        }
        std::fs::remove_file(&file).unwrap();
        assert!(out.len() >= 7, "{:?}", out.keys());
        let mut blobs: Vec<String> = Vec::new();
        let mut stack = vec![self.store.blobs().dir().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    blobs.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        blobs.sort();
        out.insert("blobs".into(), json!(blobs));
        json!(out)
    }
}

fn signed(h: &Hub, key: &KeyPair, method: &'static str, path: &str, body: Vec<u8>) -> Req {
    let env = Envelope::sign(key, &h.key(), method, path, &body, now_ms());
    Req { method, path: path.into(), body, headers: vec![(HEADER.into(), env.to_header())] }
}

fn publish(h: &Hub, key: &KeyPair, bytes: Vec<u8>) -> Req {
    let sig = PackageSignature::sign(key, &Digest::of(&bytes));
    let mut r = signed(h, key, "POST", "/api/v1/packages", bytes);
    r.headers.push((PACKAGE_SIGNATURE_HEADER.into(), sig.to_header()));
    r.headers.extend(declared(&r.body));
    r
}

/// The `x-tessera-package` declaration of a (plain) package's bytes; none for anything else.
fn declared(bytes: &[u8]) -> Option<(String, String)> {
    let m = tessera_package::inspect(bytes, &tessera_package::Limits::default()).ok()?.manifest;
    Some(("x-tessera-package".into(), format!("{}@{}", m.name, m.version)))
}

/// A multipart model upload: metadata, then the binary.
fn multipart(meta: Value, file: &[u8]) -> (Vec<u8>, String) {
    let b = "boundary-of-the-test";
    let mut body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"meta\"\r\nContent-Type: application/json\r\n\r\n{meta}\r\n--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m\"\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    (body, format!("multipart/form-data; boundary={b}"))
}

#[tokio::test]
async fn every_refused_write_leaves_no_trace() {
    let h = hub();
    let owner = KeyPair::generate(KeyType::Ed25519);
    let reader = KeyPair::generate(KeyType::Ed25519);
    let stranger = KeyPair::generate(KeyType::Ed25519);
    // What is there: a package, a private package, a model with metadata.
    assert_eq!(h.send(publish(&h, &owner, h.package("meta.pkg", "1.0.0", "a"))).await.0, StatusCode::CREATED);
    let sealed =
        tessera_identity::seal::seal(&h.package("meta.secret", "1.0.0", "s"), &[reader.public().clone()]).unwrap();
    let mut r = publish(&h, &owner, sealed);
    use base64::Engine;
    let declared =
        json!({"name": "meta.secret", "version": "1.0.0", "kind": "task", "runtime": "builtin", "entry": "echo"});
    r.headers.push((
        "x-tessera-manifest".into(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(declared.to_string()),
    ));
    assert_eq!(h.send(r).await.0, StatusCode::CREATED);
    let (body, ctype) = multipart(json!({"metadata": {"accuracy": 0.97}}), b"the first binary");
    let mut r = signed(&h, &owner, "PUT", "/api/v1/models/meta.demo/1.0.0", body);
    r.headers.push(("content-type".into(), ctype));
    assert_eq!(h.send(r).await.0, StatusCode::CREATED);
    // Component Repository entries with objects.
    for (collection, doc, object) in [
        ("service", json!({"id": "meta.svc", "description": "kept"}), "/service/meta.svc"),
        ("model", json!({"model_name": "meta.m", "model_version": "v1", "meta": {"k": "kept"}}), "/model/meta.m/v1"),
    ] {
        let body = serde_json::to_vec(&doc).unwrap();
        assert_eq!(h.send(signed(&h, &owner, "POST", &format!("/{collection}"), body)).await.0, StatusCode::CREATED);
        assert_eq!(h.send(signed(&h, &owner, "PUT", object, b"kept object".to_vec())).await.0, StatusCode::NO_CONTENT);
    }

    let o = &owner;
    let json_body = |v: Value| serde_json::to_vec(&v).unwrap();
    let mut cases: BTreeMap<&str, (Req, StatusCode)> = BTreeMap::new();
    cases.insert(
        "POST /api/v1/packages",
        (publish(&h, o, h.package("meta.pkg", "1.0.0", "other")), StatusCode::CONFLICT),
    );
    cases.insert(
        "DELETE /api/v1/packages/{name}/{version}",
        (signed(&h, o, "DELETE", "/api/v1/packages/meta.pkg/9.9.9", vec![]), StatusCode::NOT_FOUND),
    );
    cases.insert(
        "PUT /api/v1/packages/{name}/aliases/{alias}",
        (
            signed(&h, o, "PUT", "/api/v1/packages/meta.pkg/aliases/stable", json_body(json!({"version": "9.0.0"}))),
            StatusCode::NOT_FOUND,
        ),
    );
    cases.insert(
        "PUT /api/v1/packages/{name}/grants/{key}",
        (
            signed(&h, o, "PUT", &format!("/api/v1/packages/meta.secret/grants/{}", stranger.public()), vec![]),
            StatusCode::BAD_REQUEST,
        ),
    );
    cases.insert(
        "DELETE /api/v1/packages/{name}/grants/{key}",
        (
            signed(&h, o, "DELETE", &format!("/api/v1/packages/meta.secret/grants/{}", stranger.public()), vec![]),
            StatusCode::NOT_FOUND,
        ),
    );
    cases.insert(
        "POST /api/v1/models",
        (
            signed(&h, o, "POST", "/api/v1/models", json_body(json!({"name": "meta.demo", "version": "1.0.0"}))),
            StatusCode::CONFLICT,
        ),
    );
    let (body, ctype) = multipart(json!({"metadata": "not an object"}), b"bytes");
    let mut next = signed(&h, o, "POST", "/api/v1/models/meta.demo", body);
    next.headers.push(("content-type".into(), ctype));
    cases.insert("POST /api/v1/models/{name}", (next, StatusCode::BAD_REQUEST));
    // The case from a user's report: other bytes with new metadata, refused with 409, and
    // the metadata must not change either.
    let (body, ctype) = multipart(json!({"metadata": {"accuracy": 0.12}}), b"other bytes");
    let mut push = signed(&h, o, "PUT", "/api/v1/models/meta.demo/1.0.0", body);
    push.headers.push(("content-type".into(), ctype));
    cases.insert("PUT /api/v1/models/{name}/{version}", (push, StatusCode::CONFLICT));
    cases.insert(
        "DELETE /api/v1/models/{name}/{version}",
        (signed(&h, o, "DELETE", "/api/v1/models/meta.demo/2.0.0", vec![]), StatusCode::NOT_FOUND),
    );
    cases.insert(
        "PUT /api/v1/models/{name}/{version}/meta",
        (
            signed(&h, o, "PUT", "/api/v1/models/meta.demo/1.0.0/meta", json_body(json!({"metadata": [1, 2]}))),
            StatusCode::BAD_REQUEST,
        ),
    );
    cases.insert(
        "PUT /api/v1/namespaces/{namespace}/owners/{key}",
        (signed(&h, o, "PUT", "/api/v1/namespaces/meta/owners/ed25519:AAAA", vec![]), StatusCode::BAD_REQUEST),
    );
    cases.insert(
        "DELETE /api/v1/namespaces/{namespace}/owners/{key}",
        (
            signed(&h, o, "DELETE", &format!("/api/v1/namespaces/meta/owners/{}", o.public()), vec![]),
            StatusCode::BAD_REQUEST,
        ),
    );
    cases.insert(
        "POST /{collection}",
        (signed(&h, o, "POST", "/service", json_body(json!({"id": "meta.svc"}))), StatusCode::CONFLICT),
    );
    cases.insert(
        "POST /api/v1/uploads",
        (
            signed(&h, o, "POST", "/api/v1/uploads", json_body(json!({"digest": "b3:00", "size": 10}))),
            StatusCode::BAD_REQUEST,
        ),
    );
    let mut piece = signed(&h, o, "PATCH", "/api/v1/uploads/0123456789abcdef0123456789abcdef", b"piece".to_vec());
    piece.headers.push(("upload-offset".into(), "0".into()));
    cases.insert("PATCH /api/v1/uploads/{id}", (piece, StatusCode::NOT_FOUND));
    cases.insert(
        "DELETE /api/v1/uploads/{id}",
        (signed(&h, o, "DELETE", "/api/v1/uploads/0123456789abcdef0123456789abcdef", vec![]), StatusCode::NOT_FOUND),
    );
    cases.insert(
        "PUT /{collection}/{id}",
        (signed(&h, o, "PUT", "/service/meta.none", b"other object".to_vec()), StatusCode::NOT_FOUND),
    );
    cases.insert(
        "DELETE /{collection}/{id}",
        (signed(&h, o, "DELETE", "/service/meta.none", vec![]), StatusCode::NOT_FOUND),
    );
    cases.insert(
        "PUT /{collection}/meta/{id}",
        (
            signed(&h, o, "PUT", "/service/meta/meta.svc", json_body(json!({"needs": {"RAM": "lots"}}))),
            StatusCode::BAD_REQUEST,
        ),
    );
    let (body, ctype) = multipart(json!({"metadata": {}}), b"other object");
    let mut with_meta = signed(&h, o, "PUT", "/model/meta.m/v1", body);
    with_meta.headers.push(("content-type".into(), ctype));
    cases.insert("PUT /{collection}/{model_name}/{model_version}", (with_meta, StatusCode::BAD_REQUEST));
    cases.insert(
        "DELETE /{collection}/{model_name}/{model_version}",
        (signed(&h, o, "DELETE", "/model/meta.m/v2", vec![]), StatusCode::NOT_FOUND),
    );
    cases.insert(
        "PUT /{collection}/meta/{model_name}/{model_version}",
        (
            signed(&h, o, "PUT", "/model/meta/meta.m/v1", json_body(json!({"model_version": "v2"}))),
            StatusCode::BAD_REQUEST,
        ),
    );

    let doc = tessera_hub::openapi();
    let writes: BTreeSet<String> = doc
        .paths
        .paths
        .iter()
        .flat_map(|(p, item)| {
            [("POST", &item.post), ("PUT", &item.put), ("PATCH", &item.patch), ("DELETE", &item.delete)]
                .into_iter()
                .filter(|(_, op)| op.is_some())
                .map(move |(m, _)| format!("{m} {p}"))
                .collect::<Vec<_>>()
        })
        .collect();
    let covered: BTreeSet<String> = cases.keys().map(|s| s.to_string()).collect();
    assert_eq!(writes, covered, "every write route needs a refused case here");

    for (route, (req, expected)) in cases {
        let before = h.dump();
        let (s, body) = h.send(req).await;
        assert_eq!(s, expected, "{route}: {body}");
        assert_eq!(h.dump(), before, "{route} left a trace");
    }
    let m = h.store.model("meta.demo", "1.0.0").unwrap();
    assert_eq!(m.metadata["accuracy"], 0.97, "the refused push's metadata is not the record's");
}

/// `latest` names the highest version that has its bytes: a record created before its
/// upload (what a push with metadata used to do) is not `latest` until the upload lands.
#[tokio::test]
async fn latest_only_names_complete_versions() {
    let h = hub();
    let o = KeyPair::generate(KeyType::Ed25519);
    assert_eq!(
        h.send(signed(&h, &o, "PUT", "/api/v1/models/ops.model/1.0.0", b"one".to_vec())).await.0,
        StatusCode::CREATED
    );
    let create = serde_json::to_vec(&json!({"name": "ops.model", "version": "2.0.0"})).unwrap();
    assert_eq!(h.send(signed(&h, &o, "POST", "/api/v1/models", create)).await.0, StatusCode::CREATED);
    let (s, latest) = h
        .send(Req { method: "GET", path: "/api/v1/models/ops.model/latest/meta".into(), body: vec![], headers: vec![] })
        .await;
    assert_eq!((s, latest["version"].as_str()), (StatusCode::OK, Some("1.0.0")));
    assert_eq!(
        h.send(signed(&h, &o, "PUT", "/api/v1/models/ops.model/2.0.0", b"two".to_vec())).await.0,
        StatusCode::CREATED
    );
    let (_, latest) = h
        .send(Req { method: "GET", path: "/api/v1/models/ops.model/latest/meta".into(), body: vec![], headers: vec![] })
        .await;
    assert_eq!(latest["version"], "2.0.0");
}

/// Versions that differ only in build metadata are one version (semver §10), for packages
/// and models: other bytes under `1.0.0+hotfix` are a conflict and never become `latest`.
#[tokio::test]
async fn build_metadata_does_not_make_another_version() {
    let h = hub();
    let o = KeyPair::generate(KeyType::Ed25519);
    assert_eq!(h.send(publish(&h, &o, h.package("bm.pkg", "1.0.0", "a"))).await.0, StatusCode::CREATED);
    let (s, body) = h.send(publish(&h, &o, h.package("bm.pkg", "1.0.0+hotfix", "b"))).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].as_str().unwrap().contains("build metadata"), "{body}");
    let latest = h.store.resolve_str("bm.pkg", "latest").unwrap();
    assert_eq!(latest.version, "1.0.0");
    // Asked as 1.0.0+anything, it is 1.0.0.
    assert_eq!(h.store.resolve_str("bm.pkg", "1.0.0+other").unwrap().digest, latest.digest);

    assert_eq!(
        h.send(signed(&h, &o, "PUT", "/api/v1/models/bm.model/1.0.0", b"a".to_vec())).await.0,
        StatusCode::CREATED
    );
    let (s, _) = h.send(signed(&h, &o, "PUT", "/api/v1/models/bm.model/1.0.0+hotfix", b"b".to_vec())).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = h.send(signed(&h, &o, "PUT", "/api/v1/models/bm.model/1.0.0+hotfix", b"a".to_vec())).await;
    assert_eq!(s, StatusCode::OK, "the same bytes are the same version");
    assert_eq!(h.store.models(Some("bm")).unwrap().len(), 1);
}

/// Text the database cannot store (U+0000: PostgreSQL refuses it) is refused as bad input on
/// every backend, and nothing is written.
#[tokio::test]
async fn a_nul_character_is_refused_as_bad_input() {
    let h = hub();
    let o = KeyPair::generate(KeyType::Ed25519);
    let dir = h.dir.path().join("nul");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("module.yaml"),
        "name: nul.echo\nversion: 0.1.0\nkind: task\nruntime: builtin\nentry: echo\ndescription: \"a\\0b\"\n",
    )
    .unwrap();
    let bytes = pack_dir(&dir, &Limits::default()).unwrap().bytes;
    let before = h.dump();
    let (s, body) = h.send(publish(&h, &o, bytes)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().unwrap().contains("NUL"), "{body}");
    assert_eq!(h.dump(), before, "the refused publish left a trace");
}
