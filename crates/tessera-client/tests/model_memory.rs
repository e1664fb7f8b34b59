//! A push and a pull of a model stream: memory counted by the allocator (hub and client in
//! this one process together), alone in its test binary so nothing else allocates meanwhile.

use std::sync::Arc;

use peakmem_alloc::{INSTRUMENTED_SYSTEM, PeakMemAlloc, PeakMemAllocTrait};
use serde_json::json;
use tessera_client::{HubClient, ModelSource, UploadMeta};
use tessera_hub::{AppState, HubPolicy, HubStore, app};

#[global_allocator]
static GLOBAL: &PeakMemAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

async fn serve(policy: HubPolicy) -> (String, Arc<HubStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HubStore::open(dir.path().join("hub")).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app(AppState::new(store.clone(), policy));
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (format!("http://{addr}"), store, dir)
}

/// A 64 MiB model goes up and comes back with at most a few MiB allocated at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_pull_stream() {
    const SIZE: usize = 64 << 20;
    const BOUND: usize = 12 << 20;
    let (url, _store, dir) = serve(HubPolicy::open()).await;
    let file = dir.path().join("model.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&file).unwrap();
        let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..SIZE >> 20 {
            f.write_all(&chunk).unwrap();
        }
    }
    let client = HubClient::new(&url).unwrap();
    let meta = UploadMeta { metadata: json!({"library": "test"}), lineage: None, card: None };
    client.health().await.unwrap();

    let before = GLOBAL.get_peak_memory();
    GLOBAL.reset_peak_memory();
    let (rec, created) =
        client.push_model_from("big.model", "1.0.0", ModelSource::File(file.clone()), Some(&meta)).await.unwrap();
    let push_peak = GLOBAL.get_peak_memory();
    assert!(created);
    assert_eq!(rec.size, Some(SIZE as u64));
    assert_eq!(rec.metadata["library"], "test");

    GLOBAL.reset_peak_memory();
    let back = dir.path().join("back.bin");
    let pulled = client.pull_model_to("big.model", "latest", &back).await.unwrap();
    let pull_peak = GLOBAL.get_peak_memory();
    assert_eq!(pulled.digest, rec.digest);
    assert_eq!(std::fs::metadata(&back).unwrap().len(), SIZE as u64);
    assert!(push_peak < BOUND, "push peaked at {} MiB (baseline {} MiB)", push_peak >> 20, before >> 20);
    assert!(pull_peak < BOUND, "pull peaked at {} MiB", pull_peak >> 20);

    // A corrupted download never takes the destination's name.
    let hex = rec.digest.unwrap().hex();
    let blob = std::fs::read_dir(dir.path().join("hub/blobs"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy() == hex[..2])
        .unwrap();
    for f in std::fs::read_dir(blob.path()).unwrap().flatten() {
        std::fs::write(f.path(), b"corrupted").unwrap();
    }
    let dest = dir.path().join("not-there.bin");
    assert!(client.pull_model_to("big.model", "1.0.0", &dest).await.is_err());
    assert!(!dest.exists());
}
