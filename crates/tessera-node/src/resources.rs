//! What a machine has: CPU cores, memory, GPUs, free disk.

use std::path::Path;

use sysinfo::{Disks, System};
use tessera_core::ByteSize;
use tessera_core::wire::Resources;

/// Detects this machine's resources; `disk` is the free space where `dir` lives.
pub fn detect(dir: &Path) -> Resources {
    let cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let memory = System::new()
        .map(|mut s| {
            s.refresh_memory();
            s.total_memory()
        })
        .unwrap_or(0);
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let disk = Disks::new_with_refreshed_list()
        .ok()
        .and_then(|disks| {
            disks
                .iter()
                .filter(|d| dir.starts_with(d.mount_point()))
                .max_by_key(|d| d.mount_point().as_os_str().len())
                .map(|d| d.available_space())
        })
        .unwrap_or(0);
    Resources { cpu, memory: ByteSize(memory), gpu: count_gpus(), disk: ByteSize(disk) }
}

/// NVIDIA GPUs visible as `/dev/nvidia<N>`.
fn count_gpus() -> u32 {
    std::fs::read_dir("/dev")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("nvidia")
                        .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit()))
                })
                .count() as u32
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn detects_something_real() {
        let r = super::detect(std::path::Path::new("."));
        assert!(r.cpu >= 1.0);
        assert!(r.memory.0 > 64 << 20, "{r:?}");
        assert!(r.disk.0 > 0, "{r:?}");
    }
}
