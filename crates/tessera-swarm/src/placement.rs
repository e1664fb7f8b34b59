//! Where a task runs: the nodes that can run it (datasets, runtime, GPU, labels, and the
//! module's `needs` against what each node declares), then how many of them and which, by
//! the task's method and maximum, and which version each gets under a split.
//!
//! A node that declares no CPU, memory or disk (zero, as records from before resources
//! were announced) is not judged on them; GPUs are judged as declared.
//!
//! Pure: node records, modules' facts and seeds come in; a refusal names the task, the field
//! and why, so a swarm that cannot be placed is refused before anything starts.

use std::collections::BTreeMap;

use tessera_core::RuntimeKind;
use tessera_core::manifest::Needs;
use tessera_core::select::SplitMix64;
use tessera_core::wire::NodeRecord;

use crate::spec::{Method, TaskSpec};

/// What placement needs to know of a module version.
#[derive(Clone, Debug)]
pub struct ModuleFacts {
    /// `name@version`, for messages.
    pub name: String,
    /// Its runtime.
    pub runtime: RuntimeKind,
    /// What it needs of a node.
    pub needs: Needs,
}

/// Why a task cannot be placed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("task {task}: {field}: {message}")]
pub struct PlacementError {
    /// The task.
    pub task: String,
    /// The field that cannot be met (`datasets`, `gpu`, `needs.memory`, `min_nodes`...).
    pub field: String,
    /// Why.
    pub message: String,
}

/// A test of a node: `Err(why)` when it fails.
type NodeTest = Box<dyn Fn(&NodeRecord) -> Result<(), String>>;

/// One test a node must pass.
struct Criterion {
    field: String,
    /// `Err(why)` when the node fails it.
    test: NodeTest,
    /// Why no node passes it, when none does.
    none: String,
}

fn criteria(task: &TaskSpec, modules: &[ModuleFacts]) -> Vec<Criterion> {
    let mut out: Vec<Criterion> = Vec::new();
    for d in &task.datasets {
        let d2 = d.clone();
        out.push(Criterion {
            field: "datasets".into(),
            test: Box::new(move |n| {
                if n.datasets.contains(&d2) { Ok(()) } else { Err(format!("does not hold dataset `{d2}`")) }
            }),
            none: format!("no node holds dataset `{d}`"),
        });
    }
    let mut runtimes: Vec<RuntimeKind> = modules.iter().map(|m| m.runtime).collect();
    runtimes.dedup();
    for r in runtimes {
        out.push(Criterion {
            field: "runtime".into(),
            test: Box::new(move |n| {
                if n.runtimes.contains(&r) { Ok(()) } else { Err(format!("offers no {r:?} runtime").to_lowercase()) }
            }),
            none: format!("no node offers the {} runtime the module is written for", format!("{r:?}").to_lowercase()),
        });
    }
    let gpus = modules.iter().map(|m| m.needs.gpu).max().unwrap_or(0).max(u32::from(task.gpu));
    if gpus > 0 {
        let field = if task.gpu { "gpu" } else { "needs.gpu" };
        out.push(Criterion {
            field: field.into(),
            test: Box::new(move |n| {
                if n.resources.gpu >= gpus {
                    Ok(())
                } else {
                    Err(format!("has {} GPU(s), {gpus} needed", n.resources.gpu))
                }
            }),
            none: if gpus == 1 { "no node has a GPU".into() } else { format!("no node has {gpus} GPUs") },
        });
    }
    for (k, v) in &task.labels {
        let (k2, v2) = (k.clone(), v.clone());
        out.push(Criterion {
            field: "labels".into(),
            test: Box::new(move |n| match n.labels.get(&k2) {
                Some(x) if *x == v2 => Ok(()),
                Some(x) => Err(format!("has label {k2}={x}, not {k2}={v2}")),
                None => Err(format!("has no label {k2}")),
            }),
            none: format!("no node has the label {k}={v}"),
        });
    }
    for m in modules {
        let needs = m.needs.clone();
        let name = m.name.clone();
        if needs.cpu > 0.0 {
            let cpu = needs.cpu;
            out.push(Criterion {
                field: "needs.cpu".into(),
                test: Box::new(move |n| {
                    if n.resources.cpu == 0.0 || n.resources.cpu >= cpu {
                        Ok(())
                    } else {
                        Err(format!("has {} CPU cores, {cpu} needed", n.resources.cpu))
                    }
                }),
                none: format!("{name} needs {cpu} CPU cores, more than any node has"),
            });
        }
        if needs.memory.0 > 0 {
            let mem = needs.memory;
            out.push(Criterion {
                field: "needs.memory".into(),
                test: Box::new(move |n| {
                    if n.resources.memory.0 == 0 || n.resources.memory.0 >= mem.0 {
                        Ok(())
                    } else {
                        Err(format!("has {} of memory, {mem} needed", n.resources.memory))
                    }
                }),
                none: format!("{name} needs {} of memory, more than any node has", needs.memory),
            });
        }
        if needs.storage.0 > 0 {
            let disk = needs.storage;
            out.push(Criterion {
                field: "needs.storage".into(),
                test: Box::new(move |n| {
                    if n.resources.disk.0 == 0 || n.resources.disk.0 >= disk.0 {
                        Ok(())
                    } else {
                        Err(format!("has {} of free disk, {disk} needed", n.resources.disk))
                    }
                }),
                none: format!("{name} needs {} of disk, more than any node has free", needs.storage),
            });
        }
        for lib in &needs.libraries {
            let req = match Requirement::parse(lib) {
                Ok(r) => r,
                Err(e) => {
                    let msg = format!("{name}: {e}");
                    out.push(Criterion {
                        field: "needs.libraries".into(),
                        test: Box::new(move |_| Err(msg.clone())),
                        none: format!("{name} lists the library {lib:?}, which is not a requirement: {e}"),
                    });
                    continue;
                }
            };
            let lib2 = lib.clone();
            out.push(Criterion {
                field: "needs.libraries".into(),
                test: Box::new(move |n| {
                    if n.installs_libraries || req.met_by(&n.libraries) {
                        Ok(())
                    } else {
                        Err(format!("does not offer {lib2}"))
                    }
                }),
                none: format!("{name} needs the library {lib}, which no node offers"),
            });
        }
    }
    out
}

/// Whether `node` can run `task` with `modules`; what it lacks when not.
pub fn fits(task: &TaskSpec, modules: &[ModuleFacts], node: &NodeRecord) -> Result<(), Vec<String>> {
    let lacks: Vec<String> = criteria(task, modules).iter().filter_map(|c| (c.test)(node).err()).collect();
    if lacks.is_empty() { Ok(()) } else { Err(lacks) }
}

/// The nodes among `nodes` that can run `task` (every module version of it), sorted by id.
/// Refused, naming the field, when none can, or fewer than the task's `min_nodes`.
pub fn eligible<'a>(
    task_name: &str,
    task: &TaskSpec,
    modules: &[ModuleFacts],
    nodes: &'a [NodeRecord],
) -> Result<Vec<&'a NodeRecord>, PlacementError> {
    let refuse = |field: &str, message: String| PlacementError { task: task_name.into(), field: field.into(), message };
    let tests = criteria(task, modules);
    if nodes.is_empty() {
        return Err(refuse("nodes", "no node is announced".into()));
    }
    // A criterion no node meets is the reason, whatever else.
    for c in &tests {
        if !nodes.iter().any(|n| (c.test)(n).is_ok()) {
            return Err(refuse(&c.field, c.none.clone()));
        }
    }
    let mut ok: Vec<&NodeRecord> = nodes.iter().filter(|n| tests.iter().all(|c| (c.test)(n).is_ok())).collect();
    ok.sort_by(|a, b| a.id.cmp(&b.id));
    if ok.is_empty() {
        let why: Vec<String> = nodes
            .iter()
            .take(8)
            .map(|n| {
                let lacks: Vec<String> = tests.iter().filter_map(|c| (c.test)(n).err()).collect();
                format!("{} {}", n.id, lacks.join(" and "))
            })
            .collect();
        let field = tests.iter().find(|c| nodes.iter().any(|n| (c.test)(n).is_err())).map_or("nodes", |c| &c.field);
        return Err(refuse(field, format!("no node meets every requirement: {}", why.join("; "))));
    }
    if ok.len() < task.min_nodes {
        return Err(refuse(
            "min_nodes",
            format!("{} node(s) can run it ({}), fewer than min_nodes {}", ok.len(), ids(&ok), task.min_nodes),
        ));
    }
    Ok(ok)
}

fn ids(nodes: &[&NodeRecord]) -> String {
    nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>().join(", ")
}

/// The nodes a task runs on in `iteration`, out of its eligible ones (sorted by id):
/// `all` and `any` take the first `maximum` in an order fixed by the seed (so they stay the
/// same while the nodes do); `random` draws anew each iteration. `exclude` are left out
/// (nodes that failed an earlier try of the stage). The result is sorted.
pub fn choose(task_name: &str, task: &TaskSpec, eligible: &[String], seed: u64, iteration: u32) -> Vec<String> {
    let n = task.maximum.of(eligible.len());
    let mut order: Vec<String> = eligible.to_vec();
    order.sort();
    match task.method {
        Method::Any => {}
        Method::All => shuffle(&mut order, mix(seed, task_name, 0)),
        Method::Random => shuffle(&mut order, mix(seed, task_name, u64::from(iteration) + 1)),
    }
    order.truncate(n);
    order.sort();
    order
}

/// Splits `nodes` between versions by their shares: counts by the largest remainder (so
/// 0.8/0.2 of ten nodes is exactly 8 and 2), nodes dealt in an order fixed by the seed.
/// Returns, per node, the index of its version in `shares`.
pub fn split(task_name: &str, shares: &[f64], nodes: &[String], seed: u64) -> BTreeMap<String, usize> {
    let n = nodes.len();
    let mut counts: Vec<usize> = shares.iter().map(|s| (s * n as f64).floor() as usize).collect();
    let mut left = n.saturating_sub(counts.iter().sum());
    let mut by_remainder: Vec<(usize, f64)> =
        shares.iter().enumerate().map(|(i, s)| (i, s * n as f64 - (s * n as f64).floor())).collect();
    by_remainder.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    for (i, _) in by_remainder {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    let mut order: Vec<String> = nodes.to_vec();
    order.sort();
    shuffle(&mut order, mix(seed, task_name, u64::MAX));
    let mut out = BTreeMap::new();
    let mut it = order.into_iter();
    for (version, count) in counts.into_iter().enumerate() {
        for node in it.by_ref().take(count) {
            out.insert(node, version);
        }
    }
    out
}

fn mix(seed: u64, task: &str, salt: u64) -> u64 {
    let h = tessera_core::Digest::of(task.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    seed ^ u64::from_le_bytes(b) ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Fisher-Yates with SplitMix64.
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for i in (1..v.len()).rev() {
        let j = rng.below(i + 1);
        v.swap(i, j);
    }
}
pub use tessera_core::requirement::Requirement;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Maximum, SwarmSpec};
    use tessera_core::ByteSize;
    use tessera_core::wire::Resources;

    fn node(id: &str, datasets: &[&str], gpu: u32, memory_gib: u64) -> NodeRecord {
        NodeRecord {
            schema: tessera_core::wire::SCHEMA_VERSION,
            id: id.into(),
            datasets: datasets.iter().map(|s| s.to_string()).collect(),
            runtimes: vec![RuntimeKind::Wasm, RuntimeKind::Python],
            resources: Resources { cpu: 4.0, memory: ByteSize(memory_gib << 30), gpu, disk: ByteSize(100 << 30) },
            task_queue: format!("tessera.node.{id}.tasks"),
            key: None,
            endpoint: None,
            labels: BTreeMap::new(),
            libraries: vec!["numpy==2.1.3".into(), "scikit-learn==1.5.2".into()],
            operations: Vec::new(),
            protections: Vec::new(),
            installs_libraries: false,
            degraded: false,
        }
    }

    fn facts(needs: Needs) -> Vec<ModuleFacts> {
        vec![ModuleFacts { name: "x.m@1.0.0".into(), runtime: RuntimeKind::Python, needs }]
    }

    fn task(yaml: &str) -> TaskSpec {
        let s = SwarmSpec::from_yaml(&format!("tasks:\n  t: {yaml}\nflow: t\n")).unwrap();
        s.tasks["t"].clone()
    }

    fn ten() -> Vec<NodeRecord> {
        (0..10).map(|i| node(&format!("n{i}"), &["digits"], 0, 8)).collect()
    }

    fn placed(t: &TaskSpec, nodes: &[NodeRecord], iteration: u32) -> Vec<String> {
        let ok: Vec<String> =
            eligible("t", t, &facts(Needs::default()), nodes).unwrap().iter().map(|n| n.id.clone()).collect();
        choose("t", t, &ok, 7, iteration)
    }

    #[test]
    fn all_any_and_random() {
        let nodes = ten();
        assert_eq!(placed(&task("{module: x.m@1.0.0, method: all}"), &nodes, 1).len(), 10);
        assert_eq!(placed(&task("{module: x.m@1.0.0, method: all, maximum: 3}"), &nodes, 1).len(), 3);
        assert_eq!(placed(&task("{module: x.m@1.0.0, method: all, maximum: 0.25}"), &nodes, 1).len(), 3);
        let any = task("{module: x.m@1.0.0, method: any}");
        assert_eq!(placed(&any, &nodes, 1), ["n0"]);
        assert_eq!(placed(&any, &nodes, 2), ["n0"], "any keeps its node");
        let any2 = task("{module: x.m@1.0.0, method: any, maximum: 0.2}");
        assert_eq!(placed(&any2, &nodes, 1), ["n0", "n1"]);
        let random = task("{module: x.m@1.0.0, method: random, maximum: 2}");
        let draws: std::collections::BTreeSet<Vec<String>> = (1..20).map(|i| placed(&random, &nodes, i)).collect();
        assert!(draws.len() > 5, "random draws anew each iteration: {draws:?}");
        assert!(draws.iter().all(|d| d.len() == 2));
        assert_eq!(placed(&random, &nodes, 3), placed(&random, &nodes, 3), "the same seed draws the same");
        let frac = task("{module: x.m@1.0.0, method: random, maximum: 0.5}");
        assert_eq!(placed(&frac, &nodes, 1).len(), 5);
        // all with a cap keeps the same nodes every iteration.
        let capped = task("{module: x.m@1.0.0, method: all, maximum: 4}");
        assert_eq!(placed(&capped, &nodes, 1), placed(&capped, &nodes, 9));
        assert_eq!(Maximum::Unlimited.of(3), 3);
    }

    #[test]
    fn refusals_name_the_task_and_field() {
        let nodes = ten();
        let e =
            eligible("train", &task("{module: x.m@1.0.0, gpu: true}"), &facts(Needs::default()), &nodes).unwrap_err();
        assert_eq!((e.task.as_str(), e.field.as_str()), ("train", "gpu"));
        assert_eq!(e.to_string(), "task train: gpu: no node has a GPU");
        let mut with_gpu = nodes.clone();
        with_gpu[3].resources.gpu = 1;
        let ok =
            eligible("train", &task("{module: x.m@1.0.0, gpu: true}"), &facts(Needs::default()), &with_gpu).unwrap();
        assert_eq!(ok.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["n3"]);

        let big = Needs { memory: ByteSize(64 << 30), ..Needs::default() };
        let e = eligible("agg", &task("{module: x.m@1.0.0}"), &facts(big), &nodes).unwrap_err();
        assert_eq!(e.field, "needs.memory");
        assert!(e.message.contains("64"), "{e}");

        let e = eligible("w", &task("{module: x.m@1.0.0, datasets: [cifar]}"), &facts(Needs::default()), &nodes)
            .unwrap_err();
        assert_eq!(e.to_string(), "task w: datasets: no node holds dataset `cifar`");

        let torch = Needs { libraries: vec!["torch>=2".into()], ..Needs::default() };
        let e = eligible("w", &task("{module: x.m@1.0.0}"), &facts(torch), &nodes).unwrap_err();
        assert_eq!(e.field, "needs.libraries");
        let numpy = Needs { libraries: vec!["NumPy>=1.26,<3".into(), "scikit_learn".into()], ..Needs::default() };
        assert_eq!(eligible("w", &task("{module: x.m@1.0.0}"), &facts(numpy), &nodes).unwrap().len(), 10);
        let old = Needs { libraries: vec!["numpy<2".into()], ..Needs::default() };
        assert!(eligible("w", &task("{module: x.m@1.0.0}"), &facts(old.clone()), &nodes).is_err());
        // A node that installs libraries takes it (and refuses at launch what it cannot).
        let mut installs = nodes.clone();
        installs[3].installs_libraries = true;
        let placed = eligible("w", &task("{module: x.m@1.0.0}"), &facts(old), &installs).unwrap();
        assert_eq!(placed.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), [installs[3].id.as_str()]);

        let e =
            eligible("w", &task("{module: x.m@1.0.0, method: all, min_nodes: 11}"), &facts(Needs::default()), &nodes)
                .unwrap_err();
        assert_eq!(e.field, "min_nodes");

        let e = eligible("w", &task("{module: x.m@1.0.0, labels: {zone: eu}}"), &facts(Needs::default()), &nodes)
            .unwrap_err();
        assert_eq!(e.field, "labels");
        let mut labelled = nodes.clone();
        labelled[5].labels.insert("zone".into(), "eu".into());
        let ok = eligible("w", &task("{module: x.m@1.0.0, labels: {zone: eu}}"), &facts(Needs::default()), &labelled)
            .unwrap();
        assert_eq!(ok.len(), 1);

        // Each criterion met somewhere, never together: every node's lack is said.
        let mut mixed = vec![node("a", &["digits"], 0, 8), node("b", &[], 1, 8)];
        mixed[1].datasets.clear();
        let e = eligible(
            "w",
            &task("{module: x.m@1.0.0, gpu: true, datasets: [digits]}"),
            &facts(Needs::default()),
            &mixed,
        )
        .unwrap_err();
        assert!(e.message.contains("a has 0 GPU(s)") && e.message.contains("b does not hold dataset"), "{e}");
    }

    #[test]
    fn a_split_of_ten_nodes_is_eight_and_two() {
        let nodes: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
        let s = split("worker", &[0.8, 0.2], &nodes, 42);
        let on = |v: usize| s.values().filter(|x| **x == v).count();
        assert_eq!((on(0), on(1)), (8, 2));
        assert_eq!(s, split("worker", &[0.8, 0.2], &nodes, 42), "deterministic by seed");
        assert_ne!(s, split("worker", &[0.8, 0.2], &nodes, 43), "another seed deals another way");
        let s = split("worker", &[0.5, 0.3, 0.2], &nodes[..7], 1);
        let on = |v: usize| s.values().filter(|x| **x == v).count();
        assert_eq!(on(0) + on(1) + on(2), 7);
        assert_eq!((on(0), on(1), on(2)), (4, 2, 1));
    }

    #[test]
    fn requirements() {
        assert!(Requirement::parse("numpy").unwrap().met_by(&["numpy==1.0".into()]));
        assert!(
            Requirement::parse("scikit-learn[alldeps]>=1.0; python_version>'3'")
                .unwrap()
                .met_by(&["scikit_learn==1.5.2".into()])
        );
        assert!(!Requirement::parse("numpy>=2").unwrap().met_by(&["numpy==1.26.4".into()]));
        assert!(Requirement::parse(">=2").is_err());
        assert!(Requirement::parse("numpy>=banana").is_err());
    }
}
