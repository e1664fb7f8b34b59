//! Multinomial logistic regression trained with mini-batch SGD.

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::Deserialize;

/// The worker's config.
#[derive(Deserialize)]
pub struct Config {
    /// `init`, `train` or `evaluate`.
    pub mode: String,
    /// Dataset name on the node.
    #[serde(default = "default_dataset")]
    pub dataset: String,
    /// Input features.
    pub features: usize,
    /// Classes.
    pub classes: usize,
    /// Learning rate.
    #[serde(default = "default_lr")]
    pub lr: f32,
    /// Passes over the local data per task.
    #[serde(default = "one")]
    pub epochs: usize,
    /// Mini-batch size.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Shuffle seed.
    #[serde(default)]
    pub seed: u64,
    /// FedProx proximal term (0 disables it).
    #[serde(default)]
    pub proximal_mu: f32,
    /// In a simulation, this participant's part of the dataset: rows `i` with
    /// `i % partitions == partition`.
    #[serde(default)]
    pub partition: usize,
    /// How many participants share the dataset (1: all rows are this participant's).
    #[serde(default = "one")]
    pub partitions: usize,
}

fn default_dataset() -> String {
    "digits".into()
}
fn default_lr() -> f32 {
    0.1
}
fn one() -> usize {
    1
}
fn default_batch() -> usize {
    32
}

/// Parameters: `w` [classes, features] and `b` [classes].
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// Classes.
    pub classes: usize,
    /// Features.
    pub features: usize,
    /// Weights, row-major.
    pub w: Vec<f32>,
    /// Biases.
    pub b: Vec<f32>,
}

fn f32s(view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    match view.dtype() {
        Dtype::F32 => Ok(view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        Dtype::I64 => {
            Ok(view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect())
        }
        d => Err(format!("unsupported dtype {d:?}")),
    }
}

impl Params {
    /// All zeros.
    pub fn zeros(classes: usize, features: usize) -> Self {
        Params { classes, features, w: vec![0.0; classes * features], b: vec![0.0; classes] }
    }

    /// Reads parameters from safetensors bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| format!("model is not safetensors: {e}"))?;
        let w = st.tensor("w").map_err(|e| format!("model has no tensor w: {e}"))?;
        let b = st.tensor("b").map_err(|e| format!("model has no tensor b: {e}"))?;
        let (&[classes, features], &[bc]) = (w.shape(), b.shape()) else {
            return Err("model tensors must be w [classes, features] and b [classes]".into());
        };
        if bc != classes {
            return Err(format!("b has {bc} classes, w has {classes}"));
        }
        Ok(Params { classes, features, w: f32s(&w)?, b: f32s(&b)? })
    }

    /// Writes parameters as safetensors bytes.
    pub fn encode(&self) -> Vec<u8> {
        let w: Vec<u8> = self.w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let b: Vec<u8> = self.b.iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            ("b".to_string(), TensorView::new(Dtype::F32, vec![self.classes], &b).unwrap()),
            ("w".to_string(), TensorView::new(Dtype::F32, vec![self.classes, self.features], &w).unwrap()),
        ];
        safetensors::serialize(views, None).unwrap()
    }

    fn logits(&self, x: &[f32], out: &mut [f32]) {
        for (c, o) in out.iter_mut().enumerate() {
            *o = self.b[c] + dot(&self.w[c * self.features..(c + 1) * self.features], x);
        }
    }
}

/// Lanes of [`dot`]'s partial sums: two 128-bit WebAssembly SIMD vectors of f32.
const LANES: usize = 8;

/// The dot product of `a` and `b` (the shorter's length), summed in [`LANES`] partial
/// sums then added together: a fixed order (the same result on every machine) that the
/// compiler turns into SIMD additions, which a single running sum cannot be.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let (ac, ar) = a.as_chunks::<LANES>();
    let (bc, br) = b.as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for (x, y) in ac.iter().zip(bc) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// A dataset: `x` [n, features] and labels `y` [n].
pub struct Dataset {
    /// Rows.
    pub n: usize,
    /// Features, row-major.
    pub x: Vec<f32>,
    /// Labels.
    pub y: Vec<usize>,
}

impl Dataset {
    /// Reads `x` and `y` from safetensors bytes.
    pub fn decode(bytes: &[u8], features: usize) -> Result<Self, String> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| format!("dataset is not safetensors: {e}"))?;
        let x = st.tensor("x").map_err(|e| format!("dataset has no tensor x: {e}"))?;
        let y = st.tensor("y").map_err(|e| format!("dataset has no tensor y: {e}"))?;
        let &[n, f] = x.shape() else { return Err("x must be [n, features]".into()) };
        if f != features {
            return Err(format!("dataset has {f} features, the model {features}"));
        }
        if y.shape() != [n] {
            return Err(format!("y must be [{n}]"));
        }
        let y: Vec<usize> = f32s(&y)?.into_iter().map(|v| v as usize).collect();
        Ok(Dataset { n, x: f32s(&x)?, y })
    }

    /// Keeps rows `i % parts == part` (a simulated participant's share).
    pub fn partition(self, part: usize, parts: usize, features: usize) -> Result<Self, String> {
        if parts <= 1 {
            return Ok(self);
        }
        if part >= parts {
            return Err(format!("partition {part} of {parts} does not exist"));
        }
        let rows: Vec<usize> = (part..self.n).step_by(parts).collect();
        let x = rows.iter().flat_map(|&i| self.row(i, features).iter().copied()).collect();
        let y = rows.iter().map(|&i| self.y[i]).collect();
        Ok(Dataset { n: rows.len(), x, y })
    }

    fn row(&self, i: usize, features: usize) -> &[f32] {
        &self.x[i * features..(i + 1) * features]
    }
}

/// What a run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// Examples seen.
    pub num_examples: u64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction classified correctly.
    pub accuracy: f64,
}

impl Metrics {
    /// As JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        format!(
            "{{\"num_examples\":{},\"loss\":{},\"accuracy\":{}}}",
            self.num_examples,
            if self.loss.is_finite() { self.loss } else { f64::MAX },
            self.accuracy
        )
        .into_bytes()
    }
}

fn softmax_in_place(z: &mut [f32]) {
    let max = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in z.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in z.iter_mut() {
        *v /= sum;
    }
}

fn check_labels(data: &Dataset, classes: usize) -> Result<(), String> {
    match data.y.iter().find(|&&y| y >= classes) {
        Some(y) => Err(format!("label {y} is out of range for {classes} classes")),
        None => Ok(()),
    }
}

/// Mini-batch SGD on cross-entropy; returns new parameters and the mean training loss.
pub fn train(mut p: Params, data: &Dataset, cfg: &Config) -> Result<(Params, Metrics), String> {
    check_labels(data, p.classes)?;
    if data.n == 0 {
        return Err("the dataset is empty".into());
    }
    let start = p.clone();
    let (c, f) = (p.classes, p.features);
    let batch = cfg.batch_size.max(1);
    let mut order: Vec<usize> = (0..data.n).collect();
    let mut rng = cfg.seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut z = vec![0.0f32; c];
    let mut gw = vec![0.0f32; c * f];
    let mut gb = vec![0.0f32; c];
    let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0u64, 0u64);
    for _ in 0..cfg.epochs.max(1) {
        for i in (1..order.len()).rev() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            order.swap(i, (rng % (i as u64 + 1)) as usize);
        }
        for chunk in order.chunks(batch) {
            gw.fill(0.0);
            gb.fill(0.0);
            for &i in chunk {
                let x = data.row(i, f);
                p.logits(x, &mut z);
                let pred = z.iter().enumerate().fold(0, |best, (k, v)| if *v > z[best] { k } else { best });
                softmax_in_place(&mut z);
                let y = data.y[i];
                loss_sum += -f64::from(z[y].max(1e-12).ln());
                correct += u64::from(pred == y);
                seen += 1;
                z[y] -= 1.0;
                for k in 0..c {
                    let g = z[k];
                    gb[k] += g;
                    for (gwk, xv) in gw[k * f..(k + 1) * f].iter_mut().zip(x) {
                        *gwk += g * xv;
                    }
                }
            }
            let scale = cfg.lr / chunk.len() as f32;
            for (k, (w, g)) in p.w.iter_mut().zip(&gw).enumerate() {
                let prox = cfg.proximal_mu * (*w - start.w[k]);
                *w -= scale * g + cfg.lr * prox;
            }
            for (k, (b, g)) in p.b.iter_mut().zip(&gb).enumerate() {
                let prox = cfg.proximal_mu * (*b - start.b[k]);
                *b -= scale * g + cfg.lr * prox;
            }
        }
    }
    let metrics =
        Metrics { num_examples: data.n as u64, loss: loss_sum / seen as f64, accuracy: correct as f64 / seen as f64 };
    Ok((p, metrics))
}

/// Loss and accuracy of `p` on `data`.
pub fn evaluate(p: &Params, data: &Dataset) -> Result<Metrics, String> {
    check_labels(data, p.classes)?;
    if data.n == 0 {
        return Err("the dataset is empty".into());
    }
    let mut z = vec![0.0f32; p.classes];
    let (mut loss, mut correct) = (0.0f64, 0u64);
    for i in 0..data.n {
        p.logits(data.row(i, p.features), &mut z);
        let pred = z.iter().enumerate().fold(0, |best, (k, v)| if *v > z[best] { k } else { best });
        softmax_in_place(&mut z);
        loss += -f64::from(z[data.y[i]].max(1e-12).ln());
        correct += u64::from(pred == data.y[i]);
    }
    Ok(Metrics { num_examples: data.n as u64, loss: loss / data.n as f64, accuracy: correct as f64 / data.n as f64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Dataset {
        // Two separable classes in two features.
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..100 {
            let t = i as f32 / 100.0;
            x.extend_from_slice(&[1.0 + t, 0.0]);
            y.push(0);
            x.extend_from_slice(&[0.0, 1.0 + t]);
            y.push(1);
        }
        Dataset { n: 200, x, y }
    }

    #[test]
    fn learns_a_separable_problem() {
        let cfg: Config =
            serde_json::from_str(r#"{"mode":"train","features":2,"classes":2,"lr":0.5,"epochs":5}"#).unwrap();
        let data = toy();
        let before = evaluate(&Params::zeros(2, 2), &data).unwrap();
        let (p, m) = train(Params::zeros(2, 2), &data, &cfg).unwrap();
        let after = evaluate(&p, &data).unwrap();
        assert!(after.loss < before.loss);
        assert_eq!(after.accuracy, 1.0);
        assert_eq!(m.num_examples, 200);
        assert_eq!(Params::decode(&p.encode()).unwrap(), p);
    }

    #[test]
    fn partitions_split_the_rows() {
        let parts: Vec<Dataset> = (0..3).map(|k| toy().partition(k, 3, 2).unwrap()).collect();
        assert_eq!(parts.iter().map(|d| d.n).sum::<usize>(), 200);
        assert_eq!(parts[0].n, 67);
        assert_eq!(parts[1].row(0, 2), toy().row(1, 2));
        assert_eq!(toy().partition(0, 1, 2).unwrap().n, 200);
        assert!(toy().partition(3, 3, 2).is_err());
    }

    #[test]
    fn dot_sums_every_pair_of_any_length() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 2.0).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() <= 1e-4 * plain.abs().max(1.0), "n = {n}");
            // The shorter slice bounds the sum.
            assert_eq!(dot(&a, &b[..n / 2]), dot(&a[..n / 2], &b[..n / 2]));
        }
    }

    #[test]
    fn refuses_bad_labels() {
        let mut d = toy();
        d.y[0] = 7;
        assert!(evaluate(&Params::zeros(2, 2), &d).is_err());
    }
}
