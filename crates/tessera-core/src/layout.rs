//! A safetensors file's layout read from its header alone: each tensor's name, dtype, shape
//! and bytes, in file order. With it a reader takes a model front to back from a stream,
//! one chunk at a time, without holding the file (see tessera-coordinator's streamed
//! rounds). The format is Hugging Face's safetensors: an 8-byte little-endian header length
//! `N`, `N` bytes of JSON, then the tensors' contiguous little-endian data.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, Metadata};

use crate::tensor::{FloatType, TensorError, TensorLimits};

/// Bytes before the header: its length, a little-endian u64.
pub const PREFIX: usize = 8;

/// Largest header accepted, in bytes (the safetensors crate's own limit).
pub const MAX_HEADER: usize = 100_000_000;

/// One tensor of a [`Layout`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// Its dtype: a float type a model takes, or an integer or boolean type.
    pub dtype: Dtype,
    /// Its dimensions.
    pub shape: Vec<usize>,
    /// Its data's length in bytes.
    pub len: u64,
}

impl Entry {
    /// Its float type; `None` for an integer or boolean tensor.
    pub fn float_type(&self) -> Option<FloatType> {
        FloatType::of(self.dtype)
    }
}

/// The tensors of a safetensors file in the order their data comes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes before the first tensor's data: the prefix and the header.
    pub data_start: u64,
    /// The tensors, in file order.
    pub tensors: Vec<Entry>,
}

impl Layout {
    /// The header's length from a file's first [`PREFIX`] bytes. Refuses a header over
    /// [`MAX_HEADER`] ([`TensorError::TooLarge`]).
    pub fn header_len(prefix: [u8; PREFIX]) -> Result<usize, TensorError> {
        let n = u64::from_le_bytes(prefix);
        match usize::try_from(n) {
            Ok(n) if n <= MAX_HEADER => Ok(n),
            _ => Err(TensorError::TooLarge(format!("a header of {n} bytes, limit {MAX_HEADER}"))),
        }
    }

    /// Parses the header's JSON (the `N` bytes after the prefix). Refuses malformed JSON,
    /// offsets that are not contiguous or do not fit their shapes
    /// ([`TensorError::Format`]), more tensors or bytes than `limits` allow
    /// ([`TensorError::TooLarge`]) and dtypes a [`Model`](crate::tensor::Model) does not
    /// take ([`TensorError::Dtype`]).
    pub fn parse(header: &[u8], limits: TensorLimits) -> Result<Layout, TensorError> {
        let metadata: Metadata = serde_json::from_slice(header).map_err(|e| TensorError::Format(e.to_string()))?;
        let infos = metadata.tensors();
        if infos.len() > limits.max_tensors {
            return Err(TensorError::TooLarge(format!("{} tensors, limit {}", infos.len(), limits.max_tensors)));
        }
        let mut tensors = Vec::with_capacity(infos.len());
        for name in metadata.offset_keys() {
            let info = infos[&name];
            if FloatType::of(info.dtype).is_none() && !is_fixed(info.dtype) {
                return Err(TensorError::Dtype {
                    name,
                    dtype: format!("{:?}", info.dtype),
                    supported: "models take F64, F32, F16, BF16 and integer or boolean tensors",
                });
            }
            let (begin, end) = info.data_offsets;
            tensors.push(Entry { name, dtype: info.dtype, shape: info.shape.clone(), len: (end - begin) as u64 });
        }
        let layout = Layout { data_start: (PREFIX + header.len()) as u64, tensors };
        let total = layout.tensors.iter().try_fold(layout.data_start, |acc, t| acc.checked_add(t.len));
        match total {
            Some(n) if n <= limits.max_bytes as u64 => Ok(layout),
            Some(n) => Err(TensorError::TooLarge(format!("{n} bytes, limit {}", limits.max_bytes))),
            None => Err(TensorError::TooLarge(format!("more than 2^64 bytes, limit {}", limits.max_bytes))),
        }
    }

    /// The whole file's length in bytes (saturating: a parsed layout is at most
    /// `limits.max_bytes`).
    pub fn file_len(&self) -> u64 {
        self.tensors.iter().fold(self.data_start, |acc, t| acc.saturating_add(t.len))
    }

    /// The float tensors' names and shapes, by name.
    pub fn float_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors.iter().filter(|t| t.float_type().is_some()).map(|t| (t.name.clone(), t.shape.clone())).collect()
    }

    /// The float tensors stored in a type other than F32, with their types (as
    /// [`Model::types`](crate::tensor::Model::types) holds them).
    pub fn float_types(&self) -> BTreeMap<String, FloatType> {
        self.tensors
            .iter()
            .filter_map(|t| t.float_type().filter(|ty| *ty != FloatType::F32).map(|ty| (t.name.clone(), ty)))
            .collect()
    }

    /// Checks that `other` holds the same tensors (names, dtypes, shapes), in any order.
    pub fn check_same(&self, other: &Layout) -> Result<(), TensorError> {
        let mine: BTreeMap<&str, &Entry> = self.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let theirs: BTreeMap<&str, &Entry> = other.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        if let Some(extra) = theirs.keys().find(|n| !mine.contains_key(*n)) {
            return Err(TensorError::Mismatch(format!("tensor {extra:?} is not in the model")));
        }
        for (name, a) in mine {
            let Some(b) = theirs.get(name) else {
                return Err(TensorError::Mismatch(format!("tensor {name:?} is missing")));
            };
            if a.dtype != b.dtype || a.shape != b.shape {
                return Err(TensorError::Mismatch(format!(
                    "tensor {name:?} is {:?} {:?}, expected {:?} {:?}",
                    b.dtype, b.shape, a.dtype, a.shape
                )));
            }
        }
        Ok(())
    }
}

/// The integer and boolean dtypes a model carries whole.
pub(crate) fn is_fixed(dtype: Dtype) -> bool {
    matches!(
        dtype,
        Dtype::BOOL
            | Dtype::U8
            | Dtype::I8
            | Dtype::U16
            | Dtype::I16
            | Dtype::U32
            | Dtype::I32
            | Dtype::U64
            | Dtype::I64
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{FixedTensor, Model, Tensor};

    fn model() -> Model {
        let mut m = Model::default();
        m.floats.0.insert("w".into(), Tensor { shape: vec![2, 3], data: vec![1.0; 6] });
        m.floats.0.insert("h".into(), Tensor { shape: vec![4], data: vec![0.5; 4] });
        m.types.insert("h".into(), FloatType::F16);
        m.fixed
            .insert("n".into(), FixedTensor { dtype: Dtype::I64, shape: vec![], bytes: 7i64.to_le_bytes().to_vec() });
        m
    }

    fn layout_of(bytes: &[u8]) -> Result<Layout, TensorError> {
        let n = Layout::header_len(bytes[..PREFIX].try_into().unwrap())?;
        Layout::parse(&bytes[PREFIX..PREFIX + n], TensorLimits::default())
    }

    #[test]
    fn a_layout_describes_the_file_from_its_header() {
        let bytes = model().encode();
        let l = layout_of(&bytes).unwrap();
        assert_eq!(l.file_len(), bytes.len() as u64);
        // File order: descending dtype, then name (as safetensors writes).
        let names: Vec<&str> = l.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["n", "w", "h"]);
        assert_eq!(l.tensors[1].len, 24);
        assert_eq!(l.float_types(), BTreeMap::from([("h".to_string(), FloatType::F16)]));
        assert_eq!(l.float_shapes().keys().collect::<Vec<_>>(), ["h", "w"]);
        // Each tensor's bytes, taken in order, decode to the model's values.
        let mut at = l.data_start as usize;
        let mut w = Vec::new();
        for t in &l.tensors {
            if t.name == "w" {
                w = t.float_type().unwrap().read(&bytes[at..at + t.len as usize]);
            }
            at += t.len as usize;
        }
        assert_eq!(w, vec![1.0; 6]);
    }

    #[test]
    fn layouts_compare_names_dtypes_and_shapes() {
        let a = layout_of(&model().encode()).unwrap();
        assert!(a.check_same(&a).is_ok());
        let mut m = model();
        m.types.insert("w".into(), FloatType::BF16);
        let e = a.check_same(&layout_of(&m.encode()).unwrap()).unwrap_err();
        assert!(e.to_string().contains("\"w\""), "{e}");
        let mut m = model();
        m.floats.0.get_mut("w").unwrap().shape = vec![3, 2];
        assert!(a.check_same(&layout_of(&m.encode()).unwrap()).is_err());
        let mut m = model();
        m.fixed.clear();
        assert!(a.check_same(&layout_of(&m.encode()).unwrap()).unwrap_err().to_string().contains("missing"));
        assert!(layout_of(&m.encode()).unwrap().check_same(&a).unwrap_err().to_string().contains("not in the model"));
    }

    #[test]
    fn hostile_headers_are_refused() {
        assert!(matches!(Layout::header_len(u64::MAX.to_le_bytes()), Err(TensorError::TooLarge(_))));
        assert!(matches!(Layout::header_len(((MAX_HEADER + 1) as u64).to_le_bytes()), Err(TensorError::TooLarge(_))));
        let lim = TensorLimits::default();
        assert!(matches!(Layout::parse(b"not json", lim), Err(TensorError::Format(_))));
        // Offsets with a gap, and offsets that do not fit the shape.
        let gap = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        assert!(matches!(Layout::parse(gap, lim), Err(TensorError::Format(_))));
        let short = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        assert!(matches!(Layout::parse(short, lim), Err(TensorError::Format(_))));
        let huge = br#"{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,4]}}"#;
        assert!(matches!(Layout::parse(huge, lim), Err(TensorError::Format(_))));
        let f8 = br#"{"a":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#;
        assert!(matches!(Layout::parse(f8, lim), Err(TensorError::Dtype { .. })));
        let big = format!(r#"{{"a":{{"dtype":"F32","shape":[{}],"data_offsets":[0,{}]}}}}"#, 1u64 << 32, 1u64 << 34);
        assert!(matches!(Layout::parse(big.as_bytes(), lim), Err(TensorError::TooLarge(_))));
        let two = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(Layout::parse(two, lim).is_ok());
        // Lengths that pass safetensors' checks one by one but add up past u64.
        let half = (1u64 << 61) - 1;
        let mut wide = String::from("{");
        for i in 0..8u64 {
            let sep = if i == 0 { "" } else { "," };
            wide.push_str(&format!(
                r#"{sep}"t{i}":{{"dtype":"U8","shape":[{half}],"data_offsets":[{},{}]}}"#,
                i * half,
                (i + 1) * half
            ));
        }
        wide.push('}');
        assert!(matches!(Layout::parse(wide.as_bytes(), lim), Err(TensorError::TooLarge(_))));
        let few = TensorLimits { max_bytes: 1 << 20, max_tensors: 1 };
        assert!(matches!(Layout::parse(two, few), Err(TensorError::TooLarge(_))));
    }
}
