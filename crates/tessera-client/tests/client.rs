//! The client against a real hub on a real socket.

use std::sync::Arc;

use tessera_client::{ClientError, HubClient, ListParams};
use tessera_core::{Digest, PackageRef};
use tessera_hub::{AppState, HubPolicy, HubStore, app};
use tessera_package::{Limits, pack_dir};
use tessera_ports::PackageSource;

async fn serve() -> (HubClient, Arc<HubStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HubStore::open(dir.path().join("hub")).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app(AppState::new(store.clone(), HubPolicy::open()));
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (HubClient::new(&format!("http://{addr}")).unwrap(), store, dir)
}

fn package(dir: &std::path::Path, version: &str, text: &str) -> Vec<u8> {
    let m = dir.join(format!("m-{version}-{text}"));
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("module.yaml"),
        format!("name: demo.echo\nversion: {version}\nkind: task\nruntime: builtin\nentry: echo\ntags: [demo]\n"),
    )
    .unwrap();
    std::fs::write(m.join("notes.txt"), text).unwrap();
    pack_dir(&m, &Limits::default()).unwrap().bytes
}

#[tokio::test]
async fn publish_find_and_fetch_verified() {
    let (client, store, dir) = serve().await;
    assert_eq!(client.health().await.unwrap()["status"], "ok");
    let bytes = package(dir.path(), "0.1.0", "a");
    let (rec, created) = client.publish(bytes.clone()).await.unwrap();
    assert!(created);
    assert_eq!(rec.digest, Digest::of(&bytes));
    let (_, created) = client.publish(bytes.clone()).await.unwrap();
    assert!(!created);
    let e = client.publish(package(dir.path(), "0.1.0", "b")).await.unwrap_err();
    assert!(e.is_conflict(), "{e}");

    let r: PackageRef = "demo.echo".parse().unwrap();
    let (shown, got) = client.download(&r).await.unwrap();
    assert_eq!(shown.version, "0.1.0");
    assert_eq!(&got[..], &bytes[..]);
    assert_eq!(client.list(&ListParams { tag: Some("demo".into()), ..Default::default() }).await.unwrap().len(), 1);
    assert_eq!(client.show(&PackageRef::Digest(rec.digest)).await.unwrap().name, "demo.echo");

    // As a package source.
    assert_eq!(&client.fetch(&rec.digest).await.unwrap()[..], &bytes[..]);
    assert!(matches!(
        client.resolve(&"demo.nothing".parse().unwrap()).await,
        Err(tessera_ports::SourceError::NotFound(_))
    ));

    // Bytes corrupted on the hub's disk are refused by the client.
    std::fs::write(store.blobs().path_of(&rec.digest), b"corrupted").unwrap();
    let e = client.blob(&rec.digest).await.unwrap_err();
    assert!(matches!(e, ClientError::Verify { .. }), "{e}");
}

/// A Component Repository entry whose object is a package resolves over HTTP as that
/// package (the entry's needs joined), and its bytes are fetched by digest as a node does.
#[tokio::test]
async fn a_component_entry_resolves_as_its_package() {
    let (client, store, dir) = serve().await;
    let bytes = package(dir.path(), "0.3.0", "c");
    let doc = serde_json::json!({"id": "demo.echo", "needs": {"RAM": 2, "GPU": false}});
    let c = tessera_hub::Collection::Service;
    store.create_component(c, "demo.echo", doc.as_object().unwrap(), None).unwrap();
    let missing = client.resolve(&"service/demo.echo".parse().unwrap()).await.unwrap_err();
    assert!(matches!(missing, tessera_ports::SourceError::NotFound(_)), "{missing}");
    store.put_component_bytes(c, "demo.echo", &bytes, None).unwrap();
    let r = client.resolve(&"service/demo.echo".parse().unwrap()).await.unwrap();
    assert_eq!((r.name.as_str(), r.version.as_str(), r.digest), ("demo.echo", "0.3.0", Digest::of(&bytes)));
    assert_eq!((r.component.as_deref(), r.manifest.needs.memory.0), (Some("service/demo.echo"), 2_000_000_000));
    assert_eq!(client.resolve(&PackageRef::Digest(r.digest)).await.unwrap().name, "demo.echo");
    assert_eq!(&client.fetch(&r.digest).await.unwrap()[..], &bytes[..]);
    // The same id in another collection is another entry.
    let other: PackageRef = "inferencer/demo.echo".parse().unwrap();
    assert!(client.resolve(&other).await.is_err());
    // An answer naming another entry, or an entry when none was asked, is not taken.
    let asked: PackageRef = "service/demo.echo".parse().unwrap();
    let mut wrong = r.clone();
    wrong.component = Some("service/demo.other".into());
    assert!(tessera_client::check_record(&asked, &wrong).is_err());
    assert!(tessera_client::check_record(&PackageRef::Digest(r.digest), &r).is_err());
    assert!(tessera_client::check_record(&"demo.echo@0.3.0".parse().unwrap(), &r).is_err());
    assert!(tessera_client::check_record(&asked, &r).is_ok());
}

#[tokio::test]
async fn models_round_trip() {
    let (client, _store, _dir) = serve().await;
    let lineage = None;
    client.create_model("digits.softmax", "0.1.0", &serde_json::json!({"accuracy": 0.95}), lineage).await.unwrap();
    let (rec, created) = client.push_model("digits.softmax", "0.1.0", vec![1, 2, 3]).await.unwrap();
    assert!(created);
    assert_eq!(rec.metadata["accuracy"], 0.95);
    let (rec, bytes) = client.pull_model("digits.softmax", "latest").await.unwrap();
    assert_eq!(rec.version, "0.1.0");
    assert_eq!(&bytes[..], &[1, 2, 3]);
    assert_eq!(client.models(Some("digits")).await.unwrap().len(), 1);
    assert!(client.pull_model("digits.other", "latest").await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn unreachable_and_bad_addresses() {
    assert!(matches!(HubClient::new("localhost:7700"), Err(ClientError::Address(_))));
    let c = HubClient::new("http://127.0.0.1:9").unwrap();
    let e = c.health().await.unwrap_err();
    assert!(matches!(e, ClientError::Transport { .. }), "{e}");
    assert!(e.to_string().contains("127.0.0.1:9"));
}

#[tokio::test]
async fn version_ranges_resolve_to_the_highest_match_over_http() {
    let (client, _store, dir) = serve().await;
    for v in ["1.0.0", "1.2.0", "1.3.0-rc.1", "2.0.0"] {
        client.publish(package(dir.path(), v, v)).await.unwrap();
    }
    let resolve = |r: &str| {
        let client = client.clone();
        let r: PackageRef = r.parse().unwrap();
        async move { client.download(&r).await.map(|(rec, _)| rec.version) }
    };
    assert_eq!(resolve("demo.echo@^1").await.unwrap(), "1.2.0", "pre-releases only when asked for");
    assert_eq!(resolve("demo.echo@>=1.0, <1.2").await.unwrap(), "1.0.0");
    assert_eq!(resolve("demo.echo@>=1").await.unwrap(), "2.0.0");
    let none = resolve("demo.echo@^3").await.unwrap_err();
    assert!(none.to_string().contains("^3"), "{none}");
}

/// A hub from before piece statements refuses a piece signed over its statement: the client
/// then signs its pieces over their bytes, and the push completes.
#[tokio::test]
async fn a_hub_refusing_piece_statements_gets_pieces_signed_over_their_bytes() {
    use axum::extract::Request;
    use axum::middleware::Next;
    use axum::response::IntoResponse;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HubStore::open(dir.path().join("hub")).unwrap());
    let (refused, passed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (r, p) = (refused.clone(), passed.clone());
    let old_hub = move |req: Request, next: Next| {
        let (r, p) = (r.clone(), p.clone());
        async move {
            let statement_signed = {
                let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
                match req.uri().path().strip_prefix("/api/v1/uploads/") {
                    Some(id) if req.method() == "PATCH" => {
                        let env = tessera_identity::Envelope::parse(&header("x-tessera-signature").unwrap()).unwrap();
                        let offset: u64 = header("upload-offset").unwrap().parse().unwrap();
                        let len: u64 = header("content-length").unwrap().parse().unwrap();
                        Some(env.body == tessera_core::registry::upload_piece_statement(id, offset, len))
                    }
                    _ => None,
                }
            };
            match statement_signed {
                Some(true) => {
                    r.fetch_add(1, Ordering::SeqCst);
                    (axum::http::StatusCode::UNAUTHORIZED, "the body does not match the signed digest").into_response()
                }
                Some(false) => {
                    p.fetch_add(1, Ordering::SeqCst);
                    next.run(req).await
                }
                None => next.run(req).await,
            }
        }
    };
    let router = app(AppState::new(store.clone(), HubPolicy::signed())).layer(axum::middleware::from_fn(old_hub));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let key = Arc::new(tessera_identity::KeyPair::generate(tessera_identity::KeyType::Ed25519));
    let client = HubClient::new(&format!("http://{addr}")).unwrap().with_signer(key);
    let file = dir.path().join("model.bin");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    let (rec, created) =
        client.push_model_resumable("ops.model", "1.0.0", &file, None, 100_000, &|_, _| {}).await.unwrap();
    assert!(created);
    assert_eq!(rec.digest, Some(Digest::of(&bytes)));
    assert_eq!((refused.load(Ordering::SeqCst), passed.load(Ordering::SeqCst)), (1, 3), "one refusal, then by bytes");
}
