//! PostgreSQL for tests: one private server per test process (Debian's `postgresql`
//! binaries, a fresh `initdb` in a temporary directory, a free loopback port), a new
//! database for every store a test opens, and the server stopped and its directory removed
//! when the test process exits (a watchdog shell waits for it).
//!
//! The hub's tests open their stores through [`open_store`]: SQLite unless
//! `TESSERA_TEST_DATABASE=postgres`, so the same tests run on both (the test command runs
//! them twice).
//!
//! [`rewrite_dump`] and [`first_row`] make tampered copies of a `tessera hub dump` file.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tessera_package::Limits;

use crate::{Database, HubStore};

/// A private PostgreSQL server.
pub struct PgServer {
    port: u16,
    /// Whether it takes TLS connections only ([`PgServer::start_tls`]).
    tls: bool,
    /// The shell that runs the server and stops it once this process is gone (it outlives
    /// this process by design, so it is never waited for).
    _watchdog: std::process::Child,
}

static SERVER: OnceLock<PgServer> = OnceLock::new();
static DATABASES: AtomicU64 = AtomicU64::new(0);

/// The directory of PostgreSQL's programs: `$PG_BIN`, or the newest of Debian's.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return dir.into();
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).unwrap_or_else(|| {
        panic!("PostgreSQL is not installed: `apt-get install -y postgresql`, or set PG_BIN to its bin directory")
    })
}

/// `(uid, gid)` of Debian's `postgres` user when this process is root (PostgreSQL refuses
/// to run as root).
fn run_as() -> Option<(u32, u32)> {
    let me = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u").expect("a `postgres` user (Debian's package makes one)"), id("-g")?))
}

fn chown_all(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
    if path.is_dir() {
        for e in std::fs::read_dir(path).expect("a directory").flatten() {
            chown_all(&e.path(), uid, gid);
        }
    }
}

/// A command that runs `program` as the server's user.
fn as_server_user(program: &Path) -> Command {
    match run_as() {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}")).arg(format!("--regid={gid}")).arg("--clear-groups").arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

impl PgServer {
    /// This process's server, started on first use.
    ///
    /// # Panics
    /// When PostgreSQL is not installed or does not start.
    pub fn shared() -> &'static PgServer {
        // Off any Tokio thread: the synchronous client runs its own runtime.
        SERVER.get_or_init(|| std::thread::scope(|s| s.spawn(|| Self::start(None)).join().expect("PostgreSQL starts")))
    }

    /// A server of its own that takes TLS connections only, with the certificate and key
    /// given (PEM), stopped when this process exits. Connection strings for it need an
    /// `sslmode` other than `disable`.
    ///
    /// # Panics
    /// When PostgreSQL is not installed or does not start.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> PgServer {
        let (cert, key) = (cert_pem.to_owned(), key_pem.to_owned());
        std::thread::scope(|s| s.spawn(|| Self::start(Some((&cert, &key)))).join().expect("PostgreSQL starts"))
    }

    fn start(tls: Option<(&str, &str)>) -> PgServer {
        let bin = bin_dir();
        let root = tempfile::Builder::new().prefix("tessera-pg-").tempdir().expect("a temporary directory");
        let data = root.path().join("data");
        std::fs::create_dir(&data).expect("the data directory");
        if let Some((uid, gid)) = run_as() {
            chown_all(root.path(), uid, gid);
        }
        let out = as_server_user(&bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-A", "trust", "-U", "tessera", "-E", "UTF8", "--no-locale", "-N"])
            .output()
            .expect("initdb runs");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        if let Some((cert, key)) = tls {
            std::fs::write(data.join("server.crt"), cert).expect("the certificate");
            std::fs::write(data.join("server.key"), key).expect("the key");
            std::fs::set_permissions(data.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("the key's mode");
            // TLS or nothing over TCP.
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
            )
            .expect("pg_hba.conf");
            if let Some((uid, gid)) = run_as() {
                chown_all(&data, uid, gid);
            }
        }
        // From here on the watchdog removes the directory.
        let root = root.keep();
        let port = free_port();
        let mut words: Vec<String> = match run_as() {
            Some((uid, gid)) => {
                vec!["setpriv".into(), format!("--reuid={uid}"), format!("--regid={gid}"), "--clear-groups".into()]
            }
            None => Vec::new(),
        };
        words.push(sh_quote(&bin.join("postgres")));
        words.extend(["-D".into(), sh_quote(&data), "-p".into(), port.to_string(), "-k".into(), sh_quote(&root)]);
        for setting in [
            "listen_addresses=127.0.0.1",
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "shared_buffers=32MB",
            "max_connections=200",
        ] {
            words.extend(["-c".into(), setting.into()]);
        }
        if tls.is_some() {
            for setting in ["ssl=on", "ssl_cert_file=server.crt", "ssl_key_file=server.key"] {
                words.extend(["-c".into(), setting.into()]);
            }
        }
        let command = words.join(" ");
        // The watchdog: the server runs while this process does; then it is stopped and its
        // directory removed.
        // In its own process group and deaf to the signals a terminal sends the test's group
        // (Ctrl-C), so it always gets to clean up.
        let script = format!(
            "trap '' INT TERM HUP; {command} >{log} 2>&1 & p=$!; \
             while kill -0 {me} 2>/dev/null && kill -0 $p 2>/dev/null; do sleep 0.5; done; \
             kill -INT $p 2>/dev/null; wait $p; rm -rf {root}",
            log = sh_quote(&root.join("server.log")),
            me = std::process::id(),
            root = sh_quote(&root),
        );
        let watchdog = Command::new("sh")
            .args(["-c", &script])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh runs");
        let deadline = Instant::now() + Duration::from_secs(30);
        let server = PgServer { port, tls: tls.is_some(), _watchdog: watchdog };
        loop {
            if server.admin().is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start within 30 s: {}",
                std::fs::read_to_string(root.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// A connection to its `postgres` database (off any Tokio thread).
    fn admin(&self) -> Result<postgres::Client, crate::store::db::DbError> {
        let url = Self::url_of(self.port, "postgres");
        if self.tls {
            crate::store::db::connect(&format!("{url}?sslmode=require"))
        } else {
            crate::store::db::connect(&url)
        }
    }

    /// How many of the connections to database `db` use TLS, and how many there are.
    ///
    /// # Panics
    /// When the server does not answer.
    pub fn tls_connections(&self, db: &str) -> (i64, i64) {
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut c = self.admin().expect("the server answers");
                let row = c
                    .query_one(
                        "SELECT COUNT(*) FILTER (WHERE s.ssl), COUNT(*) FROM pg_stat_activity a
                         JOIN pg_stat_ssl s ON s.pid = a.pid WHERE a.datname = $1",
                        &[&db],
                    )
                    .expect("pg_stat_ssl");
                (row.get(0), row.get(1))
            })
            .join()
            .expect("the query runs")
        })
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn url_of(port: u16, db: &str) -> String {
        format!("postgres://tessera@127.0.0.1:{port}/{db}")
    }

    /// A new, empty database on this server.
    pub fn database(&self) -> Database {
        let name = format!("hub_{}_{}", std::process::id(), DATABASES.fetch_add(1, Ordering::Relaxed));
        // Off any Tokio thread: the synchronous client runs its own runtime.
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut c = self.admin().expect("the server answers");
                c.batch_execute(&format!("CREATE DATABASE {name}")).expect("a new database");
            })
            .join()
            .expect("the database is made")
        });
        Database::Postgres(Self::url_of(self.port, &name))
    }
}

fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// The database hub tests use: a new PostgreSQL database when `TESSERA_TEST_DATABASE` is
/// `postgres`, SQLite otherwise.
pub fn test_database() -> Database {
    match std::env::var("TESSERA_TEST_DATABASE").as_deref() {
        Ok("postgres") => PgServer::shared().database(),
        Ok("sqlite") | Err(_) => Database::Sqlite,
        Ok(other) => panic!("TESSERA_TEST_DATABASE={other}: expected sqlite or postgres"),
    }
}

/// Opens a hub for a test: blobs in `dir`, records in [`test_database`].
pub fn open_store(dir: impl Into<PathBuf>) -> HubStore {
    open_store_with(dir, Limits::default())
}

/// [`open_store`] with package limits.
pub fn open_store_with(dir: impl Into<PathBuf>, limits: Limits) -> HubStore {
    HubStore::open_database(dir, &test_database(), limits).expect("the test hub opens")
}

/// An edit of a dump's entry (its path and bytes): the new bytes, or `None` to leave it out.
pub type DumpEdit = Box<dyn Fn(&str, Vec<u8>) -> Option<Vec<u8>>>;

/// Copies the dump `from` to `to` with `edit` applied to each entry's bytes (a tampered
/// dump, for tests of what a restore refuses). Panics on an I/O error.
pub fn rewrite_dump(from: &Path, to: &Path, edit: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>) {
    let mut archive = tar::Archive::new(std::fs::File::open(from).unwrap());
    let mut out = tar::Builder::new(std::fs::File::create(to).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
        let Some(bytes) = edit(&path, bytes) else { continue };
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        out.append_data(&mut h, &path, bytes.as_slice()).unwrap();
    }
    out.finish().unwrap();
}

/// An edit of a dump that changes the first row of `table` (a JSON object) with `f`.
pub fn first_row(table: &'static str, f: impl Fn(&mut serde_json::Value) + 'static) -> DumpEdit {
    Box::new(move |p, b| {
        if p != format!("tables/{table}.jsonl") {
            return Some(b);
        }
        let text = String::from_utf8(b).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let mut row: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        f(&mut row);
        lines[0] = row.to_string();
        Some((lines.join("\n") + "\n").into_bytes())
    })
}
