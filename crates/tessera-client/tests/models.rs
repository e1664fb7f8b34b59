//! Concurrent uploads of new model versions get distinct versions.

use std::sync::Arc;

use serde_json::json;
use tessera_client::{HubClient, ModelSource, UploadMeta};
use tessera_core::Digest;
use tessera_hub::{AppState, HubPolicy, HubStore, app};

async fn serve(policy: HubPolicy) -> (String, Arc<HubStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HubStore::open(dir.path().join("hub")).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app(AppState::new(store.clone(), policy));
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (format!("http://{addr}"), store, dir)
}

/// Eight sessions publishing one model name at once (`publish_as`) get eight versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_get_distinct_versions() {
    let (url, store, _dir) = serve(HubPolicy::open()).await;
    let key = Arc::new(tessera_identity::KeyPair::generate(tessera_identity::KeyType::Ed25519));
    let client = HubClient::new(&url).unwrap().with_signer(key);
    let tasks: Vec<_> = (0..8u8)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                let meta = UploadMeta { metadata: json!({"session": i}), lineage: None };
                c.publish_model("digits.softmax", ModelSource::Bytes(vec![i; 100].into()), Some(&meta)).await.unwrap()
            })
        })
        .collect();
    let mut versions = Vec::new();
    for t in tasks {
        let rec = t.await.unwrap();
        // Each version holds the bytes and metadata of the session that made it.
        let i = rec.metadata["session"].as_u64().unwrap() as u8;
        assert_eq!(rec.digest, Some(Digest::of(&[i; 100])));
        versions.push(rec.version);
    }
    versions.sort();
    let expected: Vec<String> = (0..8).map(|p| format!("0.1.{p}")).collect();
    assert_eq!(versions, expected);
    assert_eq!(store.models(Some("digits")).unwrap().len(), 8);
}
