//! Search filters shared by package and model listings: text, tag, license, library and
//! signer, compared without regard to case, and pages (`offset`, `limit`).
//!
//! A package's facets come from its manifest (tags, license, `needs.libraries`) and its
//! card; a model's from its metadata (`tags`, `library`, `license`, `description`) and its
//! card.

use serde::Deserialize;
use serde_json::Value;
use tessera_core::registry::{ModelRecord, PackageRecord};

/// Most records one listing returns.
pub const MAX_PAGE: u64 = 1_000;

/// The filters of a listing (each one given must match).
#[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Filters {
    /// Text to find in the name or description.
    pub q: Option<String>,
    /// Only with this tag (manifest or card).
    pub tag: Option<String>,
    /// Only under this license (SPDX id, e.g. `apache-2.0`).
    pub license: Option<String>,
    /// Only for this library (`numpy`, `torch`: a package's `needs.libraries`, a model's
    /// `library` metadata or its card's `library_name`).
    pub library: Option<String>,
    /// Only signed by this key.
    pub signer: Option<String>,
    /// Records to skip (default 0).
    pub offset: Option<u64>,
    /// Records to return (default and most: 1,000).
    pub limit: Option<u64>,
}

/// What a record is found by, lower case.
#[derive(Default)]
pub(crate) struct Facets {
    text: String,
    tags: Vec<String>,
    licenses: Vec<String>,
    libraries: Vec<String>,
    signer: Option<String>,
}

fn lower(v: impl IntoIterator<Item = impl AsRef<str>>) -> Vec<String> {
    v.into_iter().map(|s| s.as_ref().to_lowercase()).collect()
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    }
}

impl Facets {
    pub(crate) fn of_package(r: &PackageRecord) -> Facets {
        let card = r.card.as_ref();
        let libraries = r
            .manifest
            .needs
            .libraries
            .iter()
            .filter_map(|l| tessera_core::requirement::Requirement::parse(l).ok().map(|q| q.name().to_owned()))
            .chain(card.and_then(|c| c.library_name.clone()));
        Facets {
            text: format!("{} {} {}", r.name, r.description, card.map_or("", |c| c.description.as_str()))
                .to_lowercase(),
            tags: lower(r.tags.iter().chain(card.into_iter().flat_map(|c| c.tags.iter()))),
            licenses: lower(r.manifest.license.iter().chain(card.and_then(|c| c.license.as_ref()))),
            libraries: lower(libraries),
            signer: r.signer.clone(),
        }
    }

    pub(crate) fn of_model(r: &ModelRecord) -> Facets {
        let card = r.card.as_ref();
        let m = &r.metadata;
        let description = m.get("description").and_then(Value::as_str).unwrap_or_default();
        Facets {
            text: format!("{} {description} {}", r.name, card.map_or("", |c| c.description.as_str())).to_lowercase(),
            tags: lower(strings(m.get("tags")).into_iter().chain(card.into_iter().flat_map(|c| c.tags.clone()))),
            licenses: lower(strings(m.get("license")).into_iter().chain(card.and_then(|c| c.license.clone()))),
            libraries: lower(strings(m.get("library")).into_iter().chain(card.and_then(|c| c.library_name.clone()))),
            signer: r.signer.clone(),
        }
    }
}

impl Filters {
    /// True when the record's facets pass every filter given.
    pub(crate) fn accepts(&self, f: &Facets) -> bool {
        let has = |want: &Option<String>, have: &[String]| match want {
            Some(w) => have.contains(&w.to_lowercase()),
            None => true,
        };
        self.q.as_ref().is_none_or(|q| f.text.contains(&q.to_lowercase()))
            && has(&self.tag, &f.tags)
            && has(&self.license, &f.licenses)
            && has(&self.library, &f.libraries)
            && self.signer.as_ref().is_none_or(|s| f.signer.as_deref() == Some(s.as_str()))
    }

    /// The page the filters ask for.
    pub(crate) fn page<T>(&self, items: Vec<T>) -> Vec<T> {
        let offset = usize::try_from(self.offset.unwrap_or(0)).unwrap_or(usize::MAX);
        let limit = usize::try_from(self.limit.unwrap_or(MAX_PAGE).min(MAX_PAGE)).unwrap_or(usize::MAX);
        items.into_iter().skip(offset).take(limit).collect()
    }
}
