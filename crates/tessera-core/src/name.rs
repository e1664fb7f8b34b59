//! Names: module paths (`fl.softmax.worker`), actor tags, node ids and world-state keys.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest module path accepted, in bytes.
pub const MAX_PATH_LEN: usize = 128;
/// Most segments a module path may have.
pub const MAX_SEGMENTS: usize = 16;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The module path breaks the grammar.
    #[error(
        "invalid module path {given:?}: {why} (a module path is dot-separated segments of lowercase letters, digits, '_' and '-', each starting with a letter, e.g. fl.softmax.worker)"
    )]
    ModulePath {
        /// The input (truncated).
        given: String,
        /// What is wrong.
        why: &'static str,
    },
    /// An identifier (node id, key, tag) breaks the grammar.
    #[error("invalid {what} {given:?}: {why}")]
    Ident {
        /// What kind of identifier.
        what: &'static str,
        /// The input (truncated).
        given: String,
        /// What is wrong.
        why: &'static str,
    },
}

/// A module's name: a dotted path that mirrors its place in the module tree.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModulePath(String);

impl ModulePath {
    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The dot-separated segments.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }
    /// True when `prefix` is this path or one of its ancestors (`fl` and `fl.softmax` are
    /// prefixes of `fl.softmax.worker`; `fl.soft` is not).
    pub fn has_prefix(&self, prefix: &str) -> bool {
        prefix.is_empty()
            || self.0 == prefix
            || (self.0.starts_with(prefix) && self.0.as_bytes().get(prefix.len()) == Some(&b'.'))
    }
    /// The default input queue name, `<path>.in`.
    pub fn in_queue(&self) -> String {
        format!("{}.in", self.0)
    }
    /// The default output queue name, `<path>.out`.
    pub fn out_queue(&self) -> String {
        format!("{}.out", self.0)
    }
}

fn truncated(s: &str) -> String {
    s.chars().take(80).collect()
}

impl FromStr for ModulePath {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| NameError::ModulePath { given: truncated(s), why };
        if s.is_empty() {
            return Err(err("it is empty"));
        }
        if s.len() > MAX_PATH_LEN {
            return Err(err("it is longer than 128 bytes"));
        }
        let mut n = 0;
        for seg in s.split('.') {
            n += 1;
            let mut chars = seg.chars();
            match chars.next() {
                None => return Err(err("it has an empty segment")),
                Some(c) if !c.is_ascii_lowercase() => {
                    return Err(err("a segment does not start with a lowercase letter"));
                }
                _ => {}
            }
            if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-') {
                return Err(err("a segment has a character other than a-z, 0-9, '_' or '-'"));
            }
        }
        if n > MAX_SEGMENTS {
            return Err(err("it has more than 16 segments"));
        }
        Ok(ModulePath(s.to_owned()))
    }
}

impl fmt::Display for ModulePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for ModulePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModulePath({})", self.0)
    }
}
impl Serialize for ModulePath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}
impl<'de> Deserialize<'de> for ModulePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for ModulePath {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .pattern(Some("^[a-z][a-z0-9_-]*(\\.[a-z][a-z0-9_-]*)*$"))
            .description(Some("a module path, e.g. fl.softmax.worker"))
            .into()
    }
}
#[cfg(feature = "openapi")]
impl utoipa::ToSchema for ModulePath {}

/// Checks an identifier used as a node id, session id, actor tag or dataset name: 1 to 64
/// characters from `[A-Za-z0-9_-]`. These travel in queue names and keys, so no dots,
/// slashes or spaces.
pub fn check_ident(what: &'static str, s: &str) -> Result<(), NameError> {
    let err = |why| NameError::Ident { what, given: truncated(s), why };
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    if s.len() > 64 {
        return Err(err("it is longer than 64 characters"));
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(err("only letters, digits, '_' and '-' are allowed"));
    }
    Ok(())
}

/// Most characters in one part of a Component Repository entry's name (an `id`, a
/// `model_name`, a `model_version`).
pub const MAX_ENTRY_PART: usize = 200;

/// Checks one part of a Component Repository entry's name: 1 to [`MAX_ENTRY_PART`]
/// characters from `[A-Za-z0-9_.+-]`, not starting or ending with `.`, no `..`, and not
/// `meta` (a word its routes use).
///
/// # Errors
/// What is wrong, for the caller to name the field with.
pub fn check_entry_part(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("it is empty".into());
    }
    if s.len() > MAX_ENTRY_PART {
        return Err(format!("it is longer than {MAX_ENTRY_PART} characters"));
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+')) {
        return Err("only letters, digits and '_', '-', '.', '+' are allowed".into());
    }
    if s.starts_with('.') || s.ends_with('.') || s.contains("..") {
        return Err("it has an empty dotted segment".into());
    }
    if s == "meta" {
        return Err("`meta` is reserved by the routes".into());
    }
    Ok(())
}

/// Checks a world-state key or queue name: 1 to 255 characters from
/// `[A-Za-z0-9_-=./]`, not starting or ending with `.` or `/`, with no empty `..` segment.
/// This is the portable subset of what both the in-process store and NATS KV accept.
pub fn check_key(what: &'static str, s: &str) -> Result<(), NameError> {
    let err = |why| NameError::Ident { what, given: truncated(s), why };
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    if s.len() > 255 {
        return Err(err("it is longer than 255 characters"));
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '=' | '.' | '/')) {
        return Err(err("only letters, digits and '_', '-', '=', '.', '/' are allowed"));
    }
    if s.starts_with(['.', '/']) || s.ends_with(['.', '/']) || s.contains("..") || s.contains("//") {
        return Err(err("it has an empty segment"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dotted_paths() {
        for ok in ["fl", "fl.softmax.worker", "model.transformer-1", "a1.b_2.c-3"] {
            assert_eq!(ok.parse::<ModulePath>().unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_bad_paths() {
        for bad in ["", ".fl", "fl.", "fl..worker", "Fl.worker", "1fl", "fl/worker", "fl worker", "../etc", "fl.wörker"]
        {
            assert!(bad.parse::<ModulePath>().is_err(), "{bad:?} accepted");
        }
        assert!("a".repeat(129).parse::<ModulePath>().is_err());
        assert!(vec!["a"; 17].join(".").parse::<ModulePath>().is_err());
    }

    #[test]
    fn prefixes_follow_segments() {
        let p: ModulePath = "fl.softmax.worker".parse().unwrap();
        assert!(p.has_prefix(""));
        assert!(p.has_prefix("fl"));
        assert!(p.has_prefix("fl.softmax"));
        assert!(p.has_prefix("fl.softmax.worker"));
        assert!(!p.has_prefix("fl.soft"));
        assert!(!p.has_prefix("fl.softmax.worker.x"));
        assert_eq!(p.in_queue(), "fl.softmax.worker.in");
    }

    #[test]
    fn idents_and_keys() {
        assert!(check_ident("node id", "node-1").is_ok());
        assert!(check_ident("node id", "node.1").is_err());
        assert!(check_ident("node id", "").is_err());
        assert!(check_key("key", "session/abc/round=3").is_ok());
        for bad in ["", "/a", "a/", "a..b", "a//b", "a b", "a*", "a>"] {
            assert!(check_key("key", bad).is_err(), "{bad:?} accepted");
        }
    }
}
