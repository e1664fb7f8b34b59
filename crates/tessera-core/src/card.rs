//! Model and module cards: a `README.md` whose YAML front matter carries the facts a
//! registry searches by, as the Hugging Face hub's model cards do (`license`, `tags`,
//! `datasets`, `metrics`, `base_model`, `library_name`), and whose text says the rest.
//!
//! ```text
//! ---
//! license: apache-2.0
//! tags: [vision, federated]
//! datasets: [digits]
//! base_model: digits.softmax@0.1.0
//! ---
//! # Digits classifier
//!
//! A softmax regression trained by federated averaging on four nodes.
//! ```
//!
//! A card without front matter is all text. The description is the front matter's
//! `description`, or else the first paragraph of the text that is not a heading.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Largest card, in bytes (256 KiB).
pub const MAX_CARD_BYTES: usize = 256 << 10;

/// Why a card was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CardError {
    /// Over [`MAX_CARD_BYTES`].
    #[error("the card is {0} bytes; the limit is {MAX_CARD_BYTES}")]
    TooLarge(usize),
    /// The front matter is not valid YAML of the card's fields.
    #[error("the card's front matter: {0}")]
    FrontMatter(String),
}

/// A card: its searchable facts and its text.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Card {
    /// One paragraph saying what it is.
    #[serde(default)]
    pub description: String,
    /// An SPDX license id (`apache-2.0`, `mit`) or `other`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    /// Tags to find it by.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The data sets it was trained or evaluated on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<String>,
    /// Its metrics (`accuracy: 0.95`, or a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Value>,
    /// The model it was built from (`name@version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// The library it is meant for (`numpy`, `torch`, `keras`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub library_name: Option<String>,
    /// What it is for, and what not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intended_use: Option<String>,
    /// The text after the front matter (Markdown).
    #[serde(default)]
    pub text: String,
}

/// The front matter's fields (others are allowed and ignored, as on the Hugging Face hub).
#[derive(Default, Deserialize)]
struct FrontMatter {
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    license: Option<OneOrMany>,
    #[serde(default)]
    tags: Option<OneOrMany>,
    #[serde(default)]
    datasets: Option<OneOrMany>,
    #[serde(default)]
    metrics: Option<Value>,
    #[serde(default)]
    base_model: Option<OneOrMany>,
    #[serde(default)]
    library_name: Option<OneOrMany>,
    #[serde(default)]
    intended_use: Option<String>,
}

/// `tags: x` or `tags: [x, y]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
    /// The first (the Hugging Face hub allows lists for `license`, `base_model` and
    /// `library_name`; a card here names one).
    fn first(self) -> Option<String> {
        self.into_vec().into_iter().next()
    }
}

impl Card {
    /// The card of a model a run published without one: its data sets, base model and
    /// library from the lineage and metadata, its metrics the last round's (`accuracy`,
    /// `loss` on the held-out data, `train_loss`), and a text saying which run, strategy,
    /// modules and nodes made it.
    pub fn from_lineage(name: &str, version: &str, lineage: &crate::wire::Lineage, metadata: &Value) -> Card {
        let last = lineage.metrics.last();
        let mut metrics = serde_json::Map::new();
        if let Some(r) = last {
            if let Some(a) = r.eval_accuracy {
                metrics.insert("accuracy".into(), a.into());
            }
            if let Some(l) = r.eval_loss {
                metrics.insert("loss".into(), l.into());
            }
            if r.train_loss.is_finite() {
                metrics.insert("train_loss".into(), r.train_loss.into());
            }
        }
        let modules: Vec<String> = lineage.modules.iter().map(|m| format!("{} ({})", m.module, m.digest)).collect();
        let description = format!(
            "{name}@{version}, made by run {} ({}, {} rounds on {} nodes).",
            lineage.session,
            lineage.strategy,
            lineage.rounds,
            lineage.nodes.len()
        );
        let mut text = format!("# {name}@{version}\n\n{description}\n\n");
        text.push_str(&format!("- modules: {}\n", modules.join(", ")));
        text.push_str(&format!("- nodes: {}\n", lineage.nodes.join(", ")));
        if !lineage.datasets.is_empty() {
            text.push_str(&format!("- data sets: {}\n", lineage.datasets.join(", ")));
        }
        if let Some(b) = &lineage.base_model {
            text.push_str(&format!("- started from: {b}\n"));
        }
        Card {
            description,
            datasets: lineage.datasets.clone(),
            metrics: (!metrics.is_empty()).then_some(Value::Object(metrics)),
            base_model: lineage.base_model.clone(),
            library_name: metadata.get("library").and_then(Value::as_str).map(str::to_owned),
            text,
            ..Card::default()
        }
    }

    /// Reads a card from a `README.md`'s text.
    ///
    /// # Errors
    /// [`CardError::TooLarge`]; [`CardError::FrontMatter`] when the front matter does not
    /// parse (a field of the wrong type, YAML that is not YAML).
    pub fn parse(markdown: &str) -> Result<Card, CardError> {
        if markdown.len() > MAX_CARD_BYTES {
            return Err(CardError::TooLarge(markdown.len()));
        }
        let (front, text) = split_front_matter(markdown);
        let fm: FrontMatter = match front {
            Some(yaml) if !yaml.trim().is_empty() => {
                crate::yaml::from_str_located(yaml).map_err(|e| CardError::FrontMatter(e.to_string()))?
            }
            _ => FrontMatter::default(),
        };
        let text = text.trim().to_owned();
        let description = fm.description.unwrap_or_else(|| first_paragraph(&text));
        Ok(Card {
            description,
            license: fm.license.and_then(OneOrMany::first),
            tags: fm.tags.map(OneOrMany::into_vec).unwrap_or_default(),
            datasets: fm.datasets.map(OneOrMany::into_vec).unwrap_or_default(),
            metrics: fm.metrics,
            base_model: fm.base_model.and_then(OneOrMany::first),
            library_name: fm.library_name.and_then(OneOrMany::first),
            intended_use: fm.intended_use,
            text,
        })
    }
}

/// The front matter (between a first line `---` and the next `---` line) and the rest.
fn split_front_matter(markdown: &str) -> (Option<&str>, &str) {
    let body = markdown.strip_prefix('\u{feff}').unwrap_or(markdown);
    let Some(rest) = body.strip_prefix("---\n").or_else(|| body.strip_prefix("---\r\n")) else {
        return (None, body);
    };
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        if line.trim_end() == "---" {
            return (Some(&rest[..offset]), &rest[offset + line.len()..]);
        }
        offset += line.len();
    }
    (None, body)
}

/// The first paragraph that is not a heading, joined into one line.
fn first_paragraph(text: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() {
            if !out.is_empty() {
                break;
            }
            continue;
        }
        if l.starts_with('#') && out.is_empty() {
            continue;
        }
        out.push(l);
    }
    out.join(" ")
}

/// Cards' facts as the hub filters by them: lower-case keys.
pub fn facts(card: &Card) -> BTreeMap<&'static str, Vec<String>> {
    let mut m = BTreeMap::new();
    m.insert("tag", card.tags.iter().map(|t| t.to_lowercase()).collect());
    m.insert("license", card.license.iter().map(|t| t.to_lowercase()).collect());
    m.insert("library", card.library_name.iter().map(|t| t.to_lowercase()).collect());
    m.insert("dataset", card.datasets.iter().map(|t| t.to_lowercase()).collect());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_matter_and_text() {
        let c = Card::parse(
            "---\nlicense: apache-2.0\ntags: [vision, federated]\ndatasets: digits\nmetrics:\n  accuracy: 0.95\nbase_model: digits.softmax@0.1.0\nextra: ignored\n---\n# Digits\n\nA softmax regression\ntrained by FedAvg.\n\nMore text.\n",
        )
        .unwrap();
        assert_eq!(c.license.as_deref(), Some("apache-2.0"));
        assert_eq!(c.tags, vec!["vision", "federated"]);
        assert_eq!(c.datasets, vec!["digits"]);
        assert_eq!(c.metrics.as_ref().unwrap()["accuracy"], 0.95);
        assert_eq!(c.base_model.as_deref(), Some("digits.softmax@0.1.0"));
        assert_eq!(c.description, "A softmax regression trained by FedAvg.");
        assert!(c.text.starts_with("# Digits") && c.text.ends_with("More text."));
    }

    #[test]
    fn lists_where_the_hugging_face_hub_allows_them() {
        let c = Card::parse("---\nlicense: [mit, apache-2.0]\nbase_model: [a.b@1.0.0, c.d@2.0.0]\n---\nx\n").unwrap();
        assert_eq!((c.license.as_deref(), c.base_model.as_deref()), (Some("mit"), Some("a.b@1.0.0")));
    }

    #[test]
    fn no_front_matter_is_all_text() {
        let c = Card::parse("Just words.\n\n---\nnot front matter\n").unwrap();
        assert_eq!(c.description, "Just words.");
        assert_eq!(c.license, None);
        assert_eq!(Card::parse("").unwrap(), Card::default());
        // An unclosed front matter is text.
        assert_eq!(Card::parse("---\nlicense: mit\n").unwrap().license, None);
    }

    #[test]
    fn hostile_cards_are_refused() {
        assert!(matches!(Card::parse(&"x".repeat(MAX_CARD_BYTES + 1)), Err(CardError::TooLarge(_))));
        for bad in ["---\ntags: {a: 1}\n---\n", "---\nlicense: {a: b}\n---\n", "---\n: : :\n  - [\n---\n"] {
            assert!(matches!(Card::parse(bad), Err(CardError::FrontMatter(_))), "{bad}");
        }
        // An alias bomb is refused by the YAML reader's limits, not expanded.
        let bomb = "---\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\nmetrics: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n---\n";
        assert!(matches!(Card::parse(bomb), Err(CardError::FrontMatter(_))));
    }
}
