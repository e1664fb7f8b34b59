//! Tessera's built-in WebAssembly modules: the federated softmax worker used by the
//! quickstart, and test programs that misbehave on purpose. The build compiles them from
//! `modules/` to `wasm32-wasip2`; this crate only carries their bytes and manifests.
//!
//! It knows nothing of how they run (that is `tessera-wasm`).

use std::io;
use std::path::Path;

/// The softmax-regression worker (`fl.softmax.worker`), compiled.
pub const FL_SOFTMAX_WORKER_WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fl_softmax_worker.wasm"));

/// The worker's `module.yaml`.
pub const FL_SOFTMAX_WORKER_MANIFEST: &str = include_str!("../../../modules/fl-softmax-worker/module.yaml");

/// The worker's `README.md`: its card.
pub const FL_SOFTMAX_WORKER_README: &str = include_str!("../../../modules/fl-softmax-worker/README.md");

/// Test programs: behaviour picked by `mode` in the config (`echo`, `spin`, `alloc`,
/// `panic`, `fail`, `context`, `big-output`, `work`).
pub const TEST_PROGRAMS_WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test_programs.wasm"));

/// The WIT world modules implement.
pub const WIT: &str = include_str!("../../../wit/tessera.wit");

/// Writes a module folder (`module.yaml` and `module.wasm`) at `dir`.
pub fn write_module_dir(dir: &Path, manifest: &str, wasm: &[u8]) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("module.yaml"), manifest)?;
    std::fs::write(dir.join("module.wasm"), wasm)
}

/// Writes the softmax worker's module folder at `dir`, with its card (`README.md`).
pub fn write_softmax_worker(dir: &Path) -> io::Result<()> {
    write_module_dir(dir, FL_SOFTMAX_WORKER_MANIFEST, FL_SOFTMAX_WORKER_WASM)?;
    std::fs::write(dir.join("README.md"), FL_SOFTMAX_WORKER_README)
}

#[cfg(test)]
mod tests {
    #[test]
    fn modules_are_components() {
        // The component-model preamble: magic, then layer 1 version 0x0d.
        for wasm in [super::FL_SOFTMAX_WORKER_WASM, super::TEST_PROGRAMS_WASM] {
            assert_eq!(&wasm[..4], b"\0asm");
            assert_eq!(&wasm[4..8], &[0x0d, 0x00, 0x01, 0x00]);
        }
    }
}
