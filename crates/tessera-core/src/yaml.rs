//! The YAML reading every file of Tessera goes through (module.yaml, swarm, pipeline and
//! policy files, config overrides): the same options (duplicate keys are errors) and the
//! same error texts, which name the problem in the file's terms, not the library's, with
//! the line and field they are about ([`SpecError`]).

/// The options every Tessera YAML file is read with: duplicate keys are errors, no source
/// snippets in messages (errors name the line themselves).
pub fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        with_snippet: false,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
    }
}

/// What went wrong, without the library's position suffix or its advice about its own
/// options.
pub fn message(e: &serde_saphyr::Error) -> String {
    clean(&e.to_string())
}

/// The 1-based line and column of an error, when known.
pub fn location(e: &serde_saphyr::Error) -> Option<(usize, usize)> {
    e.location().filter(|l| l.line() > 0).map(|l| (l.line() as usize, l.column() as usize))
}

fn clean(text: &str) -> String {
    let mut m = text.to_owned();
    if let Some(i) = m.find(" at line ") {
        m.truncate(i);
    }
    if let Some(rest) = m.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(", set ").next().unwrap_or(rest).trim();
        return format!("duplicate key `{key}` (each key may appear once)");
    }
    if m.contains("rejected by the configured policy") {
        let what = m.split('`').nth(1).unwrap_or("the value");
        return format!("`{what}` is not a finite number");
    }
    m
}

/// Why a file (a swarm, a dataflow) was refused: where, which field, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// The file the line is in, when it is not the file being read (a Python swarm), or
    /// when a caller names it.
    pub file: Option<String>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// Dotted path of the field (`tasks.worker.maximum`), when known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl SpecError {
    /// An error at `at` about `field`.
    pub fn at(at: At, field: &str, message: impl Into<String>) -> SpecError {
        SpecError {
            file: None,
            line: at.line,
            column: at.column,
            field: Some(field.to_owned()),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        match (&self.file, self.line, self.column) {
            (Some(file), Some(l), _) => parts.push(format!("{file} line {l}")),
            (None, Some(l), Some(c)) => parts.push(format!("line {l}, column {c}")),
            (None, Some(l), None) => parts.push(format!("line {l}")),
            (Some(file), None, _) => parts.push(file.clone()),
            (None, None, _) => {}
        }
        if let Some(field) = &self.field {
            parts.push(field.clone());
        }
        parts.push(self.message.clone());
        f.write_str(&parts.join(": "))
    }
}

/// Where a value was written in a file (1-based), when known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct At {
    /// The line.
    pub line: Option<usize>,
    /// The column.
    pub column: Option<usize>,
}

impl At {
    /// Where a spanned value was written.
    pub fn of<T>(s: &serde_saphyr::Spanned<T>) -> At {
        let l = s.referenced;
        if l.line() > 0 {
            At { line: Some(l.line() as usize), column: Some(l.column() as usize) }
        } else {
            At::default()
        }
    }
}

/// Reads `text` as a `T` with [`options`]; a refusal names the line, the column and the
/// dotted path of the field it is about (`tasks.worker.maximum`).
pub fn from_str_located<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, SpecError> {
    let path = std::cell::RefCell::new(None::<String>);
    let raw: Result<T, _> = serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            let p = e.path().to_string().replace(".value", "");
            if p != "." && p != "?" && !p.is_empty() {
                *path.borrow_mut() = Some(p);
            }
            e.into_inner()
        })
    });
    raw.map_err(|e| {
        let loc = location(&e);
        SpecError {
            file: None,
            line: loc.map(|l| l.0),
            column: loc.map(|l| l.1),
            field: path.into_inner(),
            message: message(&e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_advice_stays_out_of_messages() {
        assert_eq!(
            clean("duplicate mapping key: name, set DuplicateKeyPolicy in Options if acceptable at line 2 column 1"),
            "duplicate key `name` (each key may appear once)"
        );
        assert_eq!(clean("non-finite float `.nan` rejected by the configured policy"), "`.nan` is not a finite number");
        assert_eq!(clean("unknown field `x` at line 3 column 1"), "unknown field `x`");
    }
}
