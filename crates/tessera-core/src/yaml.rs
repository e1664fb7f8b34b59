//! The YAML reading every file of Tessera goes through (module.yaml, swarm, pipeline and
//! policy files, config overrides): the same options (duplicate keys are errors) and the
//! same error texts, which name the problem in the file's terms, not the library's.

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
