//! Model transfers: concurrent uploads get distinct versions; interrupted pushes and pulls resume.

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
                let meta = UploadMeta { metadata: json!({"session": i}), lineage: None, card: None };
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

/// A push interrupted after its first piece (here: an earlier client that sent one piece and
/// went away) continues from the hub's offset, with the same signer; the same bytes again
/// are not sent at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_push_resumes_where_the_hub_stands() {
    let (url, store, dir) = serve(HubPolicy::signed()).await;
    let key = tessera_identity::KeyPair::generate(tessera_identity::KeyType::Ed25519);
    let client = HubClient::new(&url).unwrap().with_signer(Arc::new(key));
    let bytes: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let file = dir.path().join("model.bin");
    std::fs::write(&file, &bytes).unwrap();
    // The earlier push: one piece of 100,000 bytes, then nothing.
    let up = client.begin_upload(&Digest::of(&bytes), bytes.len() as u64).await.unwrap();
    assert_eq!(up.offset, 0);
    let seen = std::sync::Mutex::new(Vec::new());
    let progress = |have: u64, _total: u64| seen.lock().unwrap().push(have);
    // A first run that is cut off after its first piece: the progress callback ends it.
    let cut = std::panic::AssertUnwindSafe(client.push_model_resumable(
        "big.model",
        "1.0.0",
        &file,
        None,
        100_000,
        &|have, _| {
            assert!(have < 100_000, "cut off after the first piece");
        },
    ));
    let first = futures::FutureExt::catch_unwind(cut).await;
    assert!(first.is_err(), "the first run was cut off");
    assert_eq!(client.begin_upload(&Digest::of(&bytes), bytes.len() as u64).await.unwrap().offset, 100_000);
    // The second run sends only what is missing.
    let meta = UploadMeta { metadata: json!({"stage": "resumed"}), lineage: None, card: None };
    let (rec, created) =
        client.push_model_resumable("big.model", "1.0.0", &file, Some(&meta), 100_000, &progress).await.unwrap();
    assert!(created);
    assert_eq!(rec.digest, Some(Digest::of(&bytes)));
    assert_eq!(rec.metadata["stage"], "resumed");
    let expected: Vec<u64> = (1..=12).map(|i| i * 100_000).collect();
    assert_eq!(seen.lock().unwrap().clone(), expected, "pieces from the hub's offset on, then done");
    // The same bytes as another version: no piece at all, so no progress either.
    seen.lock().unwrap().clear();
    let (again, _) = client.push_model_resumable("big.model", "2.0.0", &file, None, 100_000, &progress).await.unwrap();
    assert_eq!(again.digest, rec.digest);
    assert_eq!(seen.lock().unwrap().clone(), Vec::<u64>::new(), "nothing was sent");
    assert_eq!(std::fs::read(store.blobs().path_of(&Digest::of(&bytes))).unwrap(), bytes);
}

/// A pull that stopped midway leaves its part file; the next pull asks only for the rest
/// (a range request), and the whole is checked against the digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_pull_resumes_with_a_range_request() {
    let (url, _store, dir) = serve(HubPolicy::open()).await;
    let client = HubClient::new(&url).unwrap();
    let bytes: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let (rec, _) =
        client.push_model_from("ops.model", "1.0.0", ModelSource::Bytes(bytes.clone().into()), None).await.unwrap();
    let digest = rec.digest.unwrap();
    let dest = dir.path().join("model.safetensors");
    let part = dir.path().join(format!(".model.safetensors.{}.part", &digest.hex()[..16]));
    // A part whose first half is wrong: only a range request keeps it, and then the digest
    // check catches it (a full download would have been right).
    let mut wrong = vec![0u8; 400_000];
    wrong[0] = 1;
    std::fs::write(&part, &wrong).unwrap();
    let e = client.pull_model_to("ops.model", "1.0.0", &dest).await.unwrap_err();
    assert!(matches!(e, tessera_client::ClientError::Verify { .. }), "{e}");
    assert!(!dest.exists() && !part.exists(), "a part that does not check is dropped");
    // A right first half: the rest comes by range, and the file is whole.
    std::fs::write(&part, &bytes[..400_000]).unwrap();
    client.pull_model_to("ops.model", "1.0.0", &dest).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    assert!(!part.exists());
    // A part that is already whole is checked as it is.
    std::fs::write(&part, &bytes).unwrap();
    std::fs::remove_file(&dest).unwrap();
    client.pull_model_to("ops.model", "1.0.0", &dest).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
}
