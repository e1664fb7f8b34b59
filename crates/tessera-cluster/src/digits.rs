//! The digits data set (8x8 images of handwritten digits, 1797 samples, 10 classes) as
//! node shards and a held-out test split.
//!
//! Files are safetensors with `x` (F32, [n, 64], pixel values scaled to [0, 1]) and `y`
//! (I64, [n]).

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use tessera_core::select::SplitMix64;

/// Features per sample.
pub const FEATURES: usize = 64;
/// Classes.
pub const CLASSES: usize = 10;

/// Rows of the data set.
#[derive(Clone, Debug, Default)]
pub struct Rows {
    /// Row-major features.
    pub x: Vec<f32>,
    /// Labels.
    pub y: Vec<i64>,
}

impl Rows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.y.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }
    fn push(&mut self, x: &[f32], y: i64) {
        self.x.extend_from_slice(x);
        self.y.push(y);
    }

    /// Writes the rows as a safetensors file.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let x: Vec<u8> = self.x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let y: Vec<u8> = self.y.iter().flat_map(|v| v.to_le_bytes()).collect();
        let n = self.len();
        let views = vec![
            ("x".to_string(), TensorView::new(Dtype::F32, vec![n, FEATURES], &x).map_err(std::io::Error::other)?),
            ("y".to_string(), TensorView::new(Dtype::I64, vec![n], &y).map_err(std::io::Error::other)?),
        ];
        let bytes = safetensors::serialize(views, None).map_err(std::io::Error::other)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, bytes)
    }
}

/// The whole data set, shuffled with `seed`, split into `shards` training shards of equal
/// size (give or take one) and a test split of `test_fraction`.
pub fn split(shards: usize, test_fraction: f64, seed: u64) -> (Vec<Rows>, Rows) {
    let data = smartcore::dataset::digits::load_dataset();
    let n = data.num_samples;
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed);
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let n_test = ((n as f64) * test_fraction).round() as usize;
    let shards = shards.max(1);
    let mut test = Rows::default();
    let mut train = vec![Rows::default(); shards];
    for (k, &i) in order.iter().enumerate() {
        let x: Vec<f32> = data.data[i * FEATURES..(i + 1) * FEATURES].iter().map(|v| v / 16.0).collect();
        let y = data.target[i] as i64;
        if k < n_test {
            test.push(&x, y);
        } else {
            train[(k - n_test) % shards].push(&x, y);
        }
    }
    (train, test)
}

/// The share of `rows` a softmax-regression model classifies right: the model is
/// safetensors with `w` (f32 [classes, FEATURES]) and `b` (f32 [classes]), the class the
/// argmax of `w x + b`. Errors when the bytes are not such a model.
pub fn accuracy(model: &[u8], rows: &Rows) -> Result<f64, String> {
    use tessera_core::tensor::{TensorLimits, Tensors};
    let t = Tensors::decode(model, TensorLimits::default()).map_err(|e| e.to_string())?;
    let (Some(w), Some(b)) = (t.0.get("w"), t.0.get("b")) else {
        return Err("the model has no `w` and `b`".into());
    };
    let classes = b.data.len();
    if classes == 0 || w.data.len() != classes * FEATURES {
        return Err(format!("`w` has {} values; expected {classes} x {FEATURES}", w.data.len()));
    }
    if rows.is_empty() {
        return Err("no rows".into());
    }
    let correct = (0..rows.len())
        .filter(|&i| {
            let x = &rows.x[i * FEATURES..(i + 1) * FEATURES];
            let score = |c: usize| b.data[c] + (0..FEATURES).map(|j| w.data[c * FEATURES + j] * x[j]).sum::<f32>();
            (0..classes).max_by(|&a, &c| score(a).total_cmp(&score(c))).is_some_and(|best| best as i64 == rows.y[i])
        })
        .count();
    Ok(correct as f64 / rows.len() as f64)
}

/// Files written by [`prepare`].
#[derive(Clone, Debug)]
pub struct Prepared {
    /// One training shard per node.
    pub shards: Vec<PathBuf>,
    /// The held-out test split.
    pub test: PathBuf,
    /// Training rows in all.
    pub train_rows: usize,
    /// Test rows.
    pub test_rows: usize,
}

/// Writes `shards` training shards under `dir/node-<k>/digits.safetensors` and the test
/// split at `dir/coordinator/digits-test.safetensors`.
pub fn prepare(dir: &Path, shards: usize, test_fraction: f64, seed: u64) -> std::io::Result<Prepared> {
    let (train, test) = split(shards, test_fraction, seed);
    let mut paths = Vec::new();
    for (k, rows) in train.iter().enumerate() {
        let p = dir.join(format!("node-{k}")).join("digits.safetensors");
        rows.write(&p)?;
        paths.push(p);
    }
    let test_path = dir.join("coordinator").join("digits-test.safetensors");
    test.write(&test_path)?;
    Ok(Prepared {
        shards: paths,
        test: test_path,
        train_rows: train.iter().map(Rows::len).sum(),
        test_rows: test.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_scores_a_softmax_model() {
        use tessera_core::tensor::{Tensor, Tensors};
        let (_, test) = split(4, 0.2, 7);
        // A model that always answers 3 is right on exactly the rows labelled 3.
        let mut b = vec![0.0f32; CLASSES];
        b[3] = 1.0;
        let model = Tensors(
            [
                ("w".to_string(), Tensor { shape: vec![CLASSES, FEATURES], data: vec![0.0; CLASSES * FEATURES] }),
                ("b".to_string(), Tensor { shape: vec![CLASSES], data: b }),
            ]
            .into(),
        )
        .encode();
        let threes = test.y.iter().filter(|&&y| y == 3).count() as f64 / test.len() as f64;
        assert!((accuracy(&model, &test).unwrap() - threes).abs() < 1e-12);
        assert!(accuracy(b"not a model", &test).is_err());
        assert!(accuracy(&model, &Rows::default()).is_err());
    }

    #[test]
    fn splits_cover_the_data_set_once() {
        let (train, test) = split(4, 0.2, 7);
        assert_eq!(train.iter().map(Rows::len).sum::<usize>() + test.len(), 1797);
        assert_eq!(test.len(), 359);
        for s in &train {
            assert!((359..=360).contains(&s.len()));
            assert_eq!(s.x.len(), s.len() * FEATURES);
        }
        assert!(train[0].x.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(test.y.iter().all(|y| (0..10).contains(y)));
        // Seeded: same seed, same split.
        assert_eq!(split(4, 0.2, 7).1.y, test.y);
        assert_ne!(split(4, 0.2, 8).1.y, test.y);
    }
}
