//! A swarm that counts the digits rows of every node each iteration, in user-written
//! Python tasks: what the swarm tests that kill nodes, servers and coordinators check
//! nothing against but sums they can compute themselves.

use std::path::{Path, PathBuf};

use tessera_cluster::{Cluster, digits};
use tessera_coordinator::{IterationReport, Observer, SwarmResult};
use tessera_swarm::SwarmSpec;

/// A global of a finished swarm, parsed as JSON.
pub fn global_json(result: &SwarmResult, key: &str) -> serde_json::Value {
    serde_json::from_slice(result.globals.get(key).unwrap_or_else(|| panic!("no global {key}"))).unwrap()
}

/// `count` (on every node: adds its rows, and sleeps a minute on `slow.node` in
/// `slow.iteration`) and `total` (on one node: adds this iteration's counts to the `total`
/// global, checking that its inputs are the same counts).
pub fn counting_modules(dir: &Path, version: &str) -> (PathBuf, PathBuf) {
    let count = dir.join(format!("count-{version}"));
    std::fs::create_dir_all(&count).unwrap();
    std::fs::write(
        count.join("module.yaml"),
        format!("name: test.count\nversion: {version}\nkind: task\nruntime: python\nentry: count.py\nconfig: {{}}\n"),
    )
    .unwrap();
    std::fs::write(
        count.join("count.py"),
        r#"import time
import tessera

class Count(tessera.Task):
    def run(self):
        s = self.config["swarm"]
        slow = self.config.get("slow") or {}
        if s["node"] == slow.get("node") and s["iteration"] == slow.get("iteration"):
            self.log.warning("sleeping")
            time.sleep(60)
        rows = len(self.local.dataset("digits").tensors()["y"])
        self.log.info("iteration %d: %d rows" % (s["iteration"], rows))
        self.world.results.add("rows", rows)
        return {"rows": rows}
"#,
    )
    .unwrap();
    let total = dir.join("total");
    std::fs::create_dir_all(&total).unwrap();
    std::fs::write(
        total.join("module.yaml"),
        "name: test.total\nversion: 1.0.0\nkind: task\nruntime: python\nentry: total.py\n",
    )
    .unwrap();
    std::fs::write(
        total.join("total.py"),
        r#"import tessera

class Total(tessera.Task):
    def run(self):
        got = sorted(self.world.results.select("rows"))
        if sorted(self.inputs.select("rows")) != got:
            raise ValueError("inputs %r differ from results %r" % (self.inputs.select("rows"), got))
        total = self.world.globals.get("total", 0) + sum(v for _, v in got)
        self.world.globals["total"] = total
        slow = self.config.get("slow") or {}
        if self.config["swarm"]["node"] == slow.get("node"):
            # Too slow: the coordinator gives up on this node and asks another.
            import time
            time.sleep(20)
        self.world.globals["counted"] = self.world.globals.get("counted", []) + [[n for n, _ in got]]
        return {"total": total}
"#,
    )
    .unwrap();
    (count, total)
}

pub fn counting_spec(cluster: &Cluster, home: &Path, iterations: u32) -> SwarmSpec {
    let (count, total) = counting_modules(home, "1.0.0");
    let count = cluster.publish_dir(&count).unwrap().digest;
    let total = cluster.publish_dir(&total).unwrap().digest;
    SwarmSpec::from_yaml(&format!(
        "tasks:\n  count: {{module: \"{count}\", datasets: [digits], timeout_secs: 90}}\n  total: {{module: \"{total}\", method: any, maximum: 1}}\nflow: [count -> total]\niterations: {iterations}\n"
    ))
    .unwrap()
}

pub fn rows_of(nodes: &[usize]) -> u64 {
    let (shards, _) = digits::split(4, 0.2, 42);
    nodes.iter().map(|&k| shards[k].len() as u64).sum()
}

/// Sends each finished iteration's number.
pub struct Iterations(pub tokio::sync::mpsc::UnboundedSender<u32>);
impl Observer for Iterations {
    fn iteration_finished(&self, r: &IterationReport) {
        let _ = self.0.send(r.iteration);
    }
}
