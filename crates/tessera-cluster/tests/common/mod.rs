//! What the swarm and dataflow end-to-end tests share: the repository root, the Python
//! they run modules with, the two backends with a short membership time-to-live, and the
//! macro that runs a test body on each.

// Each test binary uses a part of this.
#![allow(dead_code)]

pub mod counting;

use std::path::PathBuf;
use std::time::Duration;

use tessera_nats::testing::NatsServer;
use tessera_ports::Backend;

/// The repository's root (examples live there).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `TESSERA_PYTHON` (else `python3`), which must have numpy.
pub fn python() -> PathBuf {
    let py = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&py).args(["-c", "import numpy"]).status().is_ok_and(|s| s.success());
    assert!(ok, "{py} lacks numpy: run scripts/test (it makes target/venv) or set TESSERA_PYTHON");
    PathBuf::from(py)
}

/// Which backend a test runs on.
pub enum On {
    Memory,
    Nats(NatsServer),
}

/// Membership time-to-live: short, so a killed node is noticed in seconds.
pub const TTL: Duration = Duration::from_secs(3);

impl On {
    /// The backend, with [`TTL`].
    pub async fn backend(&self) -> Backend {
        match self {
            On::Memory => Backend::in_process(TTL),
            On::Nats(server) => {
                let options = tessera_nats::NatsOptions { member_ttl: TTL, ..Default::default() };
                tessera_nats::backend(&server.url(), &options).await.unwrap()
            }
        }
    }
}

/// Runs each named test body once on each backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn in_process() {
                super::$name($crate::common::On::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nats() {
                super::$name($crate::common::On::Nats(tessera_nats::testing::NatsServer::start())).await
            }
        }
    )*};
}
