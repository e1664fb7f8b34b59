//! A hub that requires signatures: every refusal, each leaving the hub unchanged.

use std::path::Path;
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
    work: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

fn hub(policy: HubPolicy) -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HubStore::open(dir.path().join("hub")).unwrap());
    Hub { app: app(AppState::new(store.clone(), policy)), store, work: tempfile::tempdir().unwrap(), _dir: dir }
}

struct Req<'a> {
    method: &'a str,
    path: &'a str,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
}

impl Hub {
    fn key(&self) -> PublicKey {
        self.store.key().public().clone()
    }
    async fn send(&self, r: Req<'_>) -> (StatusCode, Value) {
        let mut req = Request::builder().method(r.method).uri(r.path);
        for (k, v) in &r.headers {
            req = req.header(k, v);
        }
        let resp = self.app.clone().oneshot(req.body(Body::from(r.body)).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
    fn package(&self, name: &str, version: &str, text: &str) -> Vec<u8> {
        let dir = self.work.path().join(format!("{name}-{version}-{}", Digest::of(text.as_bytes()).hex()));
        write_module(&dir, name, version, text);
        pack_dir(&dir, &Limits::default()).unwrap().bytes
    }
    /// The hub's visible state: every package and model record, and the namespace table.
    async fn state(&self) -> Value {
        let (_, p) = self.send(get("/api/v1/packages?all=true")).await;
        let (_, m) = self.send(get("/api/v1/models")).await;
        let (_, n) = self.send(get("/api/v1/namespaces/fl")).await;
        json!([p, m, n])
    }
}

fn write_module(dir: &Path, name: &str, version: &str, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("module.yaml"),
        format!("name: {name}\nversion: {version}\nkind: task\nruntime: builtin\nentry: echo\n"),
    )
    .unwrap();
    std::fs::write(dir.join("notes.txt"), text).unwrap();
}

fn get(path: &str) -> Req<'_> {
    Req { method: "GET", path, body: Vec::new(), headers: Vec::new() }
}

/// A request signed by `key` for `audience` at `ts`.
fn signed<'a>(key: &KeyPair, audience: &PublicKey, method: &'a str, path: &'a str, body: Vec<u8>, ts: u64) -> Req<'a> {
    let env = Envelope::sign(key, audience, method, path, &body, ts);
    Req { method, path, body, headers: vec![(HEADER.into(), env.to_header())] }
}

/// A signed publish with the package signed by `publisher`.
fn publish<'a>(hub: &Hub, key: &KeyPair, publisher: &KeyPair, bytes: Vec<u8>) -> Req<'a> {
    let sig = PackageSignature::sign(publisher, &Digest::of(&bytes));
    let mut r = signed(key, &hub.key(), "POST", "/api/v1/packages", bytes, now_ms());
    r.headers.push((PACKAGE_SIGNATURE_HEADER.into(), sig.to_header()));
    r
}

fn error(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn signed_publishing_claims_the_namespace_and_records_the_signer() {
    let h = hub(HubPolicy::signed());
    let alice = KeyPair::generate(KeyType::Ed25519);
    let (s, rec) = h.send(publish(&h, &alice, &alice, h.package("fl.worker", "0.1.0", "a"))).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    assert_eq!(rec["signer"], alice.public().to_string());
    let sig = tessera_identity::Signature::from_text(rec["signature"].as_str().unwrap()).unwrap();
    let digest: Digest = rec["digest"].as_str().unwrap().parse().unwrap();
    PackageSignature { key: alice.public().clone(), sig }.verify(&digest).unwrap();
    let (_, ns) = h.send(get("/api/v1/namespaces/fl")).await;
    assert_eq!(ns["owners"], json!([alice.public().to_string()]));
    // secp256k1 keys sign too.
    let eve = KeyPair::generate(KeyType::Secp256k1);
    let (s, rec) = h.send(publish(&h, &eve, &eve, h.package("eve.worker", "0.1.0", "e"))).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    // Health tells clients the audience.
    let (_, health) = h.send(get("/api/v1/health")).await;
    assert_eq!(health["key"], h.key().to_string());
    assert_eq!(health["signatures_required"], true);
}

#[tokio::test]
async fn every_refusal_changes_nothing() {
    let h = hub(HubPolicy::signed());
    let alice = KeyPair::generate(KeyType::Ed25519);
    let bob = KeyPair::generate(KeyType::Ed25519);
    assert_eq!(h.send(publish(&h, &alice, &alice, h.package("fl.worker", "0.1.0", "a"))).await.0, StatusCode::CREATED);
    let before = h.state().await;
    let bytes = h.package("fl.worker", "0.2.0", "b");
    let now = now_ms();
    let hub_key = h.key();

    let cases: Vec<(&str, Req<'_>, StatusCode, &str)> = vec![
        (
            "unsigned",
            Req { method: "POST", path: "/api/v1/packages", body: bytes.clone(), headers: vec![] },
            StatusCode::UNAUTHORIZED,
            "must be signed",
        ),
        (
            "stale",
            signed(&alice, &hub_key, "POST", "/api/v1/packages", bytes.clone(), now - 120_000),
            StatusCode::UNAUTHORIZED,
            "ago",
        ),
        (
            "future",
            signed(&alice, &hub_key, "POST", "/api/v1/packages", bytes.clone(), now + 120_000),
            StatusCode::UNAUTHORIZED,
            "future",
        ),
        (
            "wrong audience",
            signed(&alice, bob.public(), "POST", "/api/v1/packages", bytes.clone(), now),
            StatusCode::UNAUTHORIZED,
            "addressed to",
        ),
        ("non-owner", publish(&h, &bob, &bob, bytes.clone()), StatusCode::FORBIDDEN, "belongs to"),
        (
            "package signed by someone else",
            publish(&h, &alice, &bob, bytes.clone()),
            StatusCode::FORBIDDEN,
            "signed by the key",
        ),
        (
            "unknown signer of a non-owner key",
            publish(&h, &bob, &bob, h.package("fl.other", "0.1.0", "x")),
            StatusCode::FORBIDDEN,
            "belongs to",
        ),
    ];
    for (what, req, status, word) in cases {
        let (s, body) = h.send(req).await;
        assert_eq!(s, status, "{what}: {body}");
        assert!(error(&body).contains(word), "{what}: {body}");
        assert_eq!(h.state().await, before, "{what} changed the hub");
    }

    // Body altered after signing.
    let mut r = publish(&h, &alice, &alice, bytes.clone());
    r.body = h.package("fl.worker", "0.2.0", "altered");
    let (s, body) = h.send(r).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(error(&body).contains("body"), "{body}");

    // A tampered package: the package signature covers other bytes.
    let mut r = signed(&alice, &hub_key, "POST", "/api/v1/packages", bytes.clone(), now_ms());
    let other = PackageSignature::sign(&alice, &Digest::of(b"other bytes"));
    r.headers.push((PACKAGE_SIGNATURE_HEADER.into(), other.to_header()));
    let (s, body) = h.send(r).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(error(&body).contains("does not verify"), "{body}");

    // A key whose bytes are claimed under the wrong type.
    let env = Envelope::sign(&alice, &hub_key, "POST", "/api/v1/packages", &bytes, now_ms()).to_header();
    let wrong_type = env.replacen("key=ed25519:", "key=secp256k1:", 1);
    let r = Req {
        method: "POST",
        path: "/api/v1/packages",
        body: bytes.clone(),
        headers: vec![(HEADER.into(), wrong_type)],
    };
    let (s, body) = h.send(r).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(error(&body).contains("secp256k1"), "{body}");

    // Replay: the same signed request twice.
    let r1 = publish(&h, &alice, &alice, bytes.clone());
    let r2 = Req { method: r1.method, path: r1.path, body: r1.body.clone(), headers: r1.headers.clone() };
    assert_eq!(h.send(r1).await.0, StatusCode::CREATED);
    let after_first = h.state().await;
    let (s, body) = h.send(r2).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(error(&body).contains("replayed"), "{body}");
    assert_eq!(h.state().await, after_first);
    assert_eq!(
        h.store
            .blobs()
            .dir()
            .read_dir()
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp"))
            .count(),
        0,
        "no upload left behind"
    );
}

#[tokio::test]
async fn owners_decide_who_else_publishes_and_changes_things() {
    let h = hub(HubPolicy::signed());
    let alice = KeyPair::generate(KeyType::Ed25519);
    let bob = KeyPair::generate(KeyType::Ed25519);
    h.send(publish(&h, &alice, &alice, h.package("fl.worker", "0.1.0", "a"))).await;
    let hub_key = h.key();
    // Bob may not delete, alias or add himself.
    let (s, _) = h.send(signed(&bob, &hub_key, "DELETE", "/api/v1/packages/fl.worker/0.1.0", vec![], now_ms())).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let alias = serde_json::to_vec(&json!({"version": "0.1.0"})).unwrap();
    let (s, _) = h
        .send(signed(&bob, &hub_key, "PUT", "/api/v1/packages/fl.worker/aliases/stable", alias.clone(), now_ms()))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let add_bob = format!("/api/v1/namespaces/fl/owners/{}", bob.public());
    let (s, _) = h.send(signed(&bob, &hub_key, "PUT", &add_bob, vec![], now_ms())).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let model = serde_json::to_vec(&json!({"name": "fl.model", "version": "1.0.0"})).unwrap();
    let (s, _) = h.send(signed(&bob, &hub_key, "POST", "/api/v1/models", model.clone(), now_ms())).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Alice adds Bob; now he can.
    let (s, ns) = h.send(signed(&alice, &hub_key, "PUT", &add_bob, vec![], now_ms())).await;
    assert_eq!(s, StatusCode::OK, "{ns}");
    assert_eq!(ns["owners"].as_array().unwrap().len(), 2);
    assert_eq!(h.send(publish(&h, &bob, &bob, h.package("fl.worker", "0.2.0", "b"))).await.0, StatusCode::CREATED);
    assert_eq!(h.send(signed(&bob, &hub_key, "POST", "/api/v1/models", model, now_ms())).await.0, StatusCode::CREATED);
    assert_eq!(
        h.send(signed(&bob, &hub_key, "PUT", "/api/v1/packages/fl.worker/aliases/stable", alias, now_ms())).await.0,
        StatusCode::OK
    );
    // The last owner cannot be removed; others can.
    let rm_bob = format!("/api/v1/namespaces/fl/owners/{}", bob.public());
    assert_eq!(h.send(signed(&alice, &hub_key, "DELETE", &rm_bob, vec![], now_ms())).await.0, StatusCode::OK);
    let rm_alice = format!("/api/v1/namespaces/fl/owners/{}", alice.public());
    assert_eq!(
        h.send(signed(&alice, &hub_key, "DELETE", &rm_alice, vec![], now_ms())).await.0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn an_open_hub_still_protects_owned_namespaces() {
    let h = hub(HubPolicy::open());
    let alice = KeyPair::generate(KeyType::Ed25519);
    // Unsigned publishing works in an unclaimed namespace...
    let unsigned = |bytes: Vec<u8>| Req { method: "POST", path: "/api/v1/packages", body: bytes, headers: vec![] };
    assert_eq!(h.send(unsigned(h.package("free.worker", "0.1.0", "a"))).await.0, StatusCode::CREATED);
    // ...not in one a key has claimed.
    assert_eq!(h.send(publish(&h, &alice, &alice, h.package("fl.worker", "0.1.0", "a"))).await.0, StatusCode::CREATED);
    let (s, body) = h.send(unsigned(h.package("fl.worker", "0.2.0", "b"))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let (s, _) =
        h.send(Req { method: "DELETE", path: "/api/v1/packages/fl.worker/0.1.0", body: vec![], headers: vec![] }).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A bad signature is refused even on an open hub.
    let mut r = publish(&h, &alice, &alice, h.package("free.worker", "0.2.0", "b"));
    r.body.push(0);
    assert_eq!(h.send(r).await.0, StatusCode::UNAUTHORIZED);
    // The hub's data on disk keeps its key private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = h._dir.path().join("hub/identity/hub.json");
        assert_eq!(std::fs::metadata(key).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
