//! Dump and restore: the same listings, cards, lineage and digests on the other side, and a
//! tampered dump changes nothing.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tessera_core::Digest;
use tessera_hub::testing::{DumpEdit as Edit, PgServer, first_row, rewrite_dump as rewrite, test_database};
use tessera_hub::{AppState, Database, HubError, HubPolicy, HubStore, app};
use tessera_identity::envelope::HEADER;
use tessera_identity::{Envelope, KeyPair, KeyType, PACKAGE_SIGNATURE_HEADER, PackageSignature, now_ms};
use tessera_package::{Limits, pack_dir};
use tower::ServiceExt;

async fn call(
    store: &Arc<HubStore>,
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
        let env = Envelope::sign(k, store.key().public(), method, uri, &body, now_ms());
        req = req.header(HEADER, env.to_header());
    }
    let router = app(AppState::new(store.clone(), HubPolicy::open()));
    let resp = router.oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(Digest::of(&bytes).to_string())))
}

/// What a user sees of a hub: listings, cards, lineage, components, owners, and the bytes
/// (by digest) of every download.
async fn view(store: &Arc<HubStore>) -> Value {
    let mut out = serde_json::Map::new();
    for path in [
        "/api/v1/packages?all=true",
        "/api/v1/packages/team.pkg/1.0.0/card",
        "/api/v1/packages/team.pkg/1.0.0/download",
        "/api/v1/models",
        "/api/v1/models/team.model/1.0.0/lineage",
        "/api/v1/models/team.model/1.0.0/card",
        "/api/v1/models/team.model/1.0.0",
        "/api/v1/namespaces/team",
        "/service",
        "/service/team.svc",
        "/api/v1/health",
    ] {
        out.insert(path.into(), call(store, None, "GET", path, vec![], &[]).await.1);
    }
    // The view's own downloads count: compared apart.
    let mut v = Value::Object(out);
    drop_downloads(&mut v);
    v
}

fn drop_downloads(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("downloads");
            m.values_mut().for_each(drop_downloads);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_downloads),
        _ => {}
    }
}

fn package(dir: &Path) -> Vec<u8> {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("module.yaml"),
        "name: team.pkg\nversion: 1.0.0\nkind: task\nruntime: builtin\nentry: echo\n",
    )
    .unwrap();
    std::fs::write(dir.join("README.md"), "---\nlicense: mit\ntags: [demo]\n---\nA demo package.\n").unwrap();
    pack_dir(dir, &Limits::default()).unwrap().bytes
}

async fn populated(dir: &Path, database: &Database) -> (Arc<HubStore>, KeyPair) {
    let store = Arc::new(HubStore::open_database(dir, database, Limits::default()).unwrap());
    let k = KeyPair::generate(KeyType::Ed25519);
    let bytes = package(&dir.with_extension("src"));
    let sig = PackageSignature::sign(&k, &Digest::of(&bytes));
    let (s, b) =
        call(&store, Some(&k), "POST", "/api/v1/packages", bytes, &[(PACKAGE_SIGNATURE_HEADER, sig.to_header())]).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let lineage = json!({"session": "s-1", "strategy": "fedavg", "modules": [], "nodes": ["n0"], "rounds": 2, "metrics": [], "datasets": ["digits"]});
    let meta = json!({"metadata": {"library": "numpy"}, "lineage": lineage, "card": "---\nlicense: apache-2.0\n---\nThe model.\n"});
    let b = "dump-boundary";
    let mut body = format!("--{b}\r\nContent-Disposition: form-data; name=\"meta\"\r\n\r\n{meta}\r\n--{b}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n").into_bytes();
    body.extend_from_slice(b"model weights");
    body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    let ctype = format!("multipart/form-data; boundary={b}");
    let (s, m) =
        call(&store, Some(&k), "PUT", "/api/v1/models/team.model/1.0.0", body, &[("content-type", ctype)]).await;
    assert_eq!(s, StatusCode::CREATED, "{m}");
    let doc = serde_json::to_vec(&json!({"id": "team.svc", "description": "a service"})).unwrap();
    assert_eq!(call(&store, Some(&k), "POST", "/service", doc, &[]).await.0, StatusCode::CREATED);
    for object in [&b"first revision"[..], b"second revision"] {
        assert_eq!(
            call(&store, Some(&k), "PUT", "/service/team.svc", object.to_vec(), &[]).await.0,
            StatusCode::NO_CONTENT
        );
    }
    (store, k)
}

#[tokio::test]
async fn a_restored_hub_shows_the_same_and_keeps_its_key() {
    round_trip(&test_database(), &test_database()).await;
}

/// A hub moves from SQLite to PostgreSQL and from PostgreSQL to SQLite.
#[tokio::test]
async fn a_hub_moves_between_sqlite_and_postgres() {
    round_trip(&Database::Sqlite, &PgServer::shared().database()).await;
    round_trip(&PgServer::shared().database(), &Database::Sqlite).await;
}

/// Dumps a hub on `from`, restores it on `to`, and compares what both serve.
async fn round_trip(from: &Database, to: &Database) {
    let tmp = tempfile::tempdir().unwrap();
    let (store, owner) = populated(&tmp.path().join("a"), from).await;
    let before = view(&store).await;
    let file = tmp.path().join("hub.dump");
    let dumped = store.dump(&file).unwrap();
    assert_eq!(dumped.blobs, 4, "package, model, two revisions: {dumped:?}");
    assert_eq!(dumped.rows["components"], 1);
    #[cfg(unix)]
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions()) & 0o777,
        0o600
    );
    // A dump never overwrites a file.
    assert!(store.dump(&file).is_err());
    assert!(file.exists(), "the existing dump is kept");

    let (restored, summary) = HubStore::restore_to(&tmp.path().join("b"), to, &file).unwrap();
    assert_eq!(summary.blobs, dumped.blobs);
    let restored = Arc::new(restored);
    assert_eq!(restored.key().public(), store.key().public(), "the hub keeps its key");
    let counted = (
        store.model("team.model", "1.0.0").unwrap().downloads,
        store.resolve_str("team.pkg", "1.0.0").unwrap().downloads,
    );
    assert_eq!(counted, (1, 1));
    assert_eq!(
        (
            restored.model("team.model", "1.0.0").unwrap().downloads,
            restored.resolve_str("team.pkg", "1.0.0").unwrap().downloads
        ),
        counted,
        "download counters move with the hub"
    );
    let after = view(&restored).await;
    assert_eq!(after, before);
    // The namespace still belongs to its owner: another key may not write there.
    let stranger = KeyPair::generate(KeyType::Ed25519);
    let doc = serde_json::to_vec(&json!({"id": "team.other"})).unwrap();
    assert_eq!(call(&restored, Some(&stranger), "POST", "/service", doc.clone(), &[]).await.0, StatusCode::FORBIDDEN);
    assert_eq!(call(&restored, Some(&owner), "POST", "/service", doc, &[]).await.0, StatusCode::CREATED);
    // Restoring over a hub is refused.
    let e = HubStore::restore_to(&tmp.path().join("b"), &test_database(), &file).err().unwrap();
    assert!(matches!(e, HubError::Conflict(_)), "{e}");
    if let Database::Postgres(_) = to {
        // So is restoring into a database that holds a hub's records, whatever the directory.
        let e = HubStore::restore_to(&tmp.path().join("c"), to, &file).err().unwrap();
        assert!(matches!(e, HubError::Conflict(_)), "{e}");
        // Another hub's dump (another key) is refused as plainly.
        let (other, _) = populated(&tmp.path().join("x"), &Database::Sqlite).await;
        let other_file = tmp.path().join("other.dump");
        other.dump(&other_file).unwrap();
        let e = HubStore::restore_to(&tmp.path().join("d"), to, &other_file).err().unwrap();
        assert!(matches!(&e, HubError::Conflict(m) if m.contains("holds another hub's key")), "{e}");
    }
}

/// An entry restores as the routes took it: a Component Repository model's `needs` is not
/// read (the other collections' are), so whatever it holds there comes back.
#[tokio::test]
async fn entries_restore_as_their_routes_took_them() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(HubStore::open_database(tmp.path().join("a"), &test_database(), Limits::default()).unwrap());
    let k = KeyPair::generate(KeyType::Ed25519);
    let doc = serde_json::to_vec(&json!({"model_name": "team.m", "model_version": "1", "needs": "a GPU"})).unwrap();
    let (s, b) = call(&store, Some(&k), "POST", "/model", doc, &[]).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let file = tmp.path().join("hub.dump");
    store.dump(&file).unwrap();
    let (restored, _) = HubStore::restore_to(&tmp.path().join("b"), &test_database(), &file).unwrap();
    let restored = Arc::new(restored);
    let (s, m) = call(&restored, None, "GET", "/model/meta?model_name=team.m&model_version=1", vec![], &[]).await;
    assert_eq!(s, StatusCode::OK, "{m}");
    assert_eq!(m["needs"], "a GPU", "{m}");
}

/// A model version longer than new ones may be (stored before versions were bounded)
/// restores, and is read and deleted as any other.
#[tokio::test]
async fn a_version_stored_before_the_bound_restores_and_is_reachable() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, owner) = populated(&tmp.path().join("a"), &test_database()).await;
    let file = tmp.path().join("hub.dump");
    store.dump(&file).unwrap();
    let long = format!("1.0.0-{}", "a".repeat(200));
    let edited = tmp.path().join("long.dump");
    let v = long.clone();
    rewrite(
        &file,
        &edited,
        first_row("models", move |r| {
            r["version"] = json!(v);
            r["vkey"] = json!(v);
        }),
    );
    let (restored, _) = HubStore::restore_to(&tmp.path().join("b"), &test_database(), &edited).unwrap();
    assert_eq!(restored.model("team.model", &long).unwrap().version, long);
    restored.delete_model("team.model", &long, Some(owner.public())).unwrap();
    assert!(matches!(restored.model("team.model", &long), Err(HubError::NotFound(_))));
}

#[tokio::test]
async fn a_tampered_dump_restores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = populated(&tmp.path().join("a"), &test_database()).await;
    let file = tmp.path().join("hub.dump");
    store.dump(&file).unwrap();
    // (what, the edit, whether the result restores)
    let cases: Vec<(&str, Edit, bool)> = vec![
        ("unchanged", Box::new(|_, b| Some(b)), true),
        ("without the grants table", Box::new(|p, b| (p != "tables/grants.jsonl").then_some(b)), false),
        ("without the components table", Box::new(|p, b| (p != "tables/components.jsonl").then_some(b)), false),
        (
            "a row taken out",
            Box::new(|p, b| {
                Some(if p == "tables/component_revisions.jsonl" {
                    b.split(|c| *c == b'\n').skip(1).flat_map(|l| l.iter().chain(b"\n")).copied().collect()
                } else {
                    b
                })
            }),
            false,
        ),
        (
            "the manifest's counts changed",
            Box::new(|p, b| {
                Some(if p == "tessera-hub-dump.json" {
                    let mut m: Value = serde_json::from_slice(&b).unwrap();
                    m["summary"]["rows"]["models"] = json!(99);
                    serde_json::to_vec(&m).unwrap()
                } else {
                    b
                })
            }),
            false,
        ),
        ("a size that is text", first_row("models", |r| r["size"] = json!("ten")), false),
        ("a size that is a fraction", first_row("models", |r| r["size"] = json!(1.5)), false),
        ("a version that is not semver", first_row("models", |r| r["version"] = json!("garbage")), false),
        ("a name with ..", first_row("packages", |r| r["name"] = json!("team..x")), false),
        ("metadata that is not an object", first_row("models", |r| r["metadata"] = json!("[1]")), false),
        ("a document that is an array", first_row("components", |r| r["document"] = json!("[1, 2]")), false),
        ("owners that are not keys", first_row("namespaces", |r| r["owners"] = json!("nonsense")), false),
        ("an owner that is not a key", first_row("namespaces", |r| r["owners"] = json!(r#"["ed25519:zz"]"#)), false),
        ("a digest that is not one", first_row("component_revisions", |r| r["digest"] = json!("b3:zz")), false),
        ("a card that is not one", first_row("models", |r| r["card"] = json!("x")), false),
        ("a manifest that is not one", first_row("packages", |r| r["manifest"] = json!("{}")), false),
        ("an entry's key its collection does not take", first_row("components", |r| r["key"] = json!("a/b/c")), false),
        ("a revision without its entry", first_row("component_revisions", |r| r["key"] = json!("team.gone")), false),
        (
            "a blob's bytes changed",
            Box::new(|p, mut b| {
                if p.starts_with("blobs/") {
                    b[0] ^= 1;
                }
                Some(b)
            }),
            false,
        ),
        ("a blob left out", Box::new(|p, b| (!p.starts_with("blobs/")).then_some(b)), false),
        (
            "a row with a column this hub does not have",
            Box::new(|p, b| {
                Some(if p == "tables/models.jsonl" {
                    let mut row: Value = serde_json::from_slice(b.split(|c| *c == b'\n').next().unwrap()).unwrap();
                    row["evil"] = json!(1);
                    let mut line = serde_json::to_vec(&row).unwrap();
                    line.push(b'\n');
                    line
                } else {
                    b
                })
            }),
            false,
        ),
        (
            "a row that is not JSON",
            Box::new(|p, b| Some(if p == "tables/grants.jsonl" { b"{not json\n".to_vec() } else { b })),
            false,
        ),
        (
            "another format",
            Box::new(|p, b| Some(if p == "tessera-hub-dump.json" { br#"{"format": 99}"#.to_vec() } else { b })),
            false,
        ),
        ("no key", Box::new(|p, b| (p != "identity/hub.json").then_some(b)), false),
        ("no manifest", Box::new(|p, b| (p != "tessera-hub-dump.json").then_some(b)), false),
    ];
    for (i, (what, f, restores)) in cases.into_iter().enumerate() {
        let bad = tmp.path().join(format!("case-{i}.dump"));
        rewrite(&file, &bad, f);
        let target = tmp.path().join(format!("target-{i}"));
        let result = HubStore::restore_to(&target, &test_database(), &bad);
        if restores {
            result.unwrap_or_else(|e| panic!("{what}: {e}"));
            continue;
        }
        let e = result.err().unwrap_or_else(|| panic!("{what}: restored"));
        assert!(matches!(e, HubError::BadRequest(_)), "{what}: {e}");
        assert!(!target.exists(), "{what}: the target was written");
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tessera-restore"))
            .collect();
        assert!(leftovers.is_empty(), "{what}: staging left behind");
    }
    // A table twice (the second, empty, would replace the first).
    let twice = tmp.path().join("twice.dump");
    rewrite(&file, &twice, |_, b| Some(b));
    let mut appended = tar::Builder::new(std::fs::OpenOptions::new().read(true).write(true).open(&twice).unwrap());
    let len = std::fs::metadata(&twice).unwrap().len();
    // Over the archive's two zero blocks of its end (and its padding to 10 KiB records).
    let mut end = len;
    let raw = std::fs::read(&twice).unwrap();
    while end >= 512 && raw[(end - 512) as usize..end as usize].iter().all(|b| *b == 0) {
        end -= 512;
    }
    std::io::Seek::seek(appended.get_mut(), std::io::SeekFrom::Start(end)).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    h.set_mode(0o644);
    h.set_cksum();
    appended.append_data(&mut h, "tables/models.jsonl", &[][..]).unwrap();
    appended.finish().unwrap();
    drop(appended);
    let e = HubStore::restore_to(&tmp.path().join("t-twice"), &test_database(), &twice).err().expect("restored");
    assert!(e.to_string().contains("twice"), "{e}");
    // Cut short inside a blob's bytes (after the tables, before the manifest).
    let (at, size) = {
        let mut archive = tar::Archive::new(std::fs::File::open(&file).unwrap());
        let entries = archive.entries().unwrap();
        let blob = entries
            .map(Result::unwrap)
            .find(|e| e.path().unwrap().starts_with("blobs/") && e.size() > 8)
            .expect("a blob of more than 8 bytes");
        (blob.raw_file_position(), blob.size())
    };
    let bytes = std::fs::read(&file).unwrap();
    let short = tmp.path().join("short.dump");
    std::fs::write(&short, &bytes[..usize::try_from(at + size / 2).unwrap()]).unwrap();
    let e = HubStore::restore_to(&tmp.path().join("t-short"), &test_database(), &short).err().expect("restored");
    assert!(matches!(&e, HubError::BadRequest(m) if m.contains("it was cut")), "{e}");
    assert!(!tmp.path().join("t-short").exists());
    // Into a file, or below one: refused, naming the path.
    let afile = tmp.path().join("afile");
    std::fs::write(&afile, b"x").unwrap();
    for target in [afile.clone(), afile.join("sub")] {
        let e = HubStore::restore_to(&target, &test_database(), &file).err().expect("restored");
        assert!(e.to_string().contains("afile"), "{e}");
    }
    assert_eq!(std::fs::read(&afile).unwrap(), b"x");
    // Not a dump at all.
    std::fs::write(tmp.path().join("garbage"), b"not a tar").unwrap();
    assert!(HubStore::restore(&tmp.path().join("g"), &tmp.path().join("garbage")).is_err());
    assert!(!tmp.path().join("g").exists());
}

/// A restore into a hub with shared blobs notes every blob before putting it (a restore
/// that dies midway leaves notes for the sweep) and removes the notes once it committed.
#[tokio::test]
async fn a_restore_notes_its_shared_blobs_until_it_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = populated(&tmp.path().join("a"), &Database::Sqlite).await;
    let file = tmp.path().join("hub.dump");
    let dumped = store.dump(&file).unwrap();
    let parent = tmp.path().join("restores");
    std::fs::create_dir_all(&parent).unwrap();
    // The restore's staging database, as the puts see it.
    let notes_in = |db: &Path| -> i64 {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.query_row("SELECT COUNT(*) FROM pending_blobs", [], |r| r.get(0)).unwrap()
    };
    let seen = std::sync::Mutex::new(Vec::new());
    let put = |_: &Path, d: &Digest| -> Result<(), HubError> {
        let staging = std::fs::read_dir(&parent)
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(".tessera-restore-"))
            .expect("the staging directory")
            .path();
        seen.lock().unwrap().push((*d, notes_in(&staging.join("hub.sqlite"))));
        Ok(())
    };
    let dir = parent.join("hub");
    let share = tessera_hub::SharedRestore { buckets: HubStore::fresh_blob_buckets().unwrap(), put: &put };
    let (restored, _) = HubStore::restore_with(&dir, &Database::Sqlite, &file, Some(&share)).unwrap();
    // The restored database records the buckets its blobs went to.
    assert_eq!(restored.shared_blob_buckets().unwrap(), share.buckets);
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len() as u64, dumped.blobs);
    let all = i64::try_from(dumped.blobs).unwrap();
    assert!(seen.iter().all(|(_, n)| *n == all), "every blob noted before the puts: {seen:?}");
    assert_eq!(notes_in(&dir.join("hub.sqlite")), 0, "the notes go once the records are in");
}

/// A restore into PostgreSQL with shared blobs that is refused (here its last put fails)
/// may be run again: the next one puts its blobs in the buckets the first recorded.
#[tokio::test]
async fn a_refused_restore_with_shared_blobs_can_be_run_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = populated(&tmp.path().join("a"), &Database::Sqlite).await;
    let file = tmp.path().join("hub.dump");
    let dumped = store.dump(&file).unwrap();
    let database = PgServer::shared().database();
    let first = HubStore::restore_blob_buckets(&database).unwrap();
    let puts = std::sync::atomic::AtomicU64::new(0);
    let failing = |_: &Path, _: &Digest| -> Result<(), HubError> {
        if puts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == dumped.blobs {
            return Err(HubError::Storage("the shared store went away".into()));
        }
        Ok(())
    };
    let share = tessera_hub::SharedRestore { buckets: first.clone(), put: &failing };
    let dir = tmp.path().join("b");
    let e = HubStore::restore_with(&dir, &database, &file, Some(&share)).err().unwrap();
    assert!(e.to_string().contains("went away"), "{e}");
    assert!(!dir.exists(), "nothing restored");
    let again = HubStore::restore_blob_buckets(&database).unwrap();
    assert_eq!(again, first, "the recorded buckets are used again");
    let put = |_: &Path, _: &Digest| -> Result<(), HubError> { Ok(()) };
    let share = tessera_hub::SharedRestore { buckets: again, put: &put };
    let (restored, summary) = HubStore::restore_with(&dir, &database, &file, Some(&share)).unwrap();
    assert_eq!(summary.blobs, dumped.blobs);
    assert_eq!(restored.shared_blob_buckets().unwrap(), first);
    // New buckets for a database that records none.
    assert_ne!(HubStore::restore_blob_buckets(&PgServer::shared().database()).unwrap(), first);
}

/// A blob whose bytes on disk no longer match its name stops the dump, which leaves no
/// file behind; its bytes are read as they are written into the dump, whatever their size.
#[tokio::test]
async fn a_blob_corrupt_on_disk_stops_the_dump() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = populated(&tmp.path().join("a"), &Database::Sqlite).await;
    let model = store.model("team.model", "1.0.0").unwrap().digest.unwrap();
    let path = tmp.path().join("a/blobs").join(&model.hex()[..2]).join(model.hex());
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&path, perms).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let file = tmp.path().join("hub.dump");
    let e = store.dump(&file).err().unwrap();
    assert!(matches!(&e, HubError::Storage(m) if m.contains("corrupt on disk")), "{e}");
    assert!(!file.exists(), "the partial dump is removed");
}
