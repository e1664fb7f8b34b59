//! The module manager's decisions: does a new actor fit on a node, and whom to evict if not.
//!
//! Each actor reserves what its manifest's `needs` says (CPU, memory, GPUs, disk). When a new
//! actor does not fit, the manager evicts running actors by priority, lowest first, and
//! among equal priorities the oldest first (FIFO, the default when nobody sets a priority),
//! until the new one fits; when even evicting every evictable actor would not make room, it
//! refuses with the reason. Pure: the caller passes the state in.

use crate::manifest::Needs;
use crate::wire::Resources;

/// A running actor, as the manager sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Running {
    /// Its name (`path-tag`).
    pub name: String,
    /// What it reserves.
    pub needs: Needs,
    /// Higher stays longer; equal priorities leave in launch order.
    pub priority: i32,
    /// Launch order (smaller: launched earlier).
    pub launched: u64,
}

/// The manager's decision for a new actor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// It fits as things are.
    Fits,
    /// It fits once these actors (in order) are evicted.
    Evict(Vec<String>),
    /// It cannot fit; why.
    Refuse(String),
}

fn used(running: &[&Running]) -> Resources {
    let mut r = Resources::default();
    for a in running {
        r.cpu += a.needs.cpu;
        r.memory.0 = r.memory.0.saturating_add(a.needs.memory.0);
        r.gpu = r.gpu.saturating_add(a.needs.gpu);
        r.disk.0 = r.disk.0.saturating_add(a.needs.storage.0);
    }
    r
}

/// The first resource `needs` lacks on a node of `capacity` already running `running`.
fn shortfall(capacity: &Resources, running: &[&Running], needs: &Needs) -> Option<String> {
    let u = used(running);
    if needs.cpu > 0.0 && u.cpu + needs.cpu > capacity.cpu + 1e-9 {
        return Some(format!("cpu: needs {}, {} of {} free", needs.cpu, (capacity.cpu - u.cpu).max(0.0), capacity.cpu));
    }
    if needs.memory.0 > 0 && u.memory.0.saturating_add(needs.memory.0) > capacity.memory.0 {
        return Some(format!(
            "memory: needs {}, {} of {} free",
            needs.memory,
            crate::ByteSize(capacity.memory.0.saturating_sub(u.memory.0)),
            capacity.memory
        ));
    }
    if needs.gpu > 0 && u.gpu.saturating_add(needs.gpu) > capacity.gpu {
        return Some(format!(
            "gpu: needs {}, {} of {} free",
            needs.gpu,
            capacity.gpu.saturating_sub(u.gpu),
            capacity.gpu
        ));
    }
    if needs.storage.0 > 0 && u.disk.0.saturating_add(needs.storage.0) > capacity.disk.0 {
        return Some(format!(
            "disk: needs {}, {} of {} free",
            needs.storage,
            crate::ByteSize(capacity.disk.0.saturating_sub(u.disk.0)),
            capacity.disk
        ));
    }
    None
}

/// Which resources `needs` lacks on a node of `capacity` running `running`: cpu, memory,
/// gpu, disk.
fn short(capacity: &Resources, running: &[&Running], needs: &Needs) -> [bool; 4] {
    let u = used(running);
    [
        needs.cpu > 0.0 && u.cpu + needs.cpu > capacity.cpu + 1e-9,
        needs.memory.0 > 0 && u.memory.0.saturating_add(needs.memory.0) > capacity.memory.0,
        needs.gpu > 0 && u.gpu.saturating_add(needs.gpu) > capacity.gpu,
        needs.storage.0 > 0 && u.disk.0.saturating_add(needs.storage.0) > capacity.disk.0,
    ]
}

/// True when evicting `a` frees some of a resource that is short.
fn frees(a: &Running, short: [bool; 4]) -> bool {
    (short[0] && a.needs.cpu > 0.0)
        || (short[1] && a.needs.memory.0 > 0)
        || (short[2] && a.needs.gpu > 0)
        || (short[3] && a.needs.storage.0 > 0)
}

/// Decides whether an actor needing `needs` with `priority` can start on a node of
/// `capacity` running `running`. Only actors with a priority at most the newcomer's may be
/// evicted for it, and only those whose release frees some of what the newcomer lacks (an
/// actor that reserves no memory is never evicted for memory).
pub fn admit(capacity: &Resources, running: &[Running], needs: &Needs, priority: i32) -> Admission {
    let all: Vec<&Running> = running.iter().collect();
    let Some(first) = shortfall(capacity, &all, needs) else {
        return Admission::Fits;
    };
    // Eviction order: lowest priority first, then oldest first.
    let mut order: Vec<&Running> = running.iter().filter(|a| a.priority <= priority).collect();
    order.sort_by(|a, b| a.priority.cmp(&b.priority).then(a.launched.cmp(&b.launched)));
    let mut evicted = Vec::new();
    let mut left: Vec<&Running> = all;
    for victim in order {
        if !frees(victim, short(capacity, &left, needs)) {
            continue;
        }
        left.retain(|a| a.name != victim.name);
        evicted.push(victim.name.clone());
        if shortfall(capacity, &left, needs).is_none() {
            return Admission::Evict(evicted);
        }
    }
    Admission::Refuse(format!(
        "not enough room even after evicting every actor of priority {priority} or lower ({first})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ByteSize;

    fn needs(memory_mib: u64) -> Needs {
        Needs { cpu: 0.5, memory: ByteSize(memory_mib << 20), ..Needs::default() }
    }

    fn actor(name: &str, memory_mib: u64, priority: i32, launched: u64) -> Running {
        Running { name: name.into(), needs: needs(memory_mib), priority, launched }
    }

    fn node(memory_mib: u64) -> Resources {
        Resources { cpu: 2.0, memory: ByteSize(memory_mib << 20), gpu: 0, disk: ByteSize(1 << 30) }
    }

    #[test]
    fn room_for_two_evicts_the_oldest_for_a_third() {
        let cap = node(200);
        let running = vec![actor("a", 100, 0, 1), actor("b", 100, 0, 2)];
        assert_eq!(admit(&cap, &running[..1], &needs(100), 0), Admission::Fits);
        assert_eq!(admit(&cap, &running, &needs(100), 0), Admission::Evict(vec!["a".into()]));
    }

    #[test]
    fn priorities_choose_the_lowest_first() {
        let cap = node(200);
        let running = vec![actor("old-important", 100, 5, 1), actor("young-minor", 100, 1, 2)];
        assert_eq!(admit(&cap, &running, &needs(100), 5), Admission::Evict(vec!["young-minor".into()]));
        // A newcomer may not push out actors that matter more than it does.
        assert!(matches!(admit(&cap, &running, &needs(100), 0), Admission::Refuse(_)));
    }

    #[test]
    fn evicts_as_many_as_needed_and_refuses_the_impossible() {
        let cap = node(300);
        let running = vec![actor("a", 100, 0, 1), actor("b", 100, 0, 2), actor("c", 100, 0, 3)];
        assert_eq!(admit(&cap, &running, &needs(200), 0), Admission::Evict(vec!["a".into(), "b".into()]));
        let Admission::Refuse(why) = admit(&cap, &running, &needs(400), 0) else { panic!() };
        assert!(why.contains("memory"), "{why}");
        let gpu = Needs { gpu: 1, ..Needs::default() };
        let Admission::Refuse(why) = admit(&cap, &[], &gpu, 0) else { panic!() };
        assert!(why.contains("gpu"), "{why}");
        // Modules that ask for nothing always fit, and actors that reserve none of what a
        // newcomer lacks are never evicted for it.
        let cpu_only = Needs { cpu: 1.0, ..Needs::default() };
        let free_riders = vec![
            Running { name: "zero".into(), needs: Needs::default(), priority: 0, launched: 1 },
            Running {
                name: "mem".into(),
                needs: Needs { memory: ByteSize(1 << 20), ..Needs::default() },
                priority: 0,
                launched: 2,
            },
            Running { name: "cpu".into(), needs: cpu_only.clone(), priority: 0, launched: 3 },
        ];
        let one_cpu = Resources { cpu: 1.0, ..node(300) };
        assert_eq!(admit(&one_cpu, &free_riders, &cpu_only, 0), Admission::Evict(vec!["cpu".into()]));
        // Modules that ask for nothing always fit.
        assert_eq!(admit(&cap, &running, &Needs::default(), 0), Admission::Fits);
    }
}
