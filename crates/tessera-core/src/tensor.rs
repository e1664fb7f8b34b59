//! Named f32 tensors and their safetensors encoding: how model parameters travel.
//!
//! [`Tensors`] is what aggregation works on: every value an f32. [`Model`] is a whole
//! safetensors file as workers write it: floating-point tensors in F32, F64, F16 or BF16
//! (read into [`Tensors`] as f32, written back in their own type) and integer or boolean
//! tensors (counters such as PyTorch BatchNorm's `num_batches_tracked`) carried whole.

use std::collections::BTreeMap;

pub use safetensors::tensor::Dtype;
use safetensors::tensor::SafeTensors;

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
    /// A tensor has a dtype this reader does not take: [`Tensors`] takes F32 only, [`Model`]
    /// every float type but the 4-, 6- and 8-bit ones.
    #[error("tensor {name:?} has dtype {dtype}; {supported}")]
    Dtype {
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: String,
        /// What is supported where it was read.
        supported: &'static str,
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
    /// Decodes a safetensors blob (F32 tensors only), with limits: a [`Model`] whose every
    /// tensor is F32.
    pub fn decode(bytes: &[u8], limits: TensorLimits) -> Result<Tensors, TensorError> {
        let model = Model::decode(bytes, limits)?;
        let other = model.types.iter().map(|(n, t)| (n, format!("{:?}", t.dtype())));
        let fixed = model.fixed.iter().map(|(n, f)| (n, format!("{:?}", f.dtype)));
        if let Some((name, dtype)) = other.chain(fixed).next() {
            return Err(TensorError::Dtype { name: name.clone(), dtype, supported: "only F32 is supported here" });
        }
        Ok(model.floats)
    }

    /// Encodes as safetensors. The same tensors always give the same bytes.
    pub fn encode(&self) -> Vec<u8> {
        let floats = self.0.iter().map(|(n, t)| (n.as_str(), t, FloatType::F32));
        let mut out =
            Vec::with_capacity(encoded_bound(self.0.iter().map(|(n, t)| (n, t.shape.len(), t.data.len() * 4))));
        write_safetensors(&mut out, floats, &BTreeMap::new()).expect("writing to memory cannot fail");
        out
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

/// The type a floating-point tensor of a [`Model`] is stored in. Aggregation works in f32
/// whatever it is: F16 and BF16 widen to f32 exactly; F64 narrows to f32 (24-bit mantissa),
/// so an F64 model is aggregated to f32 precision and written back as F64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary64.
    F64,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16 (the upper half of a binary32).
    BF16,
}

impl FloatType {
    /// The float type of a safetensors dtype; `None` for integers, booleans and the 4-, 6-
    /// and 8-bit float types.
    pub fn of(dtype: Dtype) -> Option<FloatType> {
        match dtype {
            Dtype::F32 => Some(FloatType::F32),
            Dtype::F64 => Some(FloatType::F64),
            Dtype::F16 => Some(FloatType::F16),
            Dtype::BF16 => Some(FloatType::BF16),
            _ => None,
        }
    }

    /// The safetensors dtype.
    pub fn dtype(self) -> Dtype {
        match self {
            FloatType::F32 => Dtype::F32,
            FloatType::F64 => Dtype::F64,
            FloatType::F16 => Dtype::F16,
            FloatType::BF16 => Dtype::BF16,
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            FloatType::F64 => 8,
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::BF16 => 2,
        }
    }

    /// Little-endian values of this type as f32. `bytes.len()` is a multiple of
    /// [`FloatType::size`] (safetensors checks it). F64 values outside f32's range become
    /// infinities (refused later as non-finite).
    pub fn read(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            FloatType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            FloatType::F64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                .collect(),
            FloatType::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            FloatType::BF16 => {
                bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
        }
    }

    /// Appends f32 values to `out` as little-endian values of this type (F16 and BF16
    /// rounded to nearest, ties to even).
    pub fn write_into(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        match self {
            FloatType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            FloatType::F64 => values.iter().for_each(|v| out.extend_from_slice(&f64::from(*v).to_le_bytes())),
            FloatType::F16 => values.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            FloatType::BF16 => {
                values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes()))
            }
        }
    }
}

/// An integer or boolean tensor of a [`Model`], carried as its safetensors bytes and never
/// averaged: counters (PyTorch BatchNorm's `num_batches_tracked`, I64 of shape `[]`), index
/// buffers, masks.
#[derive(Clone, Debug, PartialEq)]
pub struct FixedTensor {
    /// BOOL, U8, I8, U16, I16, U32, I32, U64 or I64.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Row-major little-endian values.
    pub bytes: Vec<u8>,
}

/// A model as a worker writes it (one safetensors file): its floating-point tensors as f32
/// for aggregation, the type each is stored in, and its integer and boolean tensors whole.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    /// The floating-point tensors, as f32: what strategies aggregate.
    pub floats: Tensors,
    /// The stored type of each float tensor that is not F32.
    pub types: BTreeMap<String, FloatType>,
    /// The integer and boolean tensors.
    pub fixed: BTreeMap<String, FixedTensor>,
}

impl From<Tensors> for Model {
    /// An all-F32 model of these tensors.
    fn from(floats: Tensors) -> Model {
        Model { floats, ..Model::default() }
    }
}

impl Model {
    /// Decodes a safetensors blob, with limits. Refuses the 4-, 6- and 8-bit float types
    /// ([`TensorError::Dtype`]), malformed blobs ([`TensorError::Format`]) and blobs over a
    /// limit ([`TensorError::TooLarge`]).
    pub fn decode(bytes: &[u8], limits: TensorLimits) -> Result<Model, TensorError> {
        if bytes.len() > limits.max_bytes {
            return Err(TensorError::TooLarge(format!("{} bytes, limit {}", bytes.len(), limits.max_bytes)));
        }
        let st = SafeTensors::deserialize(bytes).map_err(|e| TensorError::Format(e.to_string()))?;
        if st.len() > limits.max_tensors {
            return Err(TensorError::TooLarge(format!("{} tensors, limit {}", st.len(), limits.max_tensors)));
        }
        let mut model = Model::default();
        for (name, view) in st.tensors() {
            let dtype = view.dtype();
            let shape = view.shape().to_vec();
            if let Some(ty) = FloatType::of(dtype) {
                let data = ty.read(view.data());
                if ty != FloatType::F32 {
                    model.types.insert(name.clone(), ty);
                }
                model.floats.0.insert(name, Tensor { shape, data });
            } else if crate::layout::is_fixed(dtype) {
                model.fixed.insert(name, FixedTensor { dtype, shape, bytes: view.data().to_vec() });
            } else {
                return Err(TensorError::Dtype {
                    name,
                    dtype: format!("{dtype:?}"),
                    supported: "models take F64, F32, F16, BF16 and integer or boolean tensors",
                });
            }
        }
        Ok(model)
    }

    /// Encodes as safetensors, every float tensor in its stored type. The same model always
    /// gives the same bytes: those of `safetensors::serialize`.
    pub fn encode(&self) -> Vec<u8> {
        let floats = self.floats.0.iter().map(|(n, t)| (n, t.shape.len(), t.data.len() * self.float_type(n).size()));
        let fixed = self.fixed.iter().map(|(n, f)| (n, f.shape.len(), f.bytes.len()));
        let mut out = Vec::with_capacity(encoded_bound(floats.chain(fixed)));
        self.write_to(&mut out).expect("writing to memory cannot fail");
        out
    }

    /// Writes the bytes [`Model::encode`] gives to `w`, converting a tensor's values a
    /// chunk at a time: beside the model, it holds about [`WRITE_CHUNK`] bytes (and `w`'s
    /// own buffer).
    ///
    /// # Errors
    /// `w`'s errors.
    pub fn write_to(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        let floats = self.floats.0.iter().map(|(n, t)| (n.as_str(), t, self.float_type(n)));
        write_safetensors(w, floats, &self.fixed)
    }

    /// Checks that `other` has the same tensors: names, shapes and stored types.
    pub fn check_same_layout(&self, other: &Model) -> Result<(), TensorError> {
        self.floats.check_same_layout(&other.floats)?;
        for name in self.floats.0.keys() {
            let (a, b) = (self.float_type(name), other.float_type(name));
            if a != b {
                return Err(TensorError::Mismatch(format!("tensor {name:?} is {b:?}, expected {a:?}")));
            }
        }
        if self.fixed.len() != other.fixed.len() {
            return Err(TensorError::Mismatch(format!(
                "{} integer or boolean tensors against {}",
                other.fixed.len(),
                self.fixed.len()
            )));
        }
        for ((na, a), (nb, b)) in self.fixed.iter().zip(&other.fixed) {
            if na != nb {
                return Err(TensorError::Mismatch(format!("tensor {nb:?} where {na:?} was expected")));
            }
            if a.dtype != b.dtype || a.shape != b.shape {
                return Err(TensorError::Mismatch(format!(
                    "tensor {na:?} is {:?} {:?}, expected {:?} {:?}",
                    b.dtype, b.shape, a.dtype, a.shape
                )));
            }
        }
        Ok(())
    }

    /// Bytes of its tensors' data as stored (each float tensor in its own type): its
    /// encoding's size but for the header.
    pub fn data_len(&self) -> u64 {
        let floats = self.floats.0.iter().map(|(n, t)| (t.data.len() * self.float_type(n).size()) as u64);
        floats.chain(self.fixed.values().map(|f| f.bytes.len() as u64)).sum()
    }

    /// The stored type of float tensor `name` (F32 when not named in [`Model::types`]).
    pub fn float_type(&self, name: &str) -> FloatType {
        self.types.get(name).copied().unwrap_or(FloatType::F32)
    }

    /// This model's types and integer tensors around other float values (an aggregate).
    pub fn with_floats(&self, floats: Tensors) -> Model {
        Model { floats, types: self.types.clone(), fixed: self.fixed.clone() }
    }
}

/// At least the encoded size of tensors given as (name, dimensions, data bytes): the
/// header at its longest (every name character escaped) and the data. A buffer of it is
/// never grown while a model is encoded into it.
fn encoded_bound<'a>(tensors: impl Iterator<Item = (&'a String, usize, usize)>) -> usize {
    tensors.fold(64, |acc, (name, dims, bytes)| acc + name.len() * 6 + 96 + dims * 21 + bytes)
}

/// Bytes of converted values [`Model::write_to`] holds at once.
pub const WRITE_CHUNK: usize = 1 << 20;

/// Writes a safetensors file of `floats` (each in its stored type) and `fixed`, laid out
/// as `safetensors::serialize` lays them out (by descending dtype, then name; the header
/// padded with spaces to a multiple of 8), so the bytes are the same.
fn write_safetensors<'a>(
    w: &mut impl std::io::Write,
    floats: impl Iterator<Item = (&'a str, &'a Tensor, FloatType)>,
    fixed: &BTreeMap<String, FixedTensor>,
) -> std::io::Result<()> {
    enum Data<'a> {
        Float(&'a [f32], FloatType),
        Fixed(&'a [u8]),
    }
    let mut all: Vec<(&str, Dtype, &[usize], Data<'_>)> = floats
        .map(|(n, t, ty)| (n, ty.dtype(), t.shape.as_slice(), Data::Float(&t.data, ty)))
        .chain(fixed.iter().map(|(n, f)| (n.as_str(), f.dtype, f.shape.as_slice(), Data::Fixed(&f.bytes))))
        .collect();
    all.sort_by(|(ln, ld, ..), (rn, rd, ..)| rd.cmp(ld).then(ln.cmp(rn)));
    let mut infos = Vec::with_capacity(all.len());
    let mut offset = 0usize;
    for (name, dtype, shape, data) in &all {
        let len = match data {
            Data::Float(v, ty) => v.len() * ty.size(),
            Data::Fixed(b) => b.len(),
        };
        let info = safetensors::tensor::TensorInfo {
            dtype: *dtype,
            shape: shape.to_vec(),
            data_offsets: (offset, offset + len),
        };
        infos.push(((*name).to_owned(), info));
        offset += len;
    }
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let metadata = safetensors::tensor::Metadata::new(None, infos).map_err(|e| invalid(e.to_string()))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| invalid(e.to_string()))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    let mut buf = Vec::with_capacity(WRITE_CHUNK);
    for (_, _, _, data) in all {
        match data {
            Data::Fixed(b) => w.write_all(b)?,
            Data::Float(values, ty) => {
                for part in values.chunks(WRITE_CHUNK / ty.size()) {
                    buf.clear();
                    ty.write_into(part, &mut buf);
                    w.write_all(&buf)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

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

    fn mixed() -> Vec<u8> {
        let w: Vec<u8> =
            [1.5f32, -2.25, 3.0, 65504.0].iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        let b: Vec<u8> = [0.1f64, -7.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let g: Vec<u8> = [1.0f32, 0.5].iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        let n: Vec<u8> = 42i64.to_le_bytes().to_vec();
        let views = vec![
            ("w".to_string(), TensorView::new(Dtype::F16, vec![2, 2], &w).unwrap()),
            ("b".to_string(), TensorView::new(Dtype::F64, vec![2], &b).unwrap()),
            ("g".to_string(), TensorView::new(Dtype::BF16, vec![2], &g).unwrap()),
            ("bn.num_batches_tracked".to_string(), TensorView::new(Dtype::I64, vec![], &n).unwrap()),
        ];
        safetensors::serialize(views, None).unwrap()
    }

    #[test]
    fn encoding_gives_the_bytes_safetensors_writes() {
        let mut model = Model::decode(&mixed(), TensorLimits::default()).unwrap();
        // Past one chunk of conversion, so the chunked writer is what is compared.
        let long: Vec<f32> = (0..(WRITE_CHUNK / 2 + 3)).map(|i| i as f32 * 0.5).collect();
        model.floats.0.insert("long".into(), Tensor { shape: vec![long.len()], data: long });
        model.types.insert("long".into(), FloatType::F16);
        let converted: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = model
            .floats
            .0
            .iter()
            .map(|(n, t)| {
                let ty = model.float_type(n);
                let mut b = Vec::new();
                ty.write_into(&t.data, &mut b);
                (n.clone(), ty.dtype(), t.shape.clone(), b)
            })
            .chain(model.fixed.iter().map(|(n, f)| (n.clone(), f.dtype, f.shape.clone(), f.bytes.clone())))
            .collect();
        let views: Vec<(String, TensorView<'_>)> =
            converted.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        let expected = safetensors::serialize(views, None).unwrap();
        assert!(model.encode() == expected);
        let mut streamed = Vec::new();
        model.write_to(&mut streamed).unwrap();
        assert!(streamed == expected);
        // Rounded to its types once, a model encodes to the same bytes again.
        assert!(Model::decode(&expected, TensorLimits::default()).unwrap().encode() == expected);
    }

    #[test]
    fn models_keep_every_dtype() {
        let bytes = mixed();
        let m = Model::decode(&bytes, TensorLimits::default()).unwrap();
        assert_eq!(m.floats.0["w"].data, vec![1.5, -2.25, 3.0, 65504.0]);
        assert_eq!(m.floats.0["b"].data, vec![0.1f64 as f32, -7.0]);
        assert_eq!(m.floats.0["g"].data, vec![1.0, 0.5]);
        assert_eq!(m.float_type("w"), FloatType::F16);
        assert_eq!(m.float_type("b"), FloatType::F64);
        assert_eq!(m.float_type("g"), FloatType::BF16);
        let n = &m.fixed["bn.num_batches_tracked"];
        assert_eq!((n.dtype, n.shape.as_slice(), n.bytes.as_slice()), (Dtype::I64, &[][..], &42i64.to_le_bytes()[..]));
        // Written back in the same types: F16, BF16 and I64 bytes are the same.
        let again = m.encode();
        let st = SafeTensors::deserialize(&again).unwrap();
        let orig = SafeTensors::deserialize(&bytes).unwrap();
        for name in ["w", "g", "bn.num_batches_tracked"] {
            assert_eq!(st.tensor(name).unwrap(), orig.tensor(name).unwrap(), "{name}");
        }
        assert_eq!(st.tensor("b").unwrap().dtype(), Dtype::F64);
        assert_eq!(Model::decode(&again, TensorLimits::default()).unwrap(), m);
        assert_eq!(again, m.encode(), "deterministic");
        // F16 rounds to nearest on the way out.
        let mut up = m.clone();
        up.floats.0.get_mut("w").unwrap().data[0] = 1.0 + 1.0 / 4096.0;
        let back = Model::decode(&up.encode(), TensorLimits::default()).unwrap();
        assert_eq!(back.floats.0["w"].data[0], 1.0);
        // The strict reader still refuses them.
        let e = Tensors::decode(&bytes, TensorLimits::default()).unwrap_err();
        assert!(matches!(e, TensorError::Dtype { .. }), "{e}");
    }

    #[test]
    fn model_layouts_compare_types_and_fixed_tensors() {
        let m = Model::decode(&mixed(), TensorLimits::default()).unwrap();
        assert!(m.check_same_layout(&m.clone()).is_ok());
        let mut f32s = m.clone();
        f32s.types.remove("w");
        let e = m.check_same_layout(&f32s).unwrap_err();
        assert!(e.to_string().contains("\"w\" is F32, expected F16"), "{e}");
        let mut no_counter = m.clone();
        no_counter.fixed.clear();
        assert!(m.check_same_layout(&no_counter).is_err());
        let mut wrong = m.clone();
        wrong.fixed.get_mut("bn.num_batches_tracked").unwrap().dtype = Dtype::I32;
        let e = m.check_same_layout(&wrong).unwrap_err();
        assert!(e.to_string().contains("num_batches_tracked"), "{e}");
    }

    #[test]
    fn models_refuse_hostile_blobs_and_tiny_floats() {
        let lim = TensorLimits::default();
        let good = mixed();
        assert!(Model::decode(&good[..good.len() - 1], lim).is_err());
        assert!(matches!(
            Model::decode(&good, TensorLimits { max_bytes: 10, max_tensors: 9 }),
            Err(TensorError::TooLarge(_))
        ));
        assert!(matches!(
            Model::decode(&good, TensorLimits { max_bytes: 1 << 20, max_tensors: 2 }),
            Err(TensorError::TooLarge(_))
        ));
        let bytes = [1u8, 2];
        let v = TensorView::new(Dtype::F8_E4M3, vec![2], &bytes).unwrap();
        let blob = safetensors::serialize(vec![("x".to_string(), v)], None).unwrap();
        let e = Model::decode(&blob, lim).unwrap_err();
        assert!(e.to_string().contains("F8_E4M3") && e.to_string().contains("F16"), "{e}");
    }
}
