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
    let store = Arc::new(tessera_hub::testing::open_store(dir.path().join("hub")));
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
    r.headers.extend(declared(&r.body));
    r
}

/// The `x-tessera-package` declaration of a (plain) package's bytes; none for anything else.
fn declared(bytes: &[u8]) -> Option<(String, String)> {
    let m = tessera_package::inspect(bytes, &tessera_package::Limits::default()).ok()?.manifest;
    Some(("x-tessera-package".into(), format!("{}@{}", m.name, m.version)))
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
    r.headers.extend(declared(&bytes));
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
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
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

fn manifest_header(name: &str) -> String {
    use base64::Engine;
    let m = json!({"name": name, "version": "0.1.0", "kind": "task", "runtime": "builtin", "entry": "echo"});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(m.to_string())
}

#[tokio::test]
async fn private_packages_are_read_only_by_their_grantees() {
    let h = hub(HubPolicy::signed());
    let alice = KeyPair::generate(KeyType::Ed25519);
    let node = KeyPair::generate(KeyType::Ed25519);
    let stranger = KeyPair::generate(KeyType::Ed25519);
    let plain = h.package("acme.secret", "0.1.0", "the secret sauce");
    // Sealed for the node and for its publisher (as the CLI seals).
    let sealed = tessera_identity::seal::seal(&plain, &[node.public().clone(), alice.public().clone()]).unwrap();
    let hub_key = h.key();

    // Without a declared manifest, or with a bad one: refused.
    let (s, body) = h.send(publish(&h, &alice, &alice, sealed.clone())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(error(&body).contains("x-tessera-manifest"));
    for bad in ["!!!".to_string(), manifest_header("Bad Name"), "e30".into(), "A".repeat(600_000)] {
        let mut r = publish(&h, &alice, &alice, sealed.clone());
        r.headers.push(("x-tessera-manifest".into(), bad));
        assert_eq!(h.send(r).await.0, StatusCode::BAD_REQUEST);
    }
    // A sealed body that is not a sealed package at all.
    let mut junk = b"TSEAL1\n\xff\xff".to_vec();
    junk.extend_from_slice(&[0u8; 64]);
    let mut r = publish(&h, &alice, &alice, junk);
    r.headers.push(("x-tessera-manifest".into(), manifest_header("acme.secret")));
    assert_eq!(h.send(r).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(h.send(get("/api/v1/packages?all=true")).await.1, json!([]), "nothing stored");
    let mut r = publish(&h, &alice, &alice, sealed.clone());
    r.headers.push(("x-tessera-manifest".into(), manifest_header("acme.secret")));
    let (s, rec) = h.send(r).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    assert_eq!(rec["private"], true);
    let digest = rec["digest"].as_str().unwrap().to_owned();
    // The hub holds only ciphertext.
    let stored = std::fs::read(h.store.blobs().path_of(&digest.parse().unwrap())).unwrap();
    assert!(!stored.windows(16).any(|w| w == b"the secret sauce"));

    let blob = format!("/api/v1/blobs/{digest}");
    let download = "/api/v1/packages/acme.secret/0.1.0/download";
    // Unsigned readers and strangers cannot even read it.
    for path in [&blob[..], download] {
        assert_eq!(h.send(get(path)).await.0, StatusCode::UNAUTHORIZED, "{path}");
        let (s, body) = h.send(signed(&stranger, &hub_key, "GET", path, vec![], now_ms())).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}");
        assert!(error(&body).contains("no grant"), "{body}");
    }
    // The recipient (granted at publish) and the owner can.
    let req = |k: &KeyPair| signed(k, &hub_key, "GET", &blob, vec![], now_ms());
    assert_eq!(h.send(req(&node)).await.0, StatusCode::OK);
    assert_eq!(h.send(req(&alice)).await.0, StatusCode::OK);

    // Grants: listed to owners only; expired and revoked grants refuse.
    let grants = "/api/v1/packages/acme.secret/grants";
    assert_eq!(h.send(signed(&stranger, &hub_key, "GET", grants, vec![], now_ms())).await.0, StatusCode::FORBIDDEN);
    let (s, list) = h.send(signed(&alice, &hub_key, "GET", grants, vec![], now_ms())).await;
    assert_eq!(s, StatusCode::OK);
    // The publisher reads as an owner: it has no grant of its own, which would outlive its
    // ownership.
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["grantee"], node.public().to_string());
    let grant_path = format!("/api/v1/packages/acme.secret/grants/{}", node.public());
    let expired = serde_json::to_vec(&json!({"expires": "2020-01-01T00:00:00Z"})).unwrap();
    assert_eq!(
        h.send(signed(&stranger, &hub_key, "PUT", &grant_path, expired.clone(), now_ms())).await.0,
        StatusCode::FORBIDDEN
    );
    // A grant that ends in the past is refused (and changes nothing).
    let (s, body) = h.send(signed(&alice, &hub_key, "PUT", &grant_path, expired, now_ms())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(error(&body).contains("not in the future"), "{body}");
    assert_eq!(h.send(req(&node)).await.0, StatusCode::OK, "the grant is untouched");
    // A grant for an hour: readable now, refused once that hour is over.
    let hour = tessera_core::time::format_rfc3339(now_ms() / 1000 + 3600);
    let body = serde_json::to_vec(&json!({"expires": hour})).unwrap();
    assert_eq!(h.send(signed(&alice, &hub_key, "PUT", &grant_path, body, now_ms())).await.0, StatusCode::OK);
    assert_eq!(h.send(req(&node)).await.0, StatusCode::OK);
    let record = h.store.resolve_str("acme.secret", "latest").unwrap();
    let later = now_ms() + 3_601_000;
    let e = h.store.check_read(&record, Some(node.public()), later).unwrap_err().to_string();
    assert!(e.contains("expired"), "{e}");
    assert_eq!(h.send(signed(&alice, &hub_key, "PUT", &grant_path, vec![], now_ms())).await.0, StatusCode::OK);
    assert_eq!(h.send(req(&node)).await.0, StatusCode::OK, "renewed");
    let stranger_grant = format!("/api/v1/packages/acme.secret/grants/{}", stranger.public());
    let (s, body) = h.send(signed(&alice, &hub_key, "PUT", &stranger_grant, vec![], now_ms())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a key the package was not sealed for: {body}");
    assert!(error(&body).contains("sealed for"), "{body}");
    assert_eq!(h.send(signed(&alice, &hub_key, "DELETE", &grant_path, vec![], now_ms())).await.0, StatusCode::OK);
    let (s, body) = h.send(req(&node)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(error(&body).contains("revoked"), "{body}");

    // A private package in someone else's namespace is refused.
    let mut r =
        publish(&h, &stranger, &stranger, tessera_identity::seal::seal(&plain, &[node.public().clone()]).unwrap());
    r.headers.push(("x-tessera-manifest".into(), manifest_header("acme.other")));
    assert_eq!(h.send(r).await.0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn usage_is_metered_and_quotas_refuse_uploads() {
    let mut policy = HubPolicy::signed();
    policy.upload_quota_bytes = Some(4096);
    let h = hub(policy);
    let alice = KeyPair::generate(KeyType::Ed25519);
    let first = h.package("fl.worker", "0.1.0", "a");
    let size = first.len() as u64;
    assert_eq!(h.send(publish(&h, &alice, &alice, first)).await.0, StatusCode::CREATED);
    let usage = format!("/api/v1/accounts/{}/usage", alice.public());
    let (s, u) = h.send(signed(&alice, &h.key(), "GET", &usage, vec![], now_ms())).await;
    assert_eq!(s, StatusCode::OK, "{u}");
    assert_eq!(u["bytes_in"], size);
    assert_eq!(u["requests"], 2);
    let bob = KeyPair::generate(KeyType::Ed25519);
    assert_eq!(h.send(signed(&bob, &h.key(), "GET", &usage, vec![], now_ms())).await.0, StatusCode::FORBIDDEN);
    // Uploads past the quota are refused and store nothing.
    let before = h.state().await;
    let big = {
        let dir = h.work.path().join("big");
        write_module(&dir, "fl.worker", "0.2.0", &"z".repeat(8192));
        let noise: Vec<u8> = (0..1000u32).flat_map(|i| *Digest::of(&i.to_le_bytes()).as_bytes()).collect();
        std::fs::write(dir.join("noise.bin"), noise).unwrap();
        pack_dir(&dir, &Limits::default()).unwrap().bytes
    };
    let (s, body) = h.send(publish(&h, &alice, &alice, big)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(error(&body).contains("quota"), "{body}");
    assert_eq!(h.state().await, before);
}
