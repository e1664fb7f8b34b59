//! Checks `--json` output against the fields docs/json.md documents for the command.
#![allow(dead_code)] // each test binary uses part of it

use serde_json::Value;

const DOC: &str = include_str!("../../../../docs/json.md");

/// Commands whose output the live-module tests check (they need a Python actor).
pub const CHECKED_IN_LIVE: [&str; 2] = ["tessera actors", "tessera queue len"];

/// The documented commands: `(path, shape, fields)`.
pub fn documented() -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in DOC.lines() {
        if let Some(path) = line.strip_prefix("## `").and_then(|l| l.strip_suffix('`')) {
            current = Some((path.to_owned(), String::new()));
        } else if let Some(shape) = line.strip_prefix("- shape: ") {
            if let Some(c) = current.as_mut() {
                c.1 = shape.trim().to_owned();
            }
        } else if let Some(fields) = line.strip_prefix("- fields: ") {
            let (path, shape) = current.take().expect("a fields line under a command heading");
            let fields = fields.split(", ").map(|f| f.trim().trim_matches('`').to_owned()).collect();
            out.push((path, shape, fields));
        }
    }
    out
}

/// Asserts that `stdout` of `tessera <path> --json` parses in the documented shape, holds at
/// least one object, and that every object has every documented field.
pub fn check(path: &str, stdout: &str) {
    let (_, shape, fields) = documented()
        .into_iter()
        .find(|(p, _, _)| p == path)
        .unwrap_or_else(|| panic!("`{path}` is not documented in docs/json.md"));
    let objects: Vec<Value> = match shape.as_str() {
        "array" => match serde_json::from_str(stdout) {
            Ok(Value::Array(items)) => items,
            other => panic!("`{path} --json` should print an array, printed {other:?}: {stdout}"),
        },
        "object" => vec![serde_json::from_str(stdout).unwrap_or_else(|e| panic!("`{path} --json`: {e}: {stdout}"))],
        "lines" => stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("`{path} --json` line {l:?}: {e}")))
            .collect(),
        other => panic!("docs/json.md: `{path}` has unknown shape {other:?}"),
    };
    assert!(!objects.is_empty(), "`{path} --json` printed nothing to check: {stdout}");
    for o in &objects {
        let map = o.as_object().unwrap_or_else(|| panic!("`{path} --json` printed a non-object {o}"));
        for f in &fields {
            assert!(map.contains_key(f), "`{path} --json` lacks the documented field `{f}`: {o}");
        }
    }
}
