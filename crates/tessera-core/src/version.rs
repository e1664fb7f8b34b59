//! Versions and references to packages: `fl.softmax.worker`, `fl.softmax.worker@0.1.1`,
//! `fl.softmax.worker@latest`, `b3:<digest>`, and `transformation/custom.scale`: the
//! object of a Component Repository entry that is a Tessera package.

use std::fmt;
use std::str::FromStr;

pub use semver::{BuildMetadata, Prerelease, Version, VersionReq};

use crate::name::{NameError, check_ident};
use crate::{Digest, ModulePath};

/// The longest version a package or a model may have, in bytes (like a name's bound: a
/// version goes into file names, `NAME-VERSION.safetensors`, and listings).
pub const MAX_VERSION_LEN: usize = 128;

/// The alias every package has: its highest non-prerelease version (or highest
/// prerelease when there is no release).
pub const LATEST: &str = "latest";

/// Which version of a package a reference means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// One exact version.
    Exact(Version),
    /// An alias (`latest`, or one set by the owner, e.g. `stable`).
    Alias(String),
    /// A range (`^1.2`, `~1.2.3`, `>=1.0, <2.0`): the highest published version in it,
    /// with Cargo's reading of semver requirements (pre-releases only when the range names
    /// one of the same `major.minor.patch`).
    Range(VersionReq),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Exact(v) => write!(f, "{v}"),
            Selector::Alias(a) => f.write_str(a),
            Selector::Range(r) => write!(f, "{r}"),
        }
    }
}

impl FromStr for Selector {
    type Err = RefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with(|c: char| c.is_ascii_digit()) {
            return Version::parse(s)
                .map(Selector::Exact)
                .map_err(|e| RefError::Version(s.chars().take(80).collect(), e.to_string()));
        }
        if s.starts_with(['^', '~', '=', '>', '<', '*']) {
            if s.len() > 200 {
                return Err(RefError::Range(s.chars().take(80).collect(), "it is longer than 200 characters".into()));
            }
            return VersionReq::parse(s)
                .map(Selector::Range)
                .map_err(|e| RefError::Range(s.chars().take(80).collect(), e.to_string()));
        }
        check_alias(s)?;
        Ok(Selector::Alias(s.to_owned()))
    }
}

/// Checks an alias name: an identifier starting with a letter.
pub fn check_alias(s: &str) -> Result<(), RefError> {
    check_ident("alias", s)?;
    if !s.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(RefError::Alias(s.chars().take(80).collect()));
    }
    Ok(())
}

/// A reference to a package: a name and a selector, or a bare digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PackageRef {
    /// `name[@version|@alias]`; a bare name means `@latest`.
    Named {
        /// The module path.
        name: ModulePath,
        /// Which version.
        selector: Selector,
    },
    /// `b3:<hex>`: exactly these bytes.
    Digest(Digest),
    /// `transformation/<id>`, `service/<id>` or `inferencer/<id>`: the current object of
    /// that Component Repository entry on the hub, which must be a Tessera package; the
    /// entry's `needs` are joined to the package's own (see [`crate::manifest::Needs::joined`]),
    /// so placement judges nodes by both.
    Component {
        /// Which collection.
        collection: ComponentCollection,
        /// The entry's `id` (see [`crate::name::check_entry_part`]).
        id: String,
    },
}

/// The Component Repository's collections whose entries can name a runnable object
/// (models are data, not modules).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ComponentCollection {
    /// Pre- and post-processing steps.
    Transformation,
    /// Services.
    Service,
    /// Inferencers.
    Inferencer,
}

impl ComponentCollection {
    /// All of them.
    pub const ALL: [ComponentCollection; 3] =
        [ComponentCollection::Transformation, ComponentCollection::Service, ComponentCollection::Inferencer];

    /// Its name in references and routes.
    pub fn name(self) -> &'static str {
        match self {
            ComponentCollection::Transformation => "transformation",
            ComponentCollection::Service => "service",
            ComponentCollection::Inferencer => "inferencer",
        }
    }
}

/// Why a reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    /// The name part is not a module path.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The version part is not semver.
    #[error("invalid version {0:?}: {1} (versions are semver, e.g. 0.1.0)")]
    Version(String, String),
    /// The range part is not a semver requirement.
    #[error("invalid version range {0:?}: {1} (ranges are semver requirements, e.g. ^1.2 or >=1.0, <2.0)")]
    Range(String, String),
    /// The alias part is not an identifier.
    #[error("invalid alias {0:?}: an alias starts with a letter")]
    Alias(String),
    /// The digest part is malformed.
    #[error(transparent)]
    Digest(#[from] crate::digest::DigestError),
    /// A `collection/id` reference names no runnable collection or an invalid id.
    #[error("invalid component reference {0:?}: {1}")]
    Component(String, String),
}

impl FromStr for PackageRef {
    type Err = RefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("b3:") {
            return Ok(PackageRef::Digest(s.parse()?));
        }
        if let Some((collection, id)) = s.split_once('/') {
            let given = || s.chars().take(80).collect::<String>();
            let collection =
                ComponentCollection::ALL.into_iter().find(|c| c.name() == collection).ok_or_else(|| {
                    RefError::Component(given(), "the collection is transformation, service or inferencer".into())
                })?;
            crate::name::check_entry_part(id).map_err(|why| RefError::Component(given(), format!("the id: {why}")))?;
            return Ok(PackageRef::Component { collection, id: id.to_owned() });
        }
        let (name, selector) = match s.split_once('@') {
            Some((n, v)) => (n, v.parse()?),
            None => (s, Selector::Alias(LATEST.to_owned())),
        };
        Ok(PackageRef::Named { name: name.parse()?, selector })
    }
}

impl fmt::Display for PackageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PackageRef::Named { name, selector } => write!(f, "{name}@{selector}"),
            PackageRef::Digest(d) => write!(f, "{d}"),
            PackageRef::Component { collection, id } => write!(f, "{}/{id}", collection.name()),
        }
    }
}

/// Picks what `latest` means among versions: the highest release, or the highest
/// prerelease when there is no release.
pub fn latest<'a>(versions: impl IntoIterator<Item = &'a Version>) -> Option<&'a Version> {
    let mut best_release: Option<&Version> = None;
    let mut best_any: Option<&Version> = None;
    for v in versions {
        if v.pre.is_empty() && best_release.is_none_or(|b| v > b) {
            best_release = Some(v);
        }
        if best_any.is_none_or(|b| v > b) {
            best_any = Some(v);
        }
    }
    best_release.or(best_any)
}

/// The highest of `versions` in `range` (Cargo's semver matching).
pub fn highest_in<'a>(range: &VersionReq, versions: impl IntoIterator<Item = &'a Version>) -> Option<&'a Version> {
    versions.into_iter().filter(|v| range.matches(v)).max()
}

/// True when `a` and `b` are one version: equal but for build metadata, which semver 2.0
/// (§10) leaves out of precedence (`1.0.0+a` is `1.0.0`).
pub fn same_version(a: &Version, b: &Version) -> bool {
    a.major == b.major && a.minor == b.minor && a.patch == b.patch && a.pre == b.pre
}

/// The version after `latest` for a new build of the same thing: its patch number raised
/// (pre-release dropped); `0.1.0` when there is none; `None` when the patch number is
/// already `u64::MAX`.
pub fn next_patch(latest: Option<&Version>) -> Option<Version> {
    match latest {
        Some(v) => Some(Version::new(v.major, v.minor, v.patch.checked_add(1)?)),
        None => Some(Version::new(0, 1, 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_pick_the_highest_version_in_them() {
        let r: PackageRef = "fl.softmax.worker@^1.2".parse().unwrap();
        let PackageRef::Named { selector: Selector::Range(req), .. } = &r else { panic!("{r:?}") };
        assert_eq!(r.to_string(), "fl.softmax.worker@^1.2");
        let vs: Vec<Version> =
            ["1.1.0", "1.2.0", "1.9.3", "2.0.0", "1.10.0-rc.1"].iter().map(|v| Version::parse(v).unwrap()).collect();
        assert_eq!(highest_in(req, &vs).unwrap().to_string(), "1.9.3");
        let r: Selector = ">=1.0, <1.5".parse().unwrap();
        let Selector::Range(req) = r else { panic!() };
        assert_eq!(highest_in(&req, &vs).unwrap().to_string(), "1.2.0");
        assert!(matches!("x@^".parse::<PackageRef>(), Err(RefError::Range(..))));
        assert!(matches!(format!("x@>{}", "1".repeat(300)).parse::<PackageRef>(), Err(RefError::Range(..))));
    }

    #[test]
    fn parses_references() {
        let r: PackageRef = "fl.softmax.worker@0.1.1".parse().unwrap();
        assert_eq!(r.to_string(), "fl.softmax.worker@0.1.1");
        let r: PackageRef = "fl.softmax.worker".parse().unwrap();
        assert_eq!(r.to_string(), "fl.softmax.worker@latest");
        let r: PackageRef = "fl.softmax.worker@stable".parse().unwrap();
        assert!(matches!(r, PackageRef::Named { selector: Selector::Alias(a), .. } if a == "stable"));
        let d = Digest::of(b"x");
        assert_eq!(d.to_string().parse::<PackageRef>().unwrap(), PackageRef::Digest(d));
        let r: PackageRef = "inferencer/acme.resnet-50+cpu".parse().unwrap();
        assert_eq!(
            r,
            PackageRef::Component { collection: ComponentCollection::Inferencer, id: "acme.resnet-50+cpu".into() }
        );
        assert_eq!(r.to_string(), "inferencer/acme.resnet-50+cpu");
    }

    #[test]
    fn refuses_bad_references() {
        for bad in ["", "@1.0.0", "Fl@1.0.0", "fl@1.0", "fl@1.0.0.0", "fl@-x", "fl@a b", "b3:00"] {
            assert!(bad.parse::<PackageRef>().is_err(), "{bad:?} accepted");
        }
        // Models are not runnable; ids follow the Component Repository's name rule.
        for bad in [
            "model/base",
            "transformation/",
            "transformation/a/b",
            "service/../x",
            "service/.x",
            "inferencer/meta",
            "inferencer/a b",
            "/x",
        ] {
            assert!(matches!(bad.parse::<PackageRef>(), Err(RefError::Component(..))), "{bad:?} accepted");
        }
        let long = format!("transformation/{}", "a".repeat(201));
        assert!(matches!(long.parse::<PackageRef>(), Err(RefError::Component(..))));
    }

    #[test]
    fn next_patch_versions() {
        assert_eq!(next_patch(None).unwrap().to_string(), "0.1.0");
        assert_eq!(next_patch(Some(&"1.2.3".parse().unwrap())).unwrap().to_string(), "1.2.4");
        assert_eq!(next_patch(Some(&"1.2.3-rc.1".parse().unwrap())).unwrap().to_string(), "1.2.4");
        assert_eq!(next_patch(Some(&format!("1.2.{}", u64::MAX).parse().unwrap())), None, "no overflow");
    }

    #[test]
    fn latest_prefers_releases() {
        let vs: Vec<Version> = ["0.1.0", "0.2.0-rc.1", "0.1.5"].iter().map(|v| v.parse().unwrap()).collect();
        assert_eq!(latest(&vs).unwrap().to_string(), "0.1.5");
        let pre: Vec<Version> = ["0.2.0-rc.1", "0.2.0-rc.2"].iter().map(|v| v.parse().unwrap()).collect();
        assert_eq!(latest(&pre).unwrap().to_string(), "0.2.0-rc.2");
        assert!(latest(&[]).is_none());
    }
}
