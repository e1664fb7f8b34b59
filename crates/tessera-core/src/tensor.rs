//! Named f32 tensors and their safetensors encoding: how model parameters travel.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// Limits applied when decoding tensors from outside.
#[derive(Clone, Copy, Debug)]
pub struct TensorLimits {
    /// Largest encoded blob accepted.
    pub max_bytes: usize,
    /// Most tensors in one blob.
    pub max_tensors: usize,
}

impl Default for TensorLimits {
    fn default() -> Self {
        TensorLimits { max_bytes: 2 << 30, max_tensors: 100_000 }
    }
}

/// Why tensors could not be decoded or combined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    /// The bytes are not a valid safetensors blob.
    #[error("invalid safetensors blob: {0}")]
    Format(String),
    /// Over a limit.
    #[error("safetensors blob too large: {0}")]
    TooLarge(String),
    /// A tensor has a dtype other than F32.
    #[error("tensor {name:?} has dtype {dtype}; only F32 is supported here")]
    Dtype {
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// Two sets of tensors do not line up.
    #[error("tensors do not match: {0}")]
    Mismatch(String),
}

/// One dense f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor { shape: shape.to_vec(), data: vec![0.0; shape.iter().product()] }
    }
}

/// Named tensors, ordered by name: a model's parameters or an update.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tensors(pub BTreeMap<String, Tensor>);

impl Tensors {
    /// Decodes a safetensors blob (F32 tensors only), with limits.
    pub fn decode(bytes: &[u8], limits: TensorLimits) -> Result<Tensors, TensorError> {
        if bytes.len() > limits.max_bytes {
            return Err(TensorError::TooLarge(format!("{} bytes, limit {}", bytes.len(), limits.max_bytes)));
        }
        let st = SafeTensors::deserialize(bytes).map_err(|e| TensorError::Format(e.to_string()))?;
        if st.len() > limits.max_tensors {
            return Err(TensorError::TooLarge(format!("{} tensors, limit {}", st.len(), limits.max_tensors)));
        }
        let mut out = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(TensorError::Dtype { name, dtype: format!("{:?}", view.dtype()) });
            }
            let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            out.insert(name, Tensor { shape: view.shape().to_vec(), data });
        }
        Ok(Tensors(out))
    }

    /// Encodes as safetensors. The same tensors always give the same bytes.
    pub fn encode(&self) -> Vec<u8> {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .0
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect()))
            .collect();
        let views: Vec<(String, TensorView<'_>)> = bytes
            .iter()
            .map(|(n, s, b)| {
                let view = TensorView::new(Dtype::F32, s.clone(), b).expect("shape matches data by construction");
                (n.clone(), view)
            })
            .collect();
        safetensors::serialize(views, None).expect("serialising in-memory f32 tensors cannot fail")
    }

    /// Total number of values.
    pub fn len(&self) -> usize {
        self.0.values().map(|t| t.data.len()).sum()
    }

    /// True when there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that `other` has the same names and shapes.
    pub fn check_same_layout(&self, other: &Tensors) -> Result<(), TensorError> {
        if self.0.len() != other.0.len() {
            return Err(TensorError::Mismatch(format!("{} tensors against {}", other.0.len(), self.0.len())));
        }
        for ((na, a), (nb, b)) in self.0.iter().zip(other.0.iter()) {
            if na != nb {
                return Err(TensorError::Mismatch(format!("tensor {nb:?} where {na:?} was expected")));
            }
            if a.shape != b.shape || a.data.len() != b.data.len() {
                return Err(TensorError::Mismatch(format!(
                    "tensor {na:?} has shape {:?}, expected {:?}",
                    b.shape, a.shape
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Tensors {
        let mut t = Tensors::default();
        t.0.insert("w".into(), Tensor { shape: vec![2, 3], data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0] });
        t.0.insert("b".into(), Tensor { shape: vec![2], data: vec![-1.0, 0.5] });
        t
    }

    #[test]
    fn round_trips_deterministically() {
        let t = sample();
        let a = t.encode();
        assert_eq!(a, sample().encode());
        assert_eq!(Tensors::decode(&a, TensorLimits::default()).unwrap(), t);
        assert_eq!(t.len(), 8);
    }

    #[test]
    fn refuses_hostile_blobs() {
        let good = sample().encode();
        let lim = TensorLimits::default();
        assert!(Tensors::decode(&[], lim).is_err());
        assert!(Tensors::decode(&good[..good.len() - 1], lim).is_err(), "truncated");
        assert!(Tensors::decode(&good[..10], lim).is_err(), "truncated header");
        let mut huge_header = good.clone();
        huge_header[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Tensors::decode(&huge_header, lim).is_err(), "header length past the end");
        let mut garbage = good.clone();
        garbage[9] = b'!';
        assert!(Tensors::decode(&garbage, lim).is_err(), "header not JSON");
        let small = TensorLimits { max_bytes: 16, max_tensors: 10 };
        assert!(matches!(Tensors::decode(&good, small), Err(TensorError::TooLarge(_))));
        let few = TensorLimits { max_bytes: 1 << 20, max_tensors: 1 };
        assert!(matches!(Tensors::decode(&good, few), Err(TensorError::TooLarge(_))));
        // A non-F32 tensor.
        let bytes = [1u8, 2, 3, 4];
        let v = TensorView::new(Dtype::U8, vec![4], &bytes).unwrap();
        let blob = safetensors::serialize(vec![("x".to_string(), v)], None).unwrap();
        assert!(matches!(Tensors::decode(&blob, lim), Err(TensorError::Dtype { .. })));
    }

    #[test]
    fn layout_checks() {
        let a = sample();
        let mut b = sample();
        assert!(a.check_same_layout(&b).is_ok());
        b.0.get_mut("w").unwrap().shape = vec![3, 2];
        assert!(a.check_same_layout(&b).is_err());
        b.0.remove("w");
        assert!(a.check_same_layout(&b).is_err());
    }
}
