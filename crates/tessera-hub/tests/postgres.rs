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
