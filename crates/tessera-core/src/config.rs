//! Config trees and overrides: `--set dataset.batch_size=12` merged into a module's
//! default config, keeping the types the default declares.

use serde_json::{Map, Value};

/// Why an override was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The override is not `path=value`.
    #[error("override {0:?} must look like key.path=value")]
    Syntax(String),
    /// The path has an empty or malformed segment.
    #[error("override {0:?}: the key path has an empty segment")]
    Path(String),
    /// The value does not parse.
    #[error("override {key}: cannot read value {value:?}: {why}")]
    Value {
        /// The key path.
        key: String,
        /// The raw value.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// The value's type does not match the default's.
    #[error("override {key}: the default is {expected}, so {value:?} is not accepted")]
    Type {
        /// The key path.
        key: String,
        /// The type of the default.
        expected: &'static str,
        /// The raw value.
        value: String,
    },
    /// A segment of the path runs through something that is not a mapping.
    #[error("override {key}: {at} is {found}, not a mapping")]
    NotAMapping {
        /// The key path.
        key: String,
        /// The prefix that is not a mapping.
        at: String,
        /// Its type.
        found: &'static str,
    },
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Parses an override value the way YAML reads a scalar or a flow collection:
/// `12` is an integer, `0.5` a float, `true` a boolean, `[1, 2]` a list, anything
/// else a string.
pub fn parse_value(raw: &str) -> Result<Value, String> {
    if raw.trim().is_empty() {
        return Ok(Value::String(String::new()));
    }
    let v = serde_saphyr::from_str_with_options::<Value>(raw, crate::yaml::options())
        .map_err(|e| crate::yaml::message(&e))?;
    // YAML's .nan and .inf read as numbers JSON cannot hold (they would become null).
    if v.is_null() && !matches!(raw.trim(), "null" | "Null" | "NULL" | "~") {
        return Err(format!("{} is not a finite number", raw.trim()));
    }
    Ok(v)
}

/// Parses a command-line number that must be finite (`nan` and `inf` are refused, as JSON
/// configs cannot hold them).
pub fn parse_finite(text: &str) -> Result<f64, String> {
    let v: f64 = text.trim().parse().map_err(|_| format!("{text:?} is not a number"))?;
    if !v.is_finite() {
        return Err(format!("{text} is not a finite number"));
    }
    Ok(v)
}

/// Applies one `key.path=value` override to a config tree, keeping the type of the value
/// it replaces: an integer default takes integers, a float default takes any number, a
/// string default takes the text as written, a boolean takes booleans. New keys take the
/// type their value reads as.
pub fn apply_override(config: &mut Value, spec: &str) -> Result<(), ConfigError> {
    let (key, raw) = spec.split_once('=').ok_or_else(|| ConfigError::Syntax(spec.to_owned()))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(ConfigError::Syntax(spec.to_owned()));
    }
    let segments: Vec<&str> = key.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(ConfigError::Path(spec.to_owned()));
    }
    let parsed =
        parse_value(raw).map_err(|why| ConfigError::Value { key: key.to_owned(), value: raw.to_owned(), why })?;
    if !config.is_object() {
        *config = Value::Object(Map::new());
    }
    let mut node = config;
    for (i, seg) in segments.iter().enumerate() {
        let map = match node {
            Value::Object(m) => m,
            other => {
                return Err(ConfigError::NotAMapping {
                    key: key.to_owned(),
                    at: segments[..i].join("."),
                    found: type_name(other),
                });
            }
        };
        if i + 1 == segments.len() {
            let slot = map.entry((*seg).to_owned()).or_insert(Value::Null);
            let expected = type_name(slot);
            return match coerce(slot, parsed, raw) {
                Some(v) => {
                    *slot = v;
                    Ok(())
                }
                None => Err(ConfigError::Type { key: key.to_owned(), expected, value: raw.to_owned() }),
            };
        }
        node = map.entry((*seg).to_owned()).or_insert_with(|| Value::Object(Map::new()));
    }
    unreachable!("the loop returns at the last segment")
}

fn coerce(old: &Value, new: Value, raw: &str) -> Option<Value> {
    match (old, new) {
        (Value::Null, v) => Some(v),
        (Value::String(_), Value::String(s)) => Some(Value::String(s)),
        (Value::String(_), _) => Some(Value::String(raw.trim().to_owned())),
        (Value::Bool(_), Value::Bool(b)) => Some(Value::Bool(b)),
        (Value::Number(o), Value::Number(n)) => {
            if o.is_f64() {
                n.as_f64().and_then(serde_json::Number::from_f64).map(Value::Number)
            } else if n.is_f64() {
                None
            } else {
                Some(Value::Number(n))
            }
        }
        (Value::Array(_), Value::Array(a)) => Some(Value::Array(a)),
        (Value::Object(_), Value::Object(m)) => Some(Value::Object(m)),
        _ => None,
    }
}

/// Applies overrides in order.
pub fn apply_overrides<'a>(config: &mut Value, specs: impl IntoIterator<Item = &'a str>) -> Result<(), ConfigError> {
    for s in specs {
        apply_override(config, s)?;
    }
    Ok(())
}

/// Deep-merges `overlay` into `base`: mappings merge key by key, anything else replaces.
pub fn deep_merge(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => deep_merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"lr": 0.1, "epochs": 1, "name": "digits", "shuffle": true,
               "dataset": {"batch_size": 32, "splits": [0.8, 0.2]}})
    }

    #[test]
    fn keeps_types() {
        let mut c = base();
        apply_override(&mut c, "dataset.batch_size=12").unwrap();
        assert_eq!(c["dataset"]["batch_size"], json!(12));
        apply_override(&mut c, "lr=1").unwrap();
        assert!(c["lr"].is_f64());
        assert_eq!(c["lr"], json!(1.0));
        apply_override(&mut c, "name=123").unwrap();
        assert_eq!(c["name"], json!("123"));
        apply_override(&mut c, "shuffle=false").unwrap();
        assert_eq!(c["shuffle"], json!(false));
        apply_override(&mut c, "dataset.splits=[0.5, 0.5]").unwrap();
        assert_eq!(c["dataset"]["splits"], json!([0.5, 0.5]));
        // Other keys are untouched.
        assert_eq!(c["epochs"], json!(1));
    }

    #[test]
    fn new_keys_are_inferred() {
        let mut c = base();
        apply_override(&mut c, "optimizer.momentum=0.9").unwrap();
        apply_override(&mut c, "tag=v1").unwrap();
        apply_override(&mut c, "seed=7").unwrap();
        assert_eq!(c["optimizer"]["momentum"], json!(0.9));
        assert_eq!(c["tag"], json!("v1"));
        assert_eq!(c["seed"], json!(7));
    }

    #[test]
    fn refuses_type_changes_and_bad_syntax() {
        let mut c = base();
        let before = c.clone();
        assert!(matches!(apply_override(&mut c, "epochs=1.5"), Err(ConfigError::Type { .. })));
        assert!(matches!(apply_override(&mut c, "shuffle=maybe"), Err(ConfigError::Type { .. })));
        assert!(matches!(apply_override(&mut c, "dataset=3"), Err(ConfigError::Type { .. })));
        assert!(matches!(apply_override(&mut c, "lr"), Err(ConfigError::Syntax(_))));
        assert!(matches!(apply_override(&mut c, "=3"), Err(ConfigError::Syntax(_))));
        assert!(matches!(apply_override(&mut c, "a..b=3"), Err(ConfigError::Path(_))));
        assert!(matches!(apply_override(&mut c, "lr.x=3"), Err(ConfigError::NotAMapping { .. })));
        assert!(matches!(apply_override(&mut c, "x=[1, 2"), Err(ConfigError::Value { .. })));
        assert_eq!(c, before, "a refused override changes nothing");
        let e = apply_override(&mut c, "epochs=1.5").unwrap_err().to_string();
        assert!(e.contains("epochs") && e.contains("integer"), "{e}");
    }

    #[test]
    fn deep_merge_merges_mappings() {
        let mut c = base();
        deep_merge(&mut c, &json!({"dataset": {"batch_size": 8}, "extra": 1}));
        assert_eq!(c["dataset"]["batch_size"], json!(8));
        assert_eq!(c["dataset"]["splits"], json!([0.8, 0.2]));
        assert_eq!(c["extra"], json!(1));
    }
}
