//! Cards, search with filters and pages, lineage both ways, downloads per version.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tessera_core::Digest;
use tessera_hub::{AppState, HubPolicy, HubStore, app};
use tessera_identity::envelope::HEADER;
use tessera_identity::{Envelope, KeyPair, KeyType, PACKAGE_SIGNATURE_HEADER, PackageSignature, now_ms};
use tessera_package::{Limits, pack_dir};
use tower::ServiceExt;

struct Hub {
    app: Router,
    dir: tempfile::TempDir,
    store: std::sync::Arc<HubStore>,
}

fn hub() -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(tessera_hub::testing::open_store(dir.path().join("hub")));
    Hub { app: app(AppState::new(store.clone(), HubPolicy::open())), dir, store }
}

impl Hub {
    async fn call(
        &self,
        key: Option<&KeyPair>,
        method: &str,
        uri: &str,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(k) = key {
            let env = Envelope::sign(k, self.store.key().public(), method, uri, &body, now_ms());
            req = req.header(HEADER, env.to_header());
        }
        let resp = self.app.clone().oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
    async fn get(&self, uri: &str) -> Value {
        let (s, v) = self.call(None, "GET", uri, vec![], &[]).await;
        assert_eq!(s, StatusCode::OK, "GET {uri}: {v}");
        v
    }
    /// Publishes a module folder with `readme` as its README.md, signed by `key`.
    async fn publish(&self, key: &KeyPair, name: &str, readme: Option<&str>, libraries: &str) -> (StatusCode, Value) {
        let dir = self.dir.path().join(format!("src-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("module.yaml"),
            format!("name: {name}\nversion: 1.0.0\nkind: task\nruntime: builtin\nentry: echo\ndescription: the {name} module\nneeds:\n  libraries: [{libraries}]\n"),
        )
        .unwrap();
        if let Some(r) = readme {
            std::fs::write(dir.join("README.md"), r).unwrap();
        }
        let bytes = pack_dir(&dir, &Limits::default()).unwrap().bytes;
        let sig = PackageSignature::sign(key, &Digest::of(&bytes));
        self.call(Some(key), "POST", "/api/v1/packages", bytes, &[(PACKAGE_SIGNATURE_HEADER, sig.to_header())]).await
    }
    fn names(v: &Value) -> Vec<String> {
        v.as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect()
    }
}

const CARD: &str = "---\nlicense: apache-2.0\ntags: [vision, federated]\ndatasets: [digits]\nlibrary_name: numpy\n---\n# Digits worker\n\nTrains a softmax regression on its node's digits.\n\n## Use\n\nIn FedAvg sessions.\n";

#[tokio::test]
async fn module_cards_come_from_readme_and_are_searched() {
    let h = hub();
    let alice = KeyPair::generate(KeyType::Ed25519);
    let bob = KeyPair::generate(KeyType::Ed25519);
    assert_eq!(h.publish(&alice, "alice.digits", Some(CARD), "numpy>=1.26").await.0, StatusCode::CREATED);
    assert_eq!(h.publish(&alice, "alice.plain", None, "").await.0, StatusCode::CREATED);
    let mit = "---\nlicense: MIT\ntags: vision\n---\nA torch model.\n";
    assert_eq!(h.publish(&bob, "bob.torch", Some(mit), "torch").await.0, StatusCode::CREATED);

    let card = h.get("/api/v1/packages/alice.digits/1.0.0/card").await;
    assert_eq!(card["license"], "apache-2.0");
    assert_eq!(card["description"], "Trains a softmax regression on its node's digits.");
    assert!(card["text"].as_str().unwrap().contains("## Use"), "{card}");
    assert_eq!(
        h.call(None, "GET", "/api/v1/packages/alice.plain/1.0.0/card", vec![], &[]).await.0,
        StatusCode::NOT_FOUND
    );
    // Listings carry the card's facts, not its text.
    let all = h.get("/api/v1/packages").await;
    let digits = all.as_array().unwrap().iter().find(|r| r["name"] == "alice.digits").unwrap();
    assert_eq!((digits["card"]["license"].as_str(), digits["card"]["text"].as_str()), (Some("apache-2.0"), Some("")));

    for (query, expected) in [
        ("license=apache-2.0", vec!["alice.digits"]),
        ("license=mit", vec!["bob.torch"]),
        ("tag=vision", vec!["alice.digits", "bob.torch"]),
        ("tag=federated", vec!["alice.digits"]),
        ("library=numpy", vec!["alice.digits"]),
        ("library=torch", vec!["bob.torch"]),
        ("q=softmax", vec!["alice.digits"]),
        ("q=plain", vec!["alice.plain"]),
        ("tag=vision&license=mit", vec!["bob.torch"]),
        ("limit=2", vec!["alice.digits", "alice.plain"]),
        ("offset=2&limit=2", vec!["bob.torch"]),
        ("offset=99", vec![]),
    ] {
        let got = Hub::names(&h.get(&format!("/api/v1/packages?{query}")).await);
        assert_eq!(got, expected, "{query}");
    }
    let by_bob = Hub::names(&h.get(&format!("/api/v1/packages?signer={}", bob.public())).await);
    assert_eq!(by_bob, vec!["bob.torch"]);
    // Hostile numbers and a bad card.
    let (s, _) = h.call(None, "GET", "/api/v1/packages?limit=99999999999999999999999", vec![], &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(Hub::names(&h.get(&format!("/api/v1/packages?offset={}", u64::MAX)).await), Vec::<String>::new());
    let (s, b) = h.publish(&alice, "alice.badcard", Some("---\ntags: {a: 1}\n---\n"), "").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b["error"].as_str().unwrap().contains("README.md"), "{b}");
    assert_eq!(h.call(None, "GET", "/api/v1/packages/alice.badcard", vec![], &[]).await.1, json!([]));
}

fn multipart(meta: &Value, file: &[u8]) -> (Vec<u8>, String) {
    let b = "card-test-boundary";
    let mut body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"meta\"\r\n\r\n{meta}\r\n--{b}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    (body, format!("multipart/form-data; boundary={b}"))
}

#[tokio::test]
async fn model_cards_lineage_both_ways_and_downloads() {
    let h = hub();
    let k = KeyPair::generate(KeyType::Ed25519);
    // A base model made by a run, with its lineage.
    let lineage = json!({
        "session": "s-1", "strategy": "fedavg",
        "modules": [{"module": "fl.softmax.worker@0.1.1", "digest": Digest::of(b"worker").to_string(), "role": "worker"}],
        "nodes": ["node-0", "node-1"], "rounds": 3, "metrics": [], "datasets": ["digits"]
    });
    let (body, ctype) = multipart(&json!({"metadata": {"library": "numpy"}, "lineage": lineage}), b"base weights");
    let (s, rec) = h.call(Some(&k), "PUT", "/api/v1/models/team.base/1.0.0", body, &[("content-type", ctype)]).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    // A model built from it: its card names the base.
    let card = "---\nbase_model: team.base@1.0.0\nlicense: mit\ntags: [finetuned]\n---\nFine-tuned on more digits.\n";
    let (body, ctype) = multipart(&json!({"metadata": {}, "card": card}), b"tuned weights");
    let (s, rec) = h.call(Some(&k), "PUT", "/api/v1/models/team.tuned/1.0.0", body, &[("content-type", ctype)]).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    assert_eq!(rec["card"]["base_model"], "team.base@1.0.0");

    let base = h.get("/api/v1/models/team.base/1.0.0/lineage").await;
    assert_eq!(base["model"], "team.base@1.0.0");
    assert_eq!(base["made_by"]["session"], "s-1");
    assert_eq!(base["made_by"]["datasets"], json!(["digits"]));
    assert_eq!(base["derived"], json!(["team.tuned@1.0.0"]));
    let tuned = h.get("/api/v1/models/team.tuned/latest/lineage").await;
    assert_eq!((tuned["base_model"].as_str(), tuned["made_by"].is_null()), (Some("team.base@1.0.0"), true));
    assert_eq!(tuned["derived"], json!([]));
    assert_eq!(h.get("/api/v1/models/team.tuned/1.0.0/card").await["description"], "Fine-tuned on more digits.");
    // Pushed without a card, a run's model shows one made from its lineage; a model with
    // neither has none.
    let made = h.get("/api/v1/models/team.base/1.0.0/card").await;
    assert_eq!(made["datasets"], json!(["digits"]), "{made}");
    assert_eq!(made["library_name"], "numpy", "{made}");
    assert!(made["description"].as_str().unwrap().contains("run s-1 (fedavg, 3 rounds on 2 nodes)"), "{made}");
    assert!(made["text"].as_str().unwrap().contains("fl.softmax.worker@0.1.1"), "{made}");
    let (body, ctype) = multipart(&json!({"metadata": {}}), b"bare weights");
    let (s, rec) = h.call(Some(&k), "PUT", "/api/v1/models/team.bare/1.0.0", body, &[("content-type", ctype)]).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    assert_eq!(h.call(None, "GET", "/api/v1/models/team.bare/1.0.0/card", vec![], &[]).await.0, StatusCode::NOT_FOUND);
    assert_eq!(h.call(Some(&k), "DELETE", "/api/v1/models/team.bare/1.0.0", vec![], &[]).await.0, StatusCode::OK);

    // Search over models.
    for (query, expected) in [
        ("library=numpy", vec!["team.base"]),
        ("license=MIT", vec!["team.tuned"]),
        ("tag=finetuned", vec!["team.tuned"]),
        ("q=fine-tuned", vec!["team.tuned"]),
        ("limit=1", vec!["team.base"]),
        ("offset=1", vec!["team.tuned"]),
    ] {
        assert_eq!(Hub::names(&h.get(&format!("/api/v1/models?{query}")).await), expected, "{query}");
    }
    // A card set later, and a bad one refused with nothing changed.
    let meta = serde_json::to_vec(
        &json!({"metadata": {"library": "numpy"}, "card": "---\nlicense: apache-2.0\n---\nThe base.\n"}),
    )
    .unwrap();
    assert_eq!(h.call(Some(&k), "PUT", "/api/v1/models/team.base/1.0.0/meta", meta, &[]).await.0, StatusCode::OK);
    assert_eq!(h.get("/api/v1/models/team.base/1.0.0/card").await["license"], "apache-2.0");
    let bad = serde_json::to_vec(&json!({"metadata": {}, "card": "---\nlicense: {a: b}\n---\n"})).unwrap();
    let (s, b) = h.call(Some(&k), "PUT", "/api/v1/models/team.base/1.0.0/meta", bad, &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(h.get("/api/v1/models/team.base/1.0.0/card").await["license"], "apache-2.0");
    let huge = serde_json::to_vec(&json!({"metadata": {}, "card": "x".repeat(300 << 10)})).unwrap();
    assert_eq!(
        h.call(Some(&k), "PUT", "/api/v1/models/team.base/1.0.0/meta", huge, &[]).await.0,
        StatusCode::BAD_REQUEST
    );

    // Downloads per version: whole downloads count, a later range does not.
    for _ in 0..2 {
        assert_eq!(h.call(None, "GET", "/api/v1/models/team.base/1.0.0", vec![], &[]).await.0, StatusCode::OK);
    }
    let (s, _) = h.call(None, "GET", "/api/v1/models/team.base/1.0.0", vec![], &[("range", "bytes=4-".into())]).await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(h.get("/api/v1/models/team.base/1.0.0/meta").await["downloads"], 2);
    assert_eq!(h.get("/api/v1/models/team.tuned/1.0.0/meta").await["downloads"], 0);
}

#[tokio::test]
async fn package_downloads_count_by_name_and_by_digest() {
    let h = hub();
    let k = KeyPair::generate(KeyType::Ed25519);
    let (_, rec) = h.publish(&k, "ops.pkg", None, "").await;
    let digest = rec["digest"].as_str().unwrap().to_owned();
    assert_eq!(h.call(None, "GET", "/api/v1/packages/ops.pkg/1.0.0/download", vec![], &[]).await.0, StatusCode::OK);
    assert_eq!(h.call(None, "GET", &format!("/api/v1/blobs/{digest}"), vec![], &[]).await.0, StatusCode::OK);
    assert_eq!(h.get("/api/v1/packages/ops.pkg/1.0.0").await["downloads"], 2);
}
