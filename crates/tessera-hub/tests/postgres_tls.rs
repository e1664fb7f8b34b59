//! The hub's records in PostgreSQL over TLS, with libpq's `sslmode` and `sslrootcert`: a
//! private server that refuses connections without TLS, a certificate issued by a CA made
//! here for `localhost`, and every mode tried against it.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tessera_hub::testing::PgServer;
use tessera_hub::{Database, HubStore};
use tessera_package::Limits;

/// A CA that signs certificates (its certificate as PEM, and the issuer).
fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// Opens a hub over `url` in a new directory: the error's text when it cannot.
fn open(url: &str) -> Result<HubStore, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.keep();
    HubStore::open_database(&path, &Database::Postgres(url.to_owned()), Limits::default()).map_err(|e| e.to_string())
}

#[test]
fn the_hub_reaches_postgres_over_tls_as_sslmode_says() {
    let authority = ca("tessera test CA");
    let server_key = KeyPair::generate().unwrap();
    let cert =
        CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&server_key, &authority).unwrap();
    let server = PgServer::start_tls(&cert.pem(), &server_key.serialize_pem());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root ca.pem");
    std::fs::write(&root, authority.pem()).unwrap();
    let other = dir.path().join("other.pem");
    std::fs::write(&other, ca("another CA").pem()).unwrap();
    let root_param = root.display().to_string().replace(' ', "%20");

    let Database::Postgres(base) = server.database() else { unreachable!() };
    let db = base.rsplit('/').next().unwrap().to_owned();
    let local = base.replace("127.0.0.1", "localhost");

    // verify-full: the chain and the name; the hub works, and every connection is TLS.
    let store = open(&format!("{local}?sslmode=verify-full&sslrootcert={root_param}")).unwrap();
    assert!(store.models(None).unwrap().is_empty());
    let (tls, all) = server.tls_connections(&db);
    assert!(all > 0 && tls == all, "{tls} of {all} connections over TLS");
    drop(store);

    // The certificate names localhost, not 127.0.0.1: verify-full refuses, verify-ca takes it.
    let e = open(&format!("{base}?sslmode=verify-full&sslrootcert={root_param}")).err().unwrap();
    assert!(e.contains("certificate") && e.contains("name"), "{e}");
    open(&format!("{base}?sslmode=verify-ca&sslrootcert={root_param}")).unwrap();
    // Another CA: refused, whatever the name.
    let e = open(&format!("{local}?sslmode=verify-ca&sslrootcert={}", other.display())).err().unwrap();
    assert!(e.contains("certificate"), "{e}");
    // require and prefer without a root file encrypt without checking (libpq's behaviour);
    // with one, they check the chain.
    open(&format!("{base}?sslmode=require")).unwrap();
    open(&base).unwrap();
    let e = open(&format!("{base}?sslmode=require&sslrootcert={}", other.display())).err().unwrap();
    assert!(e.contains("certificate"), "{e}");
    // This server takes no connection without TLS.
    let e = open(&format!("{base}?sslmode=disable")).err().unwrap();
    assert!(e.contains("no encryption") || e.contains("rejects"), "{e}");
    // Settings that cannot work are named.
    let e = open(&format!("{base}?sslmode=verify-full")).err().unwrap();
    assert!(e.contains("sslrootcert"), "{e}");
    let e = open(&format!("{base}?sslmode=verify-full&sslrootcert={}", dir.path().join("missing.pem").display()))
        .err()
        .unwrap();
    assert!(e.contains("missing.pem"), "{e}");
}
