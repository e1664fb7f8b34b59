//! What signatures cost, in one run.
//!
//! `cargo bench -p tessera-hub --bench signatures`
//!
//! - signing and verifying one request envelope (Ed25519 and secp256k1), the verifier
//!   including its window, audience, body and replay checks;
//! - requests per second through the hub's router (no socket) for a mutating route
//!   (replacing a model's metadata: parse, authorize, SQLite write), unsigned on an open
//!   hub against signed on a hub that requires signatures. Signed requests are prepared
//!   beforehand, so the figure is the server's cost.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use tessera_core::Digest;
use tessera_hub::{AppState, HubPolicy, HubStore, app};
use tessera_identity::envelope::HEADER;
use tessera_identity::{Envelope, KeyPair, KeyType, Verifier, now_ms};
use tower::ServiceExt;

const N: usize = 2_000;

fn per_op(label: &str, n: usize, f: impl FnMut(usize)) -> f64 {
    let mut f = f;
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("| {label} | {us:.1} µs |");
    us
}

async fn requests_per_second(policy: HubPolicy, signer: Option<&KeyPair>) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HubStore::open(dir.path().join("hub")).unwrap());
    store.create_model("bench.model", "1.0.0", &serde_json::json!({}), None, None).unwrap();
    let router = app(AppState::new(store.clone(), policy));
    let path = "/api/v1/models/bench.model/1.0.0/meta";
    let reqs: Vec<Request<Body>> = (0..N)
        .map(|i| {
            let body = serde_json::to_vec(&serde_json::json!({"metadata": {"i": i}})).unwrap();
            let mut r = Request::builder().method("PUT").uri(path).header("content-type", "application/json");
            if let Some(k) = signer {
                r = r.header(HEADER, Envelope::sign(k, store.key().public(), "PUT", path, &body, now_ms()).to_header());
            }
            r.body(Body::from(body)).unwrap()
        })
        .collect();
    let t = Instant::now();
    for r in reqs {
        let resp = router.clone().oneshot(r).await.unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
    }
    N as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    println!("| operation | cost per request |");
    println!("|---|---|");
    for ty in [KeyType::Ed25519, KeyType::Secp256k1] {
        let client = KeyPair::generate(ty);
        let server = KeyPair::generate(KeyType::Ed25519);
        let body = vec![7u8; 1024];
        per_op(&format!("sign ({ty})"), N, |_| {
            std::hint::black_box(Envelope::sign(&client, server.public(), "POST", "/api/v1/packages", &body, now_ms()));
        });
        let headers: Vec<String> = (0..N)
            .map(|_| Envelope::sign(&client, server.public(), "POST", "/api/v1/packages", &body, now_ms()).to_header())
            .collect();
        let v = Verifier::new(server.public().clone());
        let digest = Digest::of(&body);
        per_op(&format!("verify ({ty}): parse, window, audience, body, signature, replay"), N, |i| {
            let env = Envelope::parse(&headers[i]).unwrap();
            v.verify_envelope(&env, "POST", "/api/v1/packages", &digest, now_ms()).unwrap();
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let key = KeyPair::generate(KeyType::Ed25519);
    let open = rt.block_on(requests_per_second(HubPolicy::open(), None));
    let signed = rt.block_on(requests_per_second(HubPolicy::signed(), Some(&key)));
    println!();
    println!("| hub route (PUT model metadata), {N} requests | requests/s |");
    println!("|---|---|");
    println!("| unsigned, open hub | {open:.0} |");
    println!(
        "| signed (Ed25519), hub requiring signatures | {signed:.0} ({:.0}% of unsigned) |",
        100.0 * signed / open
    );
}
