//! What only PostgreSQL has: a connection the server closes.

use tessera_hub::Database;
use tessera_hub::testing::PgServer;
use tessera_package::{Limits, pack_dir};

/// A connection the server ended (a restart, a failover, an administrator) is opened again
/// by the next statement outside a transaction: the hub keeps answering.
#[test]
fn a_closed_connection_is_opened_again() {
    let dir = tempfile::tempdir().unwrap();
    let database = PgServer::shared().database();
    let Database::Postgres(url) = &database else { unreachable!() };
    let store = tessera_hub::HubStore::open_database(dir.path().join("hub"), &database, Limits::default()).unwrap();
    let m = dir.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("module.yaml"), "name: pg.echo\nversion: 0.1.0\nkind: task\nruntime: builtin\nentry: echo\n")
        .unwrap();
    let bytes = pack_dir(&m, &Limits::default()).unwrap().bytes;
    store.publish(&bytes, None, None).unwrap();
    for _ in 0..2 {
        let mut admin = postgres::Client::connect(url, postgres::NoTls).unwrap();
        let ended: i64 = admin
            .query_one(
                "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(ended, 1, "the hub's connection was ended");
        drop(admin);
        assert_eq!(store.resolve_str("pg.echo", "0.1.0").unwrap().version, "0.1.0");
    }
}

/// Without shared blobs, the database takes the first serving process's directory as its
/// blobs' (only if that directory holds them), and refuses any other directory after.
#[test]
fn a_database_keeps_to_the_directory_its_blobs_are_in() {
    let dir = tempfile::tempdir().unwrap();
    let database = PgServer::shared().database();
    let open = |name: &str| tessera_hub::HubStore::open_database(dir.path().join(name), &database, Limits::default());
    let a = open("a").unwrap();
    let m = dir.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("module.yaml"), "name: pg.dir\nversion: 0.1.0\nkind: task\nruntime: builtin\nentry: echo\n")
        .unwrap();
    a.publish(&pack_dir(&m, &Limits::default()).unwrap().bytes, None, None).unwrap();
    // A reader and an administrator claim nothing; a directory without the blobs is not
    // taken for theirs.
    let b = open("b").unwrap();
    b.check_blob_directory(false).unwrap();
    let e = b.check_blob_directory(true).unwrap_err();
    assert!(matches!(&e, tessera_hub::HubError::Conflict(m) if m.contains("does not hold the hub's blob")), "{e}");
    // The directory that holds them is taken, and kept to.
    a.check_blob_directory(true).unwrap();
    let id = std::fs::read_to_string(dir.path().join("a/directory-id")).unwrap();
    assert_eq!(id.len(), 16, "{id:?}");
    a.check_blob_directory(false).unwrap();
    for record in [false, true] {
        let e = b.check_blob_directory(record).unwrap_err();
        assert!(matches!(&e, tessera_hub::HubError::Conflict(m) if m.contains("another data directory")), "{e}");
    }
    // A marker that is not an id is refused, not taken.
    std::fs::write(dir.path().join("b/directory-id"), "").unwrap();
    assert!(b.check_blob_directory(false).is_err());
    // Opened with the checks, another directory is refused before it is made: no copy of
    // the hub's key is left in it.
    for record in [Some(false), Some(true)] {
        let checks = tessera_hub::OpenChecks { shared_blobs: false, blob_directory: record };
        let c = dir.path().join("c");
        let e = tessera_hub::HubStore::open_checked(&c, &database, Limits::default(), checks).err().unwrap();
        assert!(matches!(&e, tessera_hub::HubError::Conflict(m) if m.contains("another data directory")), "{e}");
        assert!(!c.exists(), "a refused process leaves no data directory");
    }
    // The directory the blobs are in opens with them.
    let checks = tessera_hub::OpenChecks { shared_blobs: false, blob_directory: Some(true) };
    tessera_hub::HubStore::open_checked(dir.path().join("a"), &database, Limits::default(), checks).unwrap();
}
