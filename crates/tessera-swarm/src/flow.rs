//! The flow of a swarm: which task's outputs feed which, and the order stages run in.
//!
//! Within an iteration the flow must be acyclic once the edges out of the scheduler are
//! set aside: those carry the scheduler's outputs into the next iteration, so a cycle
//! through the scheduler is the iteration loop, and any other cycle would never end.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Most distinct task names a flow may mention (a swarm has at most
/// [`crate::spec::MAX_TASKS`] tasks; this bounds the work on a hostile flow before that is
/// checked).
const MAX_NAMES: usize = 1024;

/// `from -> to`: the outputs of `from` are inputs of `to`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Edge {
    /// The producing task.
    pub from: String,
    /// The consuming task.
    pub to: String,
}

/// Reads the flow's chains: each item is `a -> b -> c` (or one name); a list of single
/// names is one chain in list order. Returns the edges and every task mentioned, in order
/// of first mention.
pub fn parse(items: &[String]) -> Result<(Vec<Edge>, Vec<String>), String> {
    if items.is_empty() {
        return Err("the flow is empty; write the stages as `worker -> aggregator -> scheduler`".into());
    }
    let chains: Vec<Vec<String>> = if items.iter().all(|i| !i.contains("->")) {
        vec![items.iter().map(|i| i.trim().to_owned()).collect()]
    } else {
        items.iter().map(|i| i.split("->").map(|t| t.trim().to_owned()).collect()).collect()
    };
    let mut edges: Vec<Edge> = Vec::new();
    let mut mentioned: Vec<String> = Vec::new();
    // Sets beside the ordered lists: a long flow is read in n log n, not n².
    let mut seen_tasks: BTreeSet<&str> = BTreeSet::new();
    let mut seen_edges: BTreeSet<(&str, &str)> = BTreeSet::new();
    for chain in &chains {
        if let Some(empty) = chain.iter().position(String::is_empty) {
            return Err(format!("a chain has an empty step (step {}): write `a -> b -> c`", empty + 1));
        }
        for t in chain {
            if seen_tasks.insert(t) {
                if seen_tasks.len() > MAX_NAMES {
                    return Err(format!("the flow names more than {MAX_NAMES} tasks"));
                }
                mentioned.push(t.clone());
            }
        }
        for w in chain.windows(2) {
            if seen_edges.insert((&w[0], &w[1])) {
                edges.push(Edge { from: w[0].clone(), to: w[1].clone() });
            }
        }
    }
    Ok((edges, mentioned))
}

/// Checks that the flow, without the edges out of `scheduler`, has no cycle; names the
/// cycle when it has one.
pub fn check(tasks: &[String], edges: &[Edge], scheduler: Option<&str>) -> Result<(), String> {
    order(tasks, edges, scheduler).map(|_| ())
}

/// The order stages run in: every task after those feeding it in the same iteration; ties
/// in order of first mention in the flow, then by name.
pub fn order(tasks: &[String], edges: &[Edge], scheduler: Option<&str>) -> Result<Vec<String>, String> {
    let inner: Vec<&Edge> = edges.iter().filter(|e| Some(e.from.as_str()) != scheduler).collect();
    let mut rank: BTreeMap<&str, usize> = BTreeMap::new();
    for e in edges {
        for t in [&e.from, &e.to] {
            let next = rank.len();
            rank.entry(t.as_str()).or_insert(next);
        }
    }
    let key = |t: &str| (rank.get(t).copied().unwrap_or(usize::MAX), t.to_owned());
    let mut indegree: BTreeMap<&str, usize> = tasks.iter().map(|t| (t.as_str(), 0)).collect();
    for e in &inner {
        *indegree.entry(e.to.as_str()).or_default() += 1;
        indegree.entry(e.from.as_str()).or_default();
    }
    let mut ready: BTreeSet<(usize, String)> = indegree.iter().filter(|(_, d)| **d == 0).map(|(t, _)| key(t)).collect();
    let mut out = Vec::new();
    while let Some(next) = ready.pop_first() {
        let t = next.1;
        for e in inner.iter().filter(|e| e.from == t) {
            let d = indegree.get_mut(e.to.as_str()).expect("counted");
            *d -= 1;
            if *d == 0 {
                ready.insert(key(&e.to));
            }
        }
        out.push(t);
    }
    if out.len() < indegree.len() {
        let left: BTreeSet<&str> = indegree.iter().filter(|(_, d)| **d > 0).map(|(t, _)| *t).collect();
        let cycle = find_cycle(&left, &inner);
        let why = match scheduler {
            None => "and no scheduler to end it; name the task that decides whether another iteration runs with `scheduler:`".to_owned(),
            Some(s) => format!("that does not pass through the scheduler `{s}`, so nothing ends it"),
        };
        return Err(format!("the flow has a cycle {} {why}", cycle.join(" -> ")));
    }
    Ok(out)
}

/// One cycle among `left` (tasks that never became ready), as `a -> b -> a`.
fn find_cycle(left: &BTreeSet<&str>, edges: &[&Edge]) -> Vec<String> {
    let Some(start) = left.iter().next() else { return Vec::new() };
    let mut path: Vec<&str> = vec![start];
    let mut at = *start;
    loop {
        let Some(next) = edges.iter().find(|e| e.from == at && left.contains(e.to.as_str())).map(|e| e.to.as_str())
        else {
            return path.iter().map(|s| s.to_string()).collect();
        };
        if let Some(i) = path.iter().position(|p| *p == next) {
            let mut cycle: Vec<String> = path[i..].iter().map(|s| s.to_string()).collect();
            cycle.push(next.to_owned());
            return cycle;
        }
        path.push(next);
        at = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn chains_and_order() {
        let (e, m) = parse(&names(&["a -> b -> c"])).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(m, ["a", "b", "c"]);
        let (e, _) = parse(&names(&["a", "b", "c"])).unwrap();
        assert_eq!(e, parse(&names(&["a -> b -> c"])).unwrap().0);
        // A diamond: a feeds b and c, both feed d.
        let (e, _) = parse(&names(&["a -> b -> d", "a -> c -> d"])).unwrap();
        assert_eq!(order(&names(&["a", "b", "c", "d"]), &e, None).unwrap(), ["a", "b", "c", "d"]);
        assert!(parse(&names(&["a -> -> b"])).is_err());
        assert!(parse(&[]).is_err());
    }

    #[test]
    fn cycles_are_named() {
        let (e, _) = parse(&names(&["a -> b -> c -> a"])).unwrap();
        let err = check(&names(&["a", "b", "c"]), &e, None).unwrap_err();
        assert!(err.contains("a -> b -> c -> a"), "{err}");
        let (e2, _) = parse(&names(&["a -> b -> a", "b -> c"])).unwrap();
        let err = check(&names(&["a", "b", "c"]), &e2, Some("c")).unwrap_err();
        assert!(err.contains("a -> b -> a") && err.contains("does not pass through the scheduler `c`"), "{err}");
        // Through the scheduler it is the iteration loop... only if the scheduler's edge closes it.
        assert_eq!(order(&names(&["a", "b", "c"]), &e, Some("c")).unwrap(), ["a", "b", "c"]);
        let (e, _) = parse(&names(&["a -> a"])).unwrap();
        assert!(check(&names(&["a"]), &e, None).is_err());
        assert!(check(&names(&["a"]), &e, Some("a")).is_ok());
    }
}
