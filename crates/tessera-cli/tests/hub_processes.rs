//! Two `tessera hub serve` processes over one data directory (one blob directory) and one
//! database (SQLite in that directory, or PostgreSQL): they start together, take concurrent
//! uploads of the same packages, and share the signature replay cache.

#[path = "support/hub.rs"]
mod hub_process;
use hub_process::hub_url;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use futures::StreamExt;
use tessera_client::{HubClient, ListParams};
use tessera_core::{Digest, PackageRef};
use tessera_hub::Database;
use tessera_hub::testing::{PgServer, first_row, rewrite_dump};
use tessera_identity::{Envelope, KeyPair, KeyType, now_ms};
use tessera_nats::testing::NatsServer;
use tessera_package::{Limits, pack_dir};

struct Hub {
    child: Child,
    url: String,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a hub process.
fn spawn_hub(data: &Path, database: &Database, blobs: Option<&str>) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    c.env_remove("RUST_LOG").env_remove("TESSERA_HUB_DATABASE").env_remove("TESSERA_HUB_BLOBS");
    c.args(["hub", "serve", "--open", "--max-uploads", "16", "--listen", "127.0.0.1:0", "--data"]).arg(data);
    if let Database::Postgres(url) = database {
        c.args(["--database", url]);
    }
    if let Some(url) = blobs {
        c.args(["--blobs", url]);
    }
    c.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap()
}

fn listening(mut child: Child) -> Hub {
    let url = hub_url(&mut child);
    Hub { child, url }
}

fn package(dir: &Path, i: usize) -> Vec<u8> {
    let m = dir.join(format!("p{i}"));
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("module.yaml"),
        format!("name: shared.p{i}\nversion: 0.1.{}\nkind: task\nruntime: builtin\nentry: echo\n", i % 3),
    )
    .unwrap();
    // Sizes from a few bytes to a few hundred KiB, so some blobs are written in one go and
    // some take a while.
    let filler: String = (0..(i * 2_731) % 300_000).map(|j| char::from(b'a' + ((i + j) % 26) as u8)).collect();
    std::fs::write(m.join("notes.txt"), filler).unwrap();
    if i.is_multiple_of(4) {
        std::fs::write(m.join("README.md"), format!("---\nlicense: mit\ntags: [p{i}]\n---\nPackage {i}.\n")).unwrap();
    }
    pack_dir(&m, &Limits::default()).unwrap().bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hub_processes_over_sqlite() {
    two_hub_processes_share_one_store_and_one_replay_cache(Database::Sqlite, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hub_processes_over_postgres() {
    two_hub_processes_share_one_store_and_one_replay_cache(PgServer::shared().database(), None).await;
}

/// As on two machines: each process has its own data directory (a cache), the records are
/// in PostgreSQL and the blobs in the NATS Object Store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hub_processes_over_postgres_and_nats() {
    let nats = NatsServer::start();
    two_hub_processes_share_one_store_and_one_replay_cache(PgServer::shared().database(), Some(&nats.url())).await;
}

async fn two_hub_processes_share_one_store_and_one_replay_cache(database: Database, blobs: Option<&str>) {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("hub");
    let data_b = if blobs.is_some() { work.path().join("hub-b") } else { data.clone() };
    // Started together over a store that holds nothing yet: one schema, one key.
    let (a, b) = (spawn_hub(&data, &database, blobs), spawn_hub(&data_b, &database, blobs));
    let (a, b) = (listening(a), listening(b));
    let key = Arc::new(KeyPair::generate(KeyType::Ed25519));
    let ca = HubClient::new(&a.url).unwrap().with_signer(key.clone());
    let cb = HubClient::new(&b.url).unwrap().with_signer(key.clone());
    let audience = ca.hub_key().await.unwrap();
    assert_eq!(cb.hub_key().await.unwrap(), audience, "both processes speak for one hub");

    // 100 packages, each published to both processes at once: the same blob adopted by two
    // writers, and 200 signed requests, 16 in flight.
    let packages: Vec<Vec<u8>> = (0..100).map(|i| package(work.path(), i)).collect();
    let jobs = packages.iter().flat_map(|p| [(ca.clone(), p.clone()), (cb.clone(), p.clone())]);
    let results: Vec<_> = futures::stream::iter(jobs)
        .map(|(c, bytes)| async move { c.publish(bytes).await })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut created = 0;
    for r in results {
        let (_, new) = r.unwrap();
        created += usize::from(new);
    }
    assert_eq!(created, 100, "each package is created once, by one process or the other");

    // Both processes list all of them, with the digests uploaded, and serve their bytes.
    let named: std::collections::BTreeSet<Digest> = packages.iter().map(|p| Digest::of(p)).collect();
    for c in [&ca, &cb] {
        let listed = c.list(&ListParams { limit: Some(500), ..Default::default() }).await.unwrap();
        assert_eq!(listed.iter().map(|r| r.digest).collect::<std::collections::BTreeSet<_>>(), named);
    }
    for (i, bytes) in packages.iter().enumerate().step_by(7) {
        let r: PackageRef = format!("shared.p{i}").parse().unwrap();
        let (rec, got) = cb.download(&r).await.unwrap();
        assert_eq!(rec.digest, Digest::of(bytes));
        assert_eq!(&got[..], &bytes[..]);
    }

    // A third of them deleted through one process while the same bytes are published
    // again through the other: whichever comes last wins, and the blob goes only if no row
    // uses it when it is collected.
    let racing = packages.iter().enumerate().filter(|(i, _)| i % 3 == 0);
    let outcomes: Vec<_> = futures::stream::iter(racing)
        .map(|(i, bytes)| {
            let (ca, cb) = (ca.clone(), cb.clone());
            async move {
                let (name, version) = (format!("shared.p{i}"), format!("0.1.{}", i % 3));
                let (del, publ) = tokio::join!(ca.delete(&name, &version), cb.publish(bytes.clone()));
                (del.unwrap(), publ.unwrap())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert_eq!(outcomes.len(), 34);
    let live: Vec<_> = ca.list(&ListParams { limit: Some(500), ..Default::default() }).await.unwrap();
    let live_digests: std::collections::BTreeSet<Digest> = live.iter().map(|r| r.digest).collect();
    assert!(live.len() >= 66, "{} live", live.len());

    // No blob is corrupt, missing or orphaned, and no temporary file is left.
    let mut on_disk = std::collections::BTreeSet::new();
    for dir in [&data, &data_b] {
        for shard in std::fs::read_dir(dir.join("blobs")).unwrap().flatten() {
            let name = shard.file_name().to_string_lossy().into_owned();
            assert!(shard.path().is_dir(), "a file in the blob directory: {name}");
            for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
                let bytes = std::fs::read(f.path()).unwrap();
                let digest = Digest::of(&bytes);
                assert_eq!(digest.hex(), f.file_name().to_string_lossy(), "a corrupt blob");
                on_disk.insert(digest);
            }
        }
    }
    match blobs {
        None => assert_eq!(
            on_disk, live_digests,
            "every blob on disk is a live package's, and every live package's is on disk"
        ),
        Some(url) => {
            // The shared store holds exactly the live blobs; the directories are caches.
            let nats = tessera_nats::connect(url).await.unwrap();
            // The buckets the hub's database records, which both processes opened.
            let (bucket, small) = {
                let (d, db) = (data.clone(), database.clone());
                tokio::task::spawn_blocking(move || {
                    tessera_hub::HubStore::open_database(&d, &db, Limits::default())
                        .unwrap()
                        .shared_blob_buckets()
                        .unwrap()
                })
                .await
                .unwrap()
            };
            assert!(bucket.starts_with("tessera_hub_") && bucket != "tessera_hub_blobs", "{bucket}");
            let shared = tessera_nats::NatsBlobs::open_buckets(&nats, &bucket, &small).await.unwrap();
            let stored: std::collections::BTreeSet<Digest> = shared.digests().await.unwrap().into_iter().collect();
            assert_eq!(stored, live_digests, "the shared store holds every live blob and nothing else");
            // Published through one process only, served by the other from the shared store.
            for i in 100..110 {
                let bytes = package(work.path(), i);
                let (rec, created) = ca.publish(bytes.clone()).await.unwrap();
                assert!(created);
                assert!(!data_b.join("blobs").join(&rec.digest.hex()[..2]).join(rec.digest.hex()).exists());
                let (_, got) = cb.download(&format!("shared.p{i}").parse().unwrap()).await.unwrap();
                assert_eq!(&got[..], &bytes[..]);
            }
            // Deleted through one process while the other holds a copy: gone from the shared
            // store, and not served by the process that still has its copy.
            let bytes = package(work.path(), 200);
            let (rec, _) = ca.publish(bytes.clone()).await.unwrap();
            let r: PackageRef = "shared.p200".parse().unwrap();
            cb.download(&r).await.unwrap();
            ca.delete("shared.p200", &rec.version).await.unwrap();
            assert!(!shared.digests().await.unwrap().contains(&rec.digest));
            assert!(cb.download(&r).await.unwrap_err().is_not_found());
            // Published again through the process holding the copy: the shared store gets the
            // bytes back, and the other process serves them from there.
            let (again, created) = cb.publish(bytes.clone()).await.unwrap();
            assert!(created);
            assert_eq!(again.digest, rec.digest);
            assert!(shared.digests().await.unwrap().contains(&rec.digest));
            let (_, got) = ca.download(&r).await.unwrap();
            assert_eq!(&got[..], &bytes[..]);
            let http = reqwest::Client::new();
            // A model in the Object Store, pushed through one process: the other serves it
            // while it fetches it (its whole bytes, their digest), and keeps the copy; a
            // range of it is then served from that copy.
            let weights: Vec<u8> = (0..(3u32 << 20) + 11).map(|i| (i % 251) as u8 ^ (i >> 20) as u8).collect();
            let (m, _) = ca.push_model("shared.weights", "1.0.0", weights.clone()).await.unwrap();
            let digest = m.digest.unwrap();
            let cached = data_b.join("blobs").join(&digest.hex()[..2]).join(digest.hex());
            assert!(!cached.exists());
            let (_, got) = cb.pull_model("shared.weights", "1.0.0").await.unwrap();
            assert!(got[..] == weights[..], "the streamed download is the model");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !cached.exists() {
                assert!(std::time::Instant::now() < deadline, "the streamed copy is kept");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            assert!(std::fs::read(&cached).unwrap() == weights);
            let part = http
                .get(format!("{}/api/v1/models/shared.weights/1.0.0", b.url))
                .header("range", "bytes=1048570-1048589")
                .send()
                .await
                .unwrap();
            assert_eq!(part.status(), 206);
            assert_eq!(&part.bytes().await.unwrap()[..], &weights[1048570..1048590]);
            // Bytes in the shared store that are not the model's: the streamed answer is cut
            // short (an error to the client, which never gets all the bytes), and no copy is
            // kept.
            let (m, _) = ca.push_model("shared.forged", "1.0.0", weights[..(2 << 20)].to_vec()).await.unwrap();
            let forged_digest = m.digest.unwrap();
            let objects = nats.js.get_object_store(bucket).await.unwrap();
            let forged: Vec<u8> = weights[..(2 << 20)].iter().map(|b| b ^ 0x55).collect();
            objects.put(forged_digest.hex().as_str(), &mut &forged[..]).await.unwrap();
            let answer = http.get(format!("{}/api/v1/models/shared.forged/1.0.0", b.url)).send().await.unwrap();
            assert_eq!(answer.status(), 200);
            assert!(answer.bytes().await.is_err(), "a body that is not the model's is cut short");
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            assert!(!data_b.join("blobs").join(&forged_digest.hex()[..2]).join(forged_digest.hex()).exists());
            // Through the process that has not cached a model: a HEAD answers from the
            // Object Store's info and fetches nothing; a range is served as the object is
            // read, and the copy read is kept.
            let other: Vec<u8> = weights.iter().rev().copied().collect();
            let (m, _) = ca.push_model("shared.ranged", "1.0.0", other.clone()).await.unwrap();
            let ranged = m.digest.unwrap();
            let copy = data_b.join("blobs").join(&ranged.hex()[..2]).join(ranged.hex());
            let url = format!("{}/api/v1/models/shared.ranged/1.0.0", b.url);
            let head = http.head(&url).send().await.unwrap();
            assert_eq!(head.status(), 200);
            assert_eq!(head.headers()["content-length"], other.len().to_string().as_str());
            assert!(!copy.exists(), "a HEAD fetches nothing");
            let part = http.get(&url).header("range", "bytes=2000000-").send().await.unwrap();
            assert_eq!(part.status(), 206);
            assert_eq!(part.headers()["content-range"], format!("bytes 2000000-{}/{}", other.len() - 1, other.len()));
            assert!(part.bytes().await.unwrap()[..] == other[2_000_000..]);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !copy.exists() {
                assert!(std::time::Instant::now() < deadline, "the copy read for a range is kept");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            // A process without the shared store would keep blobs the others cannot read:
            // it is refused.
            let Database::Postgres(pg) = &database else { unreachable!() };
            let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
                .env_remove("TESSERA_HUB_DATABASE")
                .env_remove("TESSERA_HUB_BLOBS")
                .args(["hub", "dump", work.path().join("x.dump").to_str().unwrap(), "--database", pg, "--data"])
                .arg(work.path().join("hub-c"))
                .output()
                .unwrap();
            assert!(!out.status.success());
            assert!(String::from_utf8_lossy(&out.stderr).contains("same --blobs"), "{out:?}");
            assert!(!work.path().join("hub-c").exists(), "a refused process leaves no directory, no copy of the key");
        }
    }
    if let (None, Database::Postgres(pg)) = (blobs, &database) {
        // Without shared blobs, a process over the database with a directory of its own
        // would store blobs the others cannot read: it is refused, naming why.
        let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .env_remove("TESSERA_HUB_DATABASE")
            .env_remove("TESSERA_HUB_BLOBS")
            .args(["hub", "dump", work.path().join("x.dump").to_str().unwrap(), "--database", pg, "--data"])
            .arg(work.path().join("hub-elsewhere"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("another data directory"), "{err}");
        assert!(!work.path().join("hub-elsewhere").exists(), "a refused process leaves no directory");
    }

    // A signed request captured on its way to one process is refused by the other, and by
    // the first.
    let path = format!("/api/v1/accounts/{}/usage", key.public());
    let env = Envelope::sign(&key, &audience, "GET", &path, b"", now_ms());
    let http = reqwest::Client::new();
    let send =
        |url: &str| http.get(format!("{url}{path}")).header(tessera_identity::envelope::HEADER, env.to_header()).send();
    let first = send(&a.url).await.unwrap();
    assert_eq!(first.status(), 200, "{}", first.text().await.unwrap());
    for url in [&b.url, &a.url] {
        let replay = send(url).await.unwrap();
        assert_eq!(replay.status(), 401);
        assert!(replay.text().await.unwrap().contains("replayed"));
    }
    // A fresh signature still goes through the other process.
    let env = Envelope::sign(&key, &audience, "GET", &path, b"", now_ms());
    let fresh = http
        .get(format!("{}{path}", b.url))
        .header(tessera_identity::envelope::HEADER, env.to_header())
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status(), 200);
}

/// A hub on SQLite with its blobs in its directory moves, by `tessera hub dump` and
/// `tessera hub restore`, to PostgreSQL with its blobs in the NATS Object Store; a hub
/// process started over them with an empty directory of its own serves the same packages
/// (listing, cards, digests, bytes) under the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hub_moves_from_sqlite_to_postgres_and_nats() {
    let work = tempfile::tempdir().unwrap();
    let nats = NatsServer::start();
    let database = PgServer::shared().database();
    let Database::Postgres(pg) = &database else { unreachable!() };
    let a = listening(spawn_hub(&work.path().join("a"), &Database::Sqlite, None));
    let ca = HubClient::new(&a.url).unwrap();
    let packages: Vec<Vec<u8>> = (0..12).map(|i| package(work.path(), i)).collect();
    for p in &packages {
        ca.publish(p.clone()).await.unwrap();
    }
    let before = ca.list(&ListParams { limit: Some(500), all: true, ..Default::default() }).await.unwrap();
    assert_eq!(before.iter().filter(|r| r.card.is_some()).count(), 3, "three packages have cards");
    let key = ca.hub_key().await.unwrap();

    let dump = work.path().join("hub.dump");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .env_remove("TESSERA_HUB_DATABASE")
            .env_remove("TESSERA_HUB_BLOBS")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["hub", "dump", dump.to_str().unwrap(), "--data", work.path().join("a").to_str().unwrap()]);
    drop(a);
    let restored = work.path().join("b");
    // A restore refused once it has recorded the buckets its blobs go to (a row this hub
    // does not take): the next restore into the same database puts its blobs there.
    let bad = work.path().join("bad.dump");
    rewrite_dump(&dump, &bad, first_row("packages", |row| row["version"] = "garbage".into()));
    let refused = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .env_remove("TESSERA_HUB_DATABASE")
        .env_remove("TESSERA_HUB_BLOBS")
        .args(["hub", "restore", bad.to_str().unwrap(), "--data", restored.to_str().unwrap(), "--database", pg])
        .args(["--blobs", &nats.url()])
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && why.contains("garbage"), "{why}");
    assert!(!restored.exists(), "nothing restored");
    run(&[
        "hub",
        "restore",
        dump.to_str().unwrap(),
        "--data",
        restored.to_str().unwrap(),
        "--database",
        pg,
        "--blobs",
        &nats.url(),
    ]);
    // Another process, another (empty) directory: the records, key and blobs come from the
    // shared stores.
    let c = listening(spawn_hub(&work.path().join("c"), &database, Some(&nats.url())));
    let cc = HubClient::new(&c.url).unwrap();
    assert_eq!(cc.hub_key().await.unwrap(), key, "the hub keeps its key");
    let after = cc.list(&ListParams { limit: Some(500), all: true, ..Default::default() }).await.unwrap();
    let view = |l: &[tessera_core::registry::PackageRecord]| {
        l.iter().map(|r| (r.name.clone(), r.version.clone(), r.digest, r.card.clone())).collect::<Vec<_>>()
    };
    assert_eq!(view(&after), view(&before));
    for (i, bytes) in packages.iter().enumerate() {
        let (rec, got) = cc.download(&format!("shared.p{i}").parse().unwrap()).await.unwrap();
        assert_eq!(rec.digest, Digest::of(bytes));
        assert_eq!(&got[..], &bytes[..]);
    }
}
