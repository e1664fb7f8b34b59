//! Large artifacts: resumable uploads, range downloads, tensor metadata from the header.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tessera_core::Digest;
use tessera_hub::{AppState, HubPolicy, HubStore, app};
use tessera_identity::envelope::HEADER;
use tessera_identity::{Envelope, KeyPair, KeyType, now_ms};
use tower::ServiceExt;

struct Hub {
    app: Router,
    _dir: tempfile::TempDir,
    store: std::sync::Arc<HubStore>,
}

fn hub(policy: HubPolicy) -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(tessera_hub::testing::open_store(dir.path().join("hub")));
    Hub { app: app(AppState::new(store.clone(), policy)), _dir: dir, store }
}

impl Hub {
    /// A request, signed by `key` when given.
    async fn call(
        &self,
        key: Option<&KeyPair>,
        method: &str,
        uri: &str,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> (StatusCode, Vec<u8>, axum::http::HeaderMap) {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(k) = key {
            let env = Envelope::sign(k, self.store.key().public(), method, uri, &body, now_ms());
            req = req.header(HEADER, env.to_header());
        }
        let resp = self.app.clone().oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec(), headers)
    }
    async fn json(
        &self,
        key: Option<&KeyPair>,
        method: &str,
        uri: &str,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> (StatusCode, Value) {
        let (s, b, _) = self.call(key, method, uri, body, headers).await;
        (s, serde_json::from_slice(&b).unwrap_or_else(|_| json!(String::from_utf8_lossy(&b))))
    }
    async fn begin(&self, key: Option<&KeyPair>, bytes: &[u8]) -> (StatusCode, Value) {
        let body = serde_json::to_vec(&json!({"digest": Digest::of(bytes).to_string(), "size": bytes.len()})).unwrap();
        self.json(key, "POST", "/api/v1/uploads", body, &[]).await
    }
    async fn piece(&self, key: Option<&KeyPair>, id: &str, offset: usize, bytes: &[u8]) -> (StatusCode, Value) {
        self.json(
            key,
            "PATCH",
            &format!("/api/v1/uploads/{id}"),
            bytes.to_vec(),
            &[("upload-offset", offset.to_string())],
        )
        .await
    }
    fn blob_bytes_on_disk(&self) -> u64 {
        let mut total = 0;
        let mut stack = vec![self.store.blobs().dir().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    total += e.metadata().unwrap().len();
                }
            }
        }
        total
    }
}

/// A safetensors file of a few tensors, `n` f32 values in the largest.
fn model_bytes(n: usize) -> Vec<u8> {
    let big: Vec<u8> = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let counter = 7i64.to_le_bytes();
    let half = [0u8; 6];
    let views = vec![
        ("layer.weight", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n], &big).unwrap()),
        (
            "bn.num_batches_tracked",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![], &counter).unwrap(),
        ),
        ("head.bias", safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![3], &half).unwrap()),
    ];
    let meta = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize(views, Some(meta)).unwrap()
}

#[tokio::test]
async fn an_interrupted_upload_resumes_and_is_checked_end_to_end() {
    let h = hub(HubPolicy::signed());
    let k = KeyPair::generate(KeyType::Ed25519);
    let model = model_bytes(300_000);
    let (s, up) = h.begin(Some(&k), &model).await;
    assert_eq!(s, StatusCode::OK, "{up}");
    assert_eq!((up["offset"].as_u64(), up["complete"].as_bool()), (Some(0), Some(false)));
    let id = up["id"].as_str().unwrap().to_owned();

    // The first piece arrives; the second is cut short by a broken connection (a body that
    // fails half-way): the offset stays that of the whole first piece.
    let (first, rest) = model.split_at(400_000);
    let (s, after) = h.piece(Some(&k), &id, 0, first).await;
    assert_eq!((s, after["offset"].as_u64()), (StatusCode::OK, Some(400_000)), "{after}");
    let broken = futures::stream::iter(vec![
        Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(&rest[..1000])),
        Err(std::io::Error::other("connection reset")),
    ]);
    let req = Request::builder()
        .method("PATCH")
        .uri(format!("/api/v1/uploads/{id}"))
        .header("upload-offset", "400000")
        .header(
            HEADER,
            Envelope::sign_digest(
                &k,
                h.store.key().public(),
                "PATCH",
                &format!("/api/v1/uploads/{id}"),
                Digest::of(&rest[..1000]),
                now_ms(),
            )
            .to_header(),
        )
        .body(Body::from_stream(broken))
        .unwrap();
    let s = h.app.clone().oneshot(req).await.unwrap().status();
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // The client starts again: the same declaration finds the same upload, at its offset.
    let (_, again) = h.begin(Some(&k), &model).await;
    assert_eq!((again["id"].as_str(), again["offset"].as_u64()), (Some(id.as_str()), Some(400_000)), "{again}");
    // A piece at another offset is refused, and writes nothing.
    assert_eq!(h.piece(Some(&k), &id, 0, rest).await.0, StatusCode::CONFLICT);
    assert_eq!(h.piece(Some(&k), &id, 400_001, rest).await.0, StatusCode::CONFLICT);
    // Naming it before it is complete is refused.
    let (s, b) = h.json(Some(&k), "PUT", &format!("/api/v1/models/big.model/1.0.0?upload={id}"), vec![], &[]).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    // Another account does not see it.
    let other = KeyPair::generate(KeyType::Ed25519);
    assert_eq!(h.piece(Some(&other), &id, 400_000, rest).await.0, StatusCode::NOT_FOUND);
    // More than the declared size is refused.
    let mut over = rest.to_vec();
    over.push(0);
    assert_eq!(h.piece(Some(&k), &id, 400_000, &over).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    let (s, done) = h.piece(Some(&k), &id, 400_000, rest).await;
    assert_eq!((s, done["complete"].as_bool()), (StatusCode::OK, Some(true)), "{done}");

    // The model upload names it, with its metadata.
    let meta = serde_json::to_vec(&json!({"metadata": {"library": "torch"}})).unwrap();
    let (s, rec) = h.json(Some(&k), "PUT", &format!("/api/v1/models/big.model/1.0.0?upload={id}"), meta, &[]).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    assert_eq!(rec["digest"], Digest::of(&model).to_string());
    assert_eq!(rec["metadata"]["library"], "torch");
    assert_eq!(
        h.json(Some(&k), "GET", &format!("/api/v1/uploads/{id}"), vec![], &[]).await.0,
        StatusCode::NOT_FOUND,
        "used up"
    );
    let stored = h.blob_bytes_on_disk();
    assert_eq!(stored, model.len() as u64, "one copy, no leftover piece");

    // The same bytes again cost nothing: the hub says it has them, no id, no bytes sent.
    let (s, same) = h.begin(Some(&k), &model).await;
    assert_eq!((s, same["complete"].as_bool(), same["id"].is_null()), (StatusCode::OK, Some(true), true), "{same}");
    let (s, rec2) = h
        .json(Some(&k), "PUT", &format!("/api/v1/models/big.model/2.0.0?upload={}", Digest::of(&model)), vec![], &[])
        .await;
    assert_eq!(s, StatusCode::CREATED, "{rec2}");
    assert_eq!(rec2["digest"], rec["digest"]);
    assert_eq!(h.blob_bytes_on_disk(), stored, "no new space");

    // Range downloads: a part, with the whole object's digest to check the assembly.
    let (s, part, headers) =
        h.call(None, "GET", "/api/v1/models/big.model/2.0.0", vec![], &[("range", "bytes=100-199".into())]).await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part, model[100..200].to_vec());
    assert_eq!(headers["content-range"], format!("bytes 100-199/{}", model.len()).as_str());
    assert_eq!(headers["x-tessera-digest"], Digest::of(&model).to_string().as_str());
    let (s, tail, _) =
        h.call(None, "GET", "/api/v1/models/big.model/2.0.0", vec![], &[("range", "bytes=1000000-".into())]).await;
    assert_eq!((s, tail.as_slice()), (StatusCode::PARTIAL_CONTENT, &model[1_000_000..]));
    let (s, _, _) =
        h.call(None, "GET", "/api/v1/models/big.model/2.0.0", vec![], &[("range", "bytes=99999999-".into())]).await;
    assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE);
    let (s, whole, headers) = h.call(None, "GET", "/api/v1/models/big.model/2.0.0", vec![], &[]).await;
    assert_eq!((s, Digest::of(&whole)), (StatusCode::OK, Digest::of(&model)));
    assert_eq!(headers["accept-ranges"], "bytes");
}

#[tokio::test]
async fn an_upload_whose_bytes_do_not_match_is_discarded() {
    let h = hub(HubPolicy::open());
    let declared = b"the declared bytes".to_vec();
    let (_, up) = h.begin(None, &declared).await;
    let id = up["id"].as_str().unwrap().to_owned();
    let (s, b) = h.piece(None, &id, 0, b"other bytes, same len").await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
    let (s, _) = h.piece(None, &id, 0, b"the forged bytes!!").await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = h.json(None, "PUT", &format!("/api/v1/models/ops.m/1.0.0?upload={id}"), vec![], &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b["error"].as_str().unwrap().contains("not the declared"), "{b}");
    assert_eq!(h.json(None, "GET", "/api/v1/models", vec![], &[]).await.1, json!([]));
    assert_eq!(h.blob_bytes_on_disk(), 0, "the forged upload is gone");
}

impl Hub {
    /// A piece signed over its statement (upload, offset, `signed_len`), not its bytes.
    async fn stated_piece(
        &self,
        key: &KeyPair,
        id: &str,
        offset: usize,
        signed_len: usize,
        bytes: &[u8],
    ) -> StatusCode {
        let uri = format!("/api/v1/uploads/{id}");
        let statement = tessera_core::registry::upload_piece_statement(id, offset as u64, signed_len as u64);
        let env = Envelope::sign_digest(key, self.store.key().public(), "PATCH", &uri, statement, now_ms());
        let req = Request::builder()
            .method("PATCH")
            .uri(&uri)
            .header("upload-offset", offset.to_string())
            .header("content-length", bytes.len().to_string())
            .header(HEADER, env.to_header())
            .body(Body::from(bytes.to_vec()))
            .unwrap();
        self.app.clone().oneshot(req).await.unwrap().status()
    }
}

#[tokio::test]
async fn a_piece_signed_over_its_statement_is_proven_by_the_uploads_digest() {
    let h = hub(HubPolicy::signed());
    let k = KeyPair::generate(KeyType::Ed25519);
    let model = model_bytes(100_000);
    let (_, up) = h.begin(Some(&k), &model).await;
    let id = up["id"].as_str().unwrap().to_owned();
    let (first, rest) = model.split_at(150_000);
    assert_eq!(h.stated_piece(&k, &id, 0, first.len(), first).await, StatusCode::OK);
    // A statement of another offset, another length or another upload is refused, and the
    // upload stays where it was.
    assert_eq!(h.stated_piece(&k, &id, 150_000, rest.len() + 1, rest).await, StatusCode::UNAUTHORIZED);
    let (_, other) = h.begin(Some(&k), b"another object").await;
    let other = other["id"].as_str().unwrap().to_owned();
    let uri = format!("/api/v1/uploads/{id}");
    let stolen = tessera_core::registry::upload_piece_statement(&other, 150_000, rest.len() as u64);
    let env = Envelope::sign_digest(&k, h.store.key().public(), "PATCH", &uri, stolen, now_ms());
    let req = Request::builder()
        .method("PATCH")
        .uri(&uri)
        .header("upload-offset", "150000")
        .header("content-length", rest.len().to_string())
        .header(HEADER, env.to_header())
        .body(Body::from(rest.to_vec()))
        .unwrap();
    assert_eq!(h.app.clone().oneshot(req).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    // A statement of another offset; another account's statement; a statement without a
    // content-length to bind its length.
    assert_eq!(h.stated_piece(&k, &id, 0, rest.len(), rest).await, StatusCode::CONFLICT);
    let intruder = KeyPair::generate(KeyType::Ed25519);
    assert_eq!(h.stated_piece(&intruder, &id, 150_000, rest.len(), rest).await, StatusCode::NOT_FOUND);
    let statement = tessera_core::registry::upload_piece_statement(&id, 150_000, rest.len() as u64);
    let env = Envelope::sign_digest(&k, h.store.key().public(), "PATCH", &uri, statement, now_ms());
    let chunked = futures::stream::iter(vec![Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(rest))]);
    let req = Request::builder()
        .method("PATCH")
        .uri(&uri)
        .header("upload-offset", "150000")
        .header(HEADER, env.to_header())
        .body(Body::from_stream(chunked))
        .unwrap();
    assert_eq!(h.app.clone().oneshot(req).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    // A statement-signed piece cut short by a broken connection: its header, captured, does
    // not carry other bytes (its nonce was spent before the body arrived).
    let env = Envelope::sign_digest(&k, h.store.key().public(), "PATCH", &uri, statement, now_ms());
    let broken = futures::stream::iter(vec![
        Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(&rest[..1000])),
        Err(std::io::Error::other("connection reset")),
    ]);
    let req = |body: Body| {
        Request::builder()
            .method("PATCH")
            .uri(&uri)
            .header("upload-offset", "150000")
            .header("content-length", rest.len().to_string())
            .header(HEADER, env.to_header())
            .body(body)
            .unwrap()
    };
    assert_eq!(h.app.clone().oneshot(req(Body::from_stream(broken))).await.unwrap().status(), StatusCode::BAD_REQUEST);
    let forged = vec![0u8; rest.len()];
    assert_eq!(h.app.clone().oneshot(req(Body::from(forged))).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let (_, state) = h.json(Some(&k), "GET", &uri, vec![], &[]).await;
    assert_eq!(state["offset"].as_u64(), Some(150_000), "{state}");

    // Bytes altered on the way pass as a piece, but the upload's digest catches them: the
    // naming is refused and the upload discarded.
    let mut altered = rest.to_vec();
    altered[10] ^= 1;
    assert_eq!(h.stated_piece(&k, &id, 150_000, altered.len(), &altered).await, StatusCode::OK);
    let (s, b) = h.json(Some(&k), "PUT", &format!("/api/v1/models/big.model/1.0.0?upload={id}"), vec![], &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b["error"].as_str().unwrap().contains("not the declared"), "{b}");
    assert_eq!(h.blob_bytes_on_disk(), 0, "nothing kept");

    // Sent intact, the same upload again is stored.
    let (_, up) = h.begin(Some(&k), &model).await;
    let id = up["id"].as_str().unwrap().to_owned();
    assert_eq!(h.stated_piece(&k, &id, 0, first.len(), first).await, StatusCode::OK);
    assert_eq!(h.stated_piece(&k, &id, 150_000, rest.len(), rest).await, StatusCode::OK);
    let (s, rec) = h.json(Some(&k), "PUT", &format!("/api/v1/models/big.model/1.0.0?upload={id}"), vec![], &[]).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    assert_eq!(rec["digest"], Digest::of(&model).to_string());
}

#[tokio::test]
async fn hostile_uploads_are_refused() {
    let h = hub(HubPolicy::open());
    /// Method, path, body, headers, the answer.
    type Case = (&'static str, String, Vec<u8>, Vec<(&'static str, String)>, StatusCode);
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/api/v1/uploads".into(),
            b"{\"digest\": \"b3:00\", \"size\": 1}".to_vec(),
            vec![],
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/api/v1/uploads".into(),
            format!("{{\"digest\": \"{}\", \"size\": 99999999999999999999999}}", Digest::of(b"x")).into_bytes(),
            vec![],
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/api/v1/uploads".into(),
            format!("{{\"digest\": \"{}\", \"size\": {}}}", Digest::of(b"x"), u64::MAX).into_bytes(),
            vec![],
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        ("POST", "/api/v1/uploads".into(), b"{\"size\": 1, \"extra\": 1}".to_vec(), vec![], StatusCode::BAD_REQUEST),
        ("GET", "/api/v1/uploads/..".into(), vec![], vec![], StatusCode::BAD_REQUEST),
        ("GET", "/api/v1/uploads/0123456789abcdef0123456789abcdef".into(), vec![], vec![], StatusCode::NOT_FOUND),
        (
            "PATCH",
            "/api/v1/uploads/0123456789abcdef0123456789abcdef".into(),
            b"x".to_vec(),
            vec![("upload-offset", "0".into())],
            StatusCode::NOT_FOUND,
        ),
        (
            "PATCH",
            "/api/v1/uploads/0123456789abcdef0123456789abcdef".into(),
            b"x".to_vec(),
            vec![],
            StatusCode::BAD_REQUEST,
        ),
        (
            "PATCH",
            "/api/v1/uploads/%2e%2e%2f%2e%2e".into(),
            b"x".to_vec(),
            vec![("upload-offset", "0".into())],
            StatusCode::BAD_REQUEST,
        ),
        ("PUT", "/api/v1/models/ops.m/1.0.0?upload=../../etc/passwd".into(), vec![], vec![], StatusCode::BAD_REQUEST),
        (
            "PUT",
            format!("/api/v1/models/ops.m/1.0.0?upload={}", Digest::of(b"never stored")),
            vec![],
            vec![],
            StatusCode::NOT_FOUND,
        ),
    ];
    for (method, path, body, headers, expected) in cases {
        let (s, b) = h.json(None, method, &path, body, &headers).await;
        assert_eq!(s, expected, "{method} {path}: {b}");
    }
    // Unsigned clients are one account: the same declaration twice gets two uploads, never
    // another client's.
    let (_, a) = h.begin(None, b"same").await;
    let (_, b) = h.begin(None, b"same").await;
    assert_ne!(a["id"], b["id"]);
    // Eight open uploads per account; the ninth waits.
    for i in 0..6u8 {
        assert_eq!(h.begin(None, &[i; 3]).await.0, StatusCode::OK);
    }
    assert_eq!(h.begin(None, &[9; 3]).await.0, StatusCode::TOO_MANY_REQUESTS);
}

/// A private package's ciphertext is never taken by digest: an upload of the same digest
/// needs the bytes, and naming the digest is refused.
#[tokio::test]
async fn a_private_packages_bytes_are_not_taken_by_digest() {
    let h = hub(HubPolicy::open());
    let owner = KeyPair::generate(KeyType::Ed25519);
    let sealed = b"ciphertext standing in for a sealed package".to_vec();
    let digest = Digest::of(&sealed);
    // Stored as a private package's blob (the hub serves it only to recipients).
    let tmp = h.store.blobs().temp_path();
    std::fs::write(&tmp, &sealed).unwrap();
    h.store.blobs().adopt_file(&tmp, &digest).unwrap();
    assert!(h.store.blobs().path_of(&digest).exists());
    let (s, up) = h.begin(Some(&owner), &sealed).await;
    assert_eq!((s, up["complete"].as_bool()), (StatusCode::OK, Some(false)), "{up}");
    let (s, b) =
        h.json(Some(&owner), "PUT", &format!("/api/v1/models/ops.leak/1.0.0?upload={digest}"), vec![], &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
}

/// Another account's finished upload cannot be named.
#[tokio::test]
async fn another_accounts_upload_cannot_be_named() {
    let h = hub(HubPolicy::signed());
    let (alice, mallory) = (KeyPair::generate(KeyType::Ed25519), KeyPair::generate(KeyType::Ed25519));
    let bytes = b"alice's model".to_vec();
    let (_, up) = h.begin(Some(&alice), &bytes).await;
    let id = up["id"].as_str().unwrap().to_owned();
    assert_eq!(h.piece(Some(&alice), &id, 0, &bytes).await.0, StatusCode::OK);
    let (s, b) =
        h.json(Some(&mallory), "PUT", &format!("/api/v1/models/mallory.m/1.0.0?upload={id}"), vec![], &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    // A refused naming (here: a version with other bytes) leaves the upload to name again.
    assert_eq!(
        h.call(Some(&alice), "PUT", "/api/v1/models/alice.m/1.0.0", b"other".to_vec(), &[]).await.0,
        StatusCode::CREATED
    );
    let (s, _) = h.json(Some(&alice), "PUT", &format!("/api/v1/models/alice.m/1.0.0?upload={id}"), vec![], &[]).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, rec) = h.json(Some(&alice), "PUT", &format!("/api/v1/models/alice.m/2.0.0?upload={id}"), vec![], &[]).await;
    assert_eq!((s, rec["digest"].as_str()), (StatusCode::CREATED, Some(Digest::of(&bytes).to_string().as_str())));
}

/// A connection that drops in the middle of a piece leaves the upload at the offset of its
/// whole pieces (over a real socket: the hub's handler is dropped, not given an error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_leaves_whole_pieces_only() {
    use tokio::io::AsyncWriteExt;
    let h = hub(HubPolicy::open());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = h.app.clone();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let bytes = vec![7u8; 100_000];
    let (_, up) = h.begin(None, &bytes).await;
    let id = up["id"].as_str().unwrap().to_owned();
    assert_eq!(h.piece(None, &id, 0, &bytes[..40_000]).await.0, StatusCode::OK);
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "PATCH /api/v1/uploads/{id} HTTP/1.1\r\nHost: x\r\nupload-offset: 40000\r\ncontent-length: 60000\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(&bytes[..30_000]).await.unwrap();
    sock.flush().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(sock);
    // The offset is that of the accepted pieces; the rest of the broken piece, if it reached
    // the file, is cut off before the next piece: the upload completes with the right bytes.
    let (_, state) = h.json(None, "GET", &format!("/api/v1/uploads/{id}"), vec![], &[]).await;
    assert_eq!(state["offset"], 40_000);
    // Until the hub has noticed the dropped connection, the broken piece still holds the
    // upload: the next piece is told 409 and tries again, as a client does.
    let mut tries = 0;
    let (s, done) = loop {
        let (s, done) = h.piece(None, &id, 40_000, &bytes[40_000..]).await;
        if s != StatusCode::CONFLICT || tries == 100 {
            break (s, done);
        }
        tries += 1;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!((s, done["complete"].as_bool()), (StatusCode::OK, Some(true)), "{done}");
    let (s, rec) = h.json(None, "PUT", &format!("/api/v1/models/ops.dropped/1.0.0?upload={id}"), vec![], &[]).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    assert_eq!(rec["digest"], Digest::of(&bytes).to_string());
    // An abandoned upload can be cancelled by its account only.
    let (_, other) = h.begin(None, b"abandoned").await;
    let other = other["id"].as_str().unwrap().to_owned();
    assert_eq!(
        h.call(None, "DELETE", &format!("/api/v1/uploads/{other}"), vec![], &[]).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(h.call(None, "GET", &format!("/api/v1/uploads/{other}"), vec![], &[]).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn tensor_metadata_is_read_from_the_header_alone() {
    let h = hub(HubPolicy::open());
    let model = model_bytes(1000);
    assert_eq!(h.call(None, "PUT", "/api/v1/models/ops.net/1.0.0", model.clone(), &[]).await.0, StatusCode::CREATED);
    let (s, t) = h.json(None, "GET", "/api/v1/models/ops.net/latest/tensors", vec![], &[]).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    assert_eq!(t["metadata"], json!({"format": "pt"}));
    assert_eq!(t["size"], model.len());
    let names: Vec<(&str, &str, Value)> = t["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["name"].as_str().unwrap(), x["dtype"].as_str().unwrap(), x["shape"].clone()))
        .collect();
    assert_eq!(
        names,
        // File order: safetensors writes the widest dtypes first.
        vec![
            ("bn.num_batches_tracked", "I64", json!([])),
            ("layer.weight", "F32", json!([1000])),
            ("head.bias", "F16", json!([3]))
        ]
    );
    // Files that are not safetensors, or lie in their header, get 400.
    let mut lying = model.clone();
    lying[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut short = 10u64.to_le_bytes().to_vec();
    short.extend_from_slice(b"{}");
    let mut overlap = Vec::new();
    let header = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
    overlap.extend_from_slice(&(header.len() as u64).to_le_bytes());
    overlap.extend_from_slice(header);
    overlap.extend_from_slice(&[0; 8]);
    for (i, bad) in [b"not a model".to_vec(), vec![1, 2, 3], lying, short, overlap].into_iter().enumerate() {
        let path = format!("/api/v1/models/ops.bad{i}/1.0.0");
        assert_eq!(h.call(None, "PUT", &path, bad, &[]).await.0, StatusCode::CREATED);
        let (s, b) = h.json(None, "GET", &format!("{path}/tensors"), vec![], &[]).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "case {i}: {b}");
    }
    assert_eq!(
        h.json(None, "GET", "/api/v1/models/ops.none/1.0.0/tensors", vec![], &[]).await.0,
        StatusCode::NOT_FOUND
    );
}

/// A hub whose blobs are shared with a store of files in a directory of its own (every
/// read verified), as hub processes share the NATS Object Store.
fn shared_hub() -> (Hub, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let blobs = std::sync::Arc::new(tessera_ports::FsBlobStore::open(&shared).unwrap());
    let store = tessera_hub::testing::open_store(dir.path().join("hub")).with_shared_blobs(blobs, rt).unwrap();
    let store = std::sync::Arc::new(store);
    (Hub { app: app(AppState::new(store.clone(), HubPolicy::open())), _dir: dir, store }, shared)
}

impl Hub {
    /// This process's copy of blob `d`.
    fn copy_of(&self, d: &Digest) -> std::path::PathBuf {
        self.store.blobs().dir().join(&d.hex()[..2]).join(d.hex())
    }
}

/// A blob this hub process has not cached is answered from the shared store as it is read,
/// with the same answers its file would get (ranges, suffixes, `If-Range`, the whole for
/// several ranges, 416 for what cannot be served, `HEAD`); a `HEAD` and a tensor listing
/// read nothing into the directory, a range keeps the copy it read; bytes in the shared
/// store that are not the blob's cut the answer short and leave no copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_from_the_shared_store_answer_as_the_file_does() {
    let (h, shared) = shared_hub();
    let model = model_bytes(700_000);
    let (s, rec) = h.json(None, "PUT", "/api/v1/models/far.model/1.0.0", model.clone(), &[]).await;
    assert_eq!(s, StatusCode::CREATED, "{rec}");
    let digest = Digest::of(&model);
    let copy = h.copy_of(&digest);
    let uri = "/api/v1/models/far.model/1.0.0";
    let etag = format!("\"{}\"", digest.hex());
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("GET", vec![]),
        ("GET", vec![("range", "bytes=100-199".into())]),
        ("GET", vec![("range", "bytes=1048570-".into())]),
        ("GET", vec![("range", "bytes=-10".into())]),
        ("GET", vec![("range", format!("bytes=0-{}", model.len() + 5))]),
        ("GET", vec![("range", "bytes=99999999-".into())]),
        ("GET", vec![("range", "bytes=0-1,5-6".into())]),
        ("GET", vec![("range", "bytes=abc".into())]),
        ("GET", vec![("range", "bytes=5-9".into()), ("if-range", etag.clone())]),
        ("GET", vec![("range", "bytes=5-9".into()), ("if-range", "\"other\"".into())]),
        ("GET", vec![("range", "bytes=-99999999".into())]),
        ("GET", vec![("range", "items=0-5".into())]),
        ("HEAD", vec![]),
        ("HEAD", vec![("range", "bytes=0-9".into())]),
        // The digest as the hub writes it elsewhere is taken for the tag.
        ("GET", vec![("range", "bytes=5-9".into()), ("if-range", format!("\"{digest}\""))]),
    ];
    let same = ["content-length", "content-range", "accept-ranges", "etag", "x-tessera-digest", "content-type"];
    // The answers of this process's file.
    assert!(copy.exists(), "the process that took the upload keeps a copy");
    let mut from_file = Vec::new();
    for (method, headers) in &cases {
        from_file.push(h.call(None, method, uri, vec![], headers).await);
    }
    let statuses: Vec<u16> = from_file.iter().map(|(s, _, _)| s.as_u16()).collect();
    assert_eq!(statuses, [200, 206, 206, 206, 206, 416, 200, 416, 206, 200, 206, 200, 200, 200, 206]);
    assert_eq!(from_file[6].1.len(), model.len(), "several ranges get the whole");
    assert_eq!(from_file[11].1.len(), model.len(), "another unit than bytes is ignored");
    assert_eq!(from_file[13].2["content-length"], model.len().to_string().as_str(), "a HEAD describes the whole");
    for (i, (method, headers)) in cases.iter().enumerate() {
        std::fs::remove_file(&copy).unwrap();
        let (s, body, got) = h.call(None, method, uri, vec![], headers).await;
        let (fs, fbody, fheaders) = &from_file[i];
        assert_eq!(s, *fs, "case {i}: {method} {headers:?}");
        if s.is_success() {
            assert!(body == *fbody, "case {i}: the bytes ({} and {})", body.len(), fbody.len());
            for name in same {
                assert_eq!(got.get(name), fheaders.get(name), "case {i}: {name}");
            }
        } else {
            assert_eq!(got.get("content-range"), fheaders.get("content-range"), "case {i}");
        }
        // What read the blob keeps the copy it read (its last byte goes once verified).
        let read = s == StatusCode::OK && *method == "GET" || s == StatusCode::PARTIAL_CONTENT;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while read && !copy.exists() {
            assert!(std::time::Instant::now() < deadline, "case {i}: the copy is kept");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if !read {
            assert!(!copy.exists(), "case {i}: nothing was read into the directory");
            std::fs::write(&copy, &model).unwrap();
        }
    }
    // The tensors, from the front of the shared object alone.
    std::fs::remove_file(&copy).unwrap();
    let (s, t) = h.json(None, "GET", "/api/v1/models/far.model/1.0.0/tensors", vec![], &[]).await;
    assert_eq!((s, &t["size"]), (StatusCode::OK, &json!(model.len())), "{t}");
    assert_eq!(t["tensors"].as_array().unwrap().len(), 3);
    assert!(!copy.exists(), "a tensor listing fetches nothing");
    // Forged bytes in the shared store: a range of them is cut short, and not kept.
    let forged: Vec<u8> = model.iter().map(|b| b ^ 0x55).collect();
    std::fs::write(shared.join(&digest.hex()[..2]).join(digest.hex()), &forged).unwrap();
    let req = Request::builder().uri(uri).header("range", "bytes=10-20").body(Body::empty()).unwrap();
    let resp = h.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    let (mut body, mut given, mut failed) = (resp.into_body(), 0, false);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => given += f.data_ref().map_or(0, |d| d.len()),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed && given < 11, "a part of bytes that are not the blob's is cut short ({given} bytes given)");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!copy.exists(), "forged bytes are not kept");
}

/// A signed reader's downloads are metered at the bytes each answer carries (models, blobs
/// by digest, packages): a part at its length, a `HEAD` or a refused range at nothing.
#[tokio::test]
async fn signed_downloads_are_metered_at_what_they_carry() {
    let h = hub(HubPolicy::open());
    let k = KeyPair::generate(KeyType::Ed25519);
    let model = model_bytes(10_000);
    assert_eq!(h.call(Some(&k), "PUT", "/api/v1/models/me.net/1.0.0", model.clone(), &[]).await.0, StatusCode::CREATED);
    let out = || h.store.usage(k.public()).unwrap().bytes_out;
    let uri = "/api/v1/models/me.net/1.0.0";
    let blob = format!("/api/v1/blobs/{}", Digest::of(&model));
    let module = h._dir.path().join("module");
    std::fs::create_dir_all(&module).unwrap();
    std::fs::write(
        module.join("module.yaml"),
        "name: me.echo\nversion: 0.1.0\nkind: task\nruntime: builtin\nentry: echo\n",
    )
    .unwrap();
    let package = tessera_package::pack_dir(&module, &tessera_package::Limits::default()).unwrap().bytes;
    let (s, published) = h.json(Some(&k), "POST", "/api/v1/packages", package.clone(), &[]).await;
    assert_eq!(s, StatusCode::CREATED, "{published}");
    let pkg = "/api/v1/packages/me.echo/0.1.0/download";
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, String)>, u64);
    let cases: [Case; 8] = [
        ("GET", uri, vec![], model.len() as u64),
        ("GET", uri, vec![("range", "bytes=10-109".into())], 100),
        ("HEAD", uri, vec![], 0),
        ("GET", uri, vec![("range", "bytes=99999999-".into())], 0),
        ("GET", &blob, vec![("range", "bytes=-7".into())], 7),
        ("GET", &blob, vec![], model.len() as u64),
        ("GET", pkg, vec![("range", "bytes=0-9".into())], 10),
        ("GET", pkg, vec![], package.len() as u64),
    ];
    for (i, (method, path, headers, carried)) in cases.into_iter().enumerate() {
        let before = out();
        let (s, body, _) = h.call(Some(&k), method, path, vec![], &headers).await;
        assert!(s.is_success() || s == StatusCode::RANGE_NOT_SATISFIABLE, "case {i}: {s}");
        assert_eq!(out() - before, carried, "case {i}: {method} {path} {headers:?} ({} bytes)", body.len());
    }
}
