//! A private nats-server for tests and benchmarks: JetStream on, a free port on loopback,
//! a temporary store directory, stopped when dropped.
//!
//! A missing `nats-server` binary is a failure, not a skip: install it with
//! `apt-get install -y nats-server` (the test script does).

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nats-server.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(p);
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
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut s = NatsServer { child: None, port: free_port(), dir };
        s.launch();
        s
    }

    fn launch(&mut self) {
        let store = self.dir.path().join("jetstream");
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("a log file");
        let child = Command::new(binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server ({e}); install it with `apt-get install -y nats-server` or set NATS_SERVER")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen on port {} within 20 s", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
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
