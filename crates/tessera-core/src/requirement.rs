//! Library requirements (`needs.libraries`, a module's `requirements.txt`): the name and
//! version part of PEP 508 (`numpy>=1.26`, `torch`, `scikit-learn==1.5.*`), checked against
//! what an interpreter has, and written back in one canonical form.

use std::str::FromStr;

/// A library requirement as PEP 508 writes its name and version part (`numpy>=1.26`,
/// `torch`, `scikit-learn==1.5.*`); extras and environment markers are not read.
#[derive(Clone, Debug)]
pub struct Requirement {
    name: String,
    specifiers: pep440_rs::VersionSpecifiers,
}

impl Requirement {
    /// Parses a requirement.
    pub fn parse(text: &str) -> Result<Requirement, String> {
        let text = text.split(';').next().unwrap_or_default().trim();
        let at = text.find(['<', '>', '=', '!', '~', '[', '(', ' ']).unwrap_or(text.len());
        let name = &text[..at];
        // PEP 508: letters and digits at both ends, `-`, `_` and `.` only inside.
        let ends = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        if !ends(name.chars().next())
            || !ends(name.chars().last())
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!("{text:?} does not start with a distribution name"));
        }
        let mut rest = text[at..].trim();
        if rest.starts_with('[') {
            rest = rest.split_once(']').map_or("", |(_, r)| r).trim();
        }
        let rest = rest.trim_start_matches('(').trim_end_matches(')');
        let specifiers = pep440_rs::VersionSpecifiers::from_str(rest).map_err(|e| format!("{text:?}: {e}"))?;
        Ok(Requirement { name: crate::manifest::normalize_distribution(name), specifiers })
    }

    /// True when `offered` (`name==version` items) has the library in a version the
    /// requirement accepts.
    pub fn met_by(&self, offered: &[String]) -> bool {
        offered.iter().any(|o| {
            let Some((name, version)) = o.split_once("==") else { return false };
            crate::manifest::normalize_distribution(name) == self.name
                && pep440_rs::Version::from_str(version.trim()).is_ok_and(|v| self.specifiers.contains(&v))
        })
    }
}

impl Requirement {
    /// The distribution name, normalised (PEP 503).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for Requirement {
    /// `name` and the specifiers (`scikit-learn==1.5.2`, `numpy<3,>=1.26`): nothing else a
    /// requirement line could say (URLs, paths, options) survives parsing.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.name, self.specifiers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_keep_only_a_name_and_versions() {
        let r = Requirement::parse("Scikit_Learn==1.5.2 ; python_version > '3'").unwrap();
        assert_eq!(r.to_string(), "scikit-learn==1.5.2");
        assert!(r.met_by(&["scikit-learn==1.5.2".into()]));
        assert!(!r.met_by(&["scikit-learn==1.4.2".into()]));
        assert_eq!(Requirement::parse("numpy").unwrap().to_string(), "numpy");
        for hostile in ["--index-url=http://x", "-r other.txt", "./local", "pkg @ https://x/y.whl", "../..", "", "a==x"]
        {
            assert!(Requirement::parse(hostile).is_err(), "{hostile:?}");
        }
    }
}
