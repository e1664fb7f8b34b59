//! A flow as a graph, for people: Mermaid (`flowchart LR`) or Graphviz (`digraph`) text.
//! Operations are boxes; values given to a context come from an `inputs` node; each edge
//! is an operation's output feeding another's input (or condition), labelled with its
//! definition.

use std::collections::BTreeSet;

use crate::spec::{DataFlow, Origin};

/// The text formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Mermaid's `flowchart LR`.
    Mermaid,
    /// Graphviz's `digraph`.
    Dot,
}

/// Every edge: (from, to, label) with `inputs` for values given to the context; a
/// condition's label ends with `?`.
pub fn edges(flow: &DataFlow) -> Vec<(String, String, String)> {
    let mut out = BTreeSet::new();
    for (name, op) in &flow.operations {
        let wanted = op
            .inputs
            .iter()
            .map(|(p, d)| (p.as_str(), d, false))
            .chain(op.conditions.iter().map(|c| ("conditions", c, true)));
        for (param, d, condition) in wanted {
            let label = if condition { format!("{d}?") } else { d.clone() };
            for origin in flow.origins(name, param, d) {
                let from = match origin {
                    Origin::Seed if flow.inputs.contains(d) || flow.seed.iter().any(|(s, _)| s == d) => {
                        "inputs".to_owned()
                    }
                    Origin::Seed => continue,
                    Origin::Output { operation, output } => {
                        if flow.operations.get(&operation).and_then(|o| o.outputs.get(&output)) != Some(d) {
                            continue;
                        }
                        operation
                    }
                };
                out.insert((from, name.clone(), label.clone()));
            }
        }
    }
    out.into_iter().collect()
}

/// The graph as text.
pub fn render(flow: &DataFlow, format: Format) -> String {
    let edges = edges(flow);
    let what = |op: &crate::Operation| if op.subflow.is_some() { "subflow".to_owned() } else { op.function.clone() };
    let mut text = String::new();
    match format {
        Format::Mermaid => {
            text.push_str("flowchart LR\n");
            text.push_str("    inputs([inputs])\n");
            for (name, op) in &flow.operations {
                text.push_str(&format!("    {name}[\"{name}<br/>{}\"]\n", what(op)));
            }
            for (from, to, label) in &edges {
                text.push_str(&format!("    {from} -->|{label}| {to}\n"));
            }
        }
        Format::Dot => {
            text.push_str("digraph dataflow {\n    rankdir=LR;\n    inputs [shape=oval];\n");
            for (name, op) in &flow.operations {
                text.push_str(&format!("    \"{name}\" [shape=box, label=\"{name}\\n{}\"];\n", what(op)));
            }
            for (from, to, label) in &edges {
                text.push_str(&format!("    \"{from}\" -> \"{to}\" [label=\"{label}\"];\n"));
            }
            text.push_str("}\n");
        }
    }
    text
}
