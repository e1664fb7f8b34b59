//! The synthetic federated data set of FedProx (Li et al., 2020, "Federated Optimization in
//! Heterogeneous Networks", §5.1, and its `data/synthetic_*/generate_niid.py`), generated on
//! the spot from a seed, so a population of any size costs nothing to hold.
//!
//! Device `k` draws `u_k ~ N(0, alpha^2)` and `B_k ~ N(0, beta^2)` (the paper writes
//! variances; its generator passes `alpha` and `beta` to numpy as standard deviations, and
//! so does this one); its own model
//! `W_k [classes, features], b_k [classes] ~ N(u_k, 1)` and feature means
//! `v_k [features] ~ N(B_k, 1)`; its rows `x ~ N(v_k, Sigma)` with `Sigma = diag(j^-1.2)`
//! (`j` from 1) and labels `y = argmax(W_k x + b_k)`. `alpha` sets how much devices' models
//! differ (label skew), `beta` how much their features do (feature skew). A device holds
//! `min_samples + floor(lognormal(mu, sigma))` rows, at most `max_samples` (FedProx: 50 +
//! lognormal(4, 2), uncapped).

use serde::Deserialize;

use crate::softmax::Dataset;

/// A node's dataset file that describes the data set rather than holding it:
/// `{"synthetic": {"alpha": 1, "beta": 1, "seed": 0}}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    synthetic: Synthetic,
}

/// The parameters of Synthetic(alpha, beta).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Synthetic {
    /// Standard deviation of the devices' model means (0: every device labels alike).
    pub alpha: f64,
    /// Standard deviation of the devices' feature means (0: every device's features alike).
    pub beta: f64,
    /// The population's seed.
    #[serde(default)]
    pub seed: u64,
    /// Rows every device holds at least (FedProx: 50).
    #[serde(default = "default_min")]
    pub min_samples: usize,
    /// `mu` of the log-normal extra rows (FedProx: 4).
    #[serde(default = "default_mu")]
    pub lognormal_mu: f64,
    /// `sigma` of the log-normal extra rows (FedProx: 2).
    #[serde(default = "default_sigma")]
    pub lognormal_sigma: f64,
    /// Rows a device holds at most (FedProx has no cap; its tail reaches tens of thousands).
    #[serde(default = "default_max")]
    pub max_samples: usize,
}

fn default_min() -> usize {
    50
}
fn default_mu() -> f64 {
    4.0
}
fn default_sigma() -> f64 {
    2.0
}
fn default_max() -> usize {
    1000
}

/// Most rows a device may be asked to hold.
const MOST_SAMPLES: usize = 100_000;

impl Synthetic {
    /// The spec in a dataset file, `None` when the file is not a synthetic spec (a
    /// safetensors file starts with its header length, never with `{`). Refuses bad
    /// parameters by name.
    pub fn from_dataset(bytes: &[u8]) -> Option<Result<Synthetic, String>> {
        if bytes.first() != Some(&b'{') {
            return None;
        }
        Some(
            serde_json::from_slice::<File>(bytes)
                .map_err(|e| format!("synthetic dataset spec: {e}"))
                .and_then(|f| f.synthetic.check()),
        )
    }

    fn check(self) -> Result<Synthetic, String> {
        for (name, v) in [("alpha", self.alpha), ("beta", self.beta), ("lognormal_sigma", self.lognormal_sigma)] {
            if !(v.is_finite() && (0.0..=1000.0).contains(&v)) {
                return Err(format!("synthetic dataset spec: {name} = {v} must be within [0, 1000]"));
            }
        }
        if !self.lognormal_mu.is_finite() || self.lognormal_mu.abs() > 20.0 {
            return Err(format!(
                "synthetic dataset spec: lognormal_mu = {} must be within [-20, 20]",
                self.lognormal_mu
            ));
        }
        if self.min_samples == 0 || self.min_samples > self.max_samples || self.max_samples > MOST_SAMPLES {
            return Err(format!(
                "synthetic dataset spec: need 1 <= min_samples ({}) <= max_samples ({}) <= {MOST_SAMPLES}",
                self.min_samples, self.max_samples
            ));
        }
        Ok(self)
    }

    /// The device a simulated participant is: partition `partition` of node `node`.
    pub fn device_of(&self, node: &str, partition: usize) -> u64 {
        // FNV-1a over the node's name, then the partition mixed in.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in node.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^ (partition as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// Device `device`'s rows, for a model of `features` inputs and `classes` outputs.
    pub fn device(&self, device: u64, features: usize, classes: usize) -> Result<Dataset, String> {
        if features == 0 || classes < 2 || features.saturating_mul(classes) > 1_000_000 {
            return Err(format!(
                "synthetic data needs at least 1 feature, 2 classes and at most 1,000,000 weights, not {features} x {classes}"
            ));
        }
        if self.max_samples.saturating_mul(features) > 50_000_000 {
            return Err(format!(
                "synthetic data of {} rows of {features} features is more than 50,000,000 values",
                self.max_samples
            ));
        }
        let mut g = Gaussian::new(self.seed ^ device.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        let u = g.normal(0.0, self.alpha);
        let big_b = g.normal(0.0, self.beta);
        let w: Vec<f64> = (0..classes * features).map(|_| g.normal(u, 1.0)).collect();
        let b: Vec<f64> = (0..classes).map(|_| g.normal(u, 1.0)).collect();
        let v: Vec<f64> = (0..features).map(|_| g.normal(big_b, 1.0)).collect();
        let std: Vec<f64> = (1..=features).map(|j| (j as f64).powf(-0.6)).collect();
        let extra = g.normal(self.lognormal_mu, self.lognormal_sigma).exp();
        let n = (self.min_samples as f64 + extra.floor()).min(self.max_samples as f64) as usize;
        let mut x = Vec::with_capacity(n * features);
        let mut y = Vec::with_capacity(n);
        let mut row = vec![0.0f64; features];
        for _ in 0..n {
            for (j, r) in row.iter_mut().enumerate() {
                *r = g.normal(v[j], std[j]);
            }
            let label = (0..classes)
                .map(|c| b[c] + w[c * features..(c + 1) * features].iter().zip(&row).map(|(a, x)| a * x).sum::<f64>())
                .enumerate()
                .fold((0, f64::NEG_INFINITY), |best, (c, z)| if z > best.1 { (c, z) } else { best })
                .0;
            x.extend(row.iter().map(|&v| v as f32));
            y.push(label);
        }
        Ok(Dataset { n, x, y })
    }
}

/// Standard normal draws (Box–Muller) from SplitMix64 (Steele et al., 2014).
struct Gaussian {
    state: u64,
    spare: Option<f64>,
}

impl Gaussian {
    fn new(seed: u64) -> Self {
        Gaussian { state: seed, spare: None }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self, mean: f64, std: f64) -> f64 {
        let z = match self.spare.take() {
            Some(z) => z,
            None => {
                let (u1, u2) = (self.uniform(), self.uniform());
                let r = (-2.0 * u1.ln()).sqrt();
                let t = 2.0 * std::f64::consts::PI * u2;
                self.spare = Some(r * t.sin());
                r * t.cos()
            }
        };
        mean + std * z
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(alpha: f64, beta: f64) -> Synthetic {
        Synthetic::from_dataset(
            format!(r#"{{"synthetic": {{"alpha": {alpha}, "beta": {beta}, "seed": 3}}}}"#).as_bytes(),
        )
        .unwrap()
        .unwrap()
    }

    #[test]
    fn devices_are_deterministic_and_differ() {
        let s = spec(1.0, 1.0);
        let a = s.device(s.device_of("node-0", 7), 60, 10).unwrap();
        let again = s.device(s.device_of("node-0", 7), 60, 10).unwrap();
        assert_eq!((a.n, &a.x, &a.y), (again.n, &again.x, &again.y));
        assert!(a.n >= 50 && a.n <= 1000, "{} rows", a.n);
        assert_eq!(a.x.len(), a.n * 60);
        let other = s.device(s.device_of("node-1", 7), 60, 10).unwrap();
        assert_ne!(a.x, other.x, "another node's partition 7 is another device");
        assert!(a.y.iter().all(|&y| y < 10));
    }

    #[test]
    fn alpha_skews_labels() {
        // With alpha = beta = 0 devices share a model family; with large alpha a device's
        // labels concentrate on few classes.
        let distinct = |s: &Synthetic| {
            let mut total = 0;
            for k in 0..20 {
                let d = s.device(k, 60, 10).unwrap();
                let mut seen = [false; 10];
                d.y.iter().for_each(|&y| seen[y] = true);
                total += seen.iter().filter(|&&b| b).count();
            }
            total
        };
        assert!(distinct(&spec(0.0, 0.0)) > distinct(&spec(10.0, 10.0)));
    }

    #[test]
    fn bad_specs_are_refused_by_name() {
        assert!(Synthetic::from_dataset(b"\x08\0\0\0\0\0\0\0{}").is_none(), "safetensors is not a spec");
        let e = Synthetic::from_dataset(br#"{"synthetic": {"alpha": -1, "beta": 1}}"#).unwrap().unwrap_err();
        assert!(e.contains("alpha"), "{e}");
        let e = Synthetic::from_dataset(br#"{"synthetic": {"alpha": 1, "beta": 1e300}}"#).unwrap().unwrap_err();
        assert!(e.contains("beta"), "{e}");
        assert!(spec(1.0, 1.0).device(1, 100_000, 100).is_err(), "too many weights");
        assert!(spec(1.0, 1.0).device(1, 60_000, 10).is_err(), "too many values");
        let e = Synthetic::from_dataset(br#"{"synthetic": {"alpha": 1, "beta": 1, "max_samples": 1e9}}"#)
            .unwrap()
            .unwrap_err();
        assert!(e.contains("synthetic"), "{e}");
        let e = Synthetic::from_dataset(br#"{"synthetic": {"alpha": 1, "beta": 1, "min_samples": 0}}"#)
            .unwrap()
            .unwrap_err();
        assert!(e.contains("min_samples"), "{e}");
        let e = Synthetic::from_dataset(br#"{"synthetic": {"alpha": 1, "gamma": 1}}"#).unwrap().unwrap_err();
        assert!(e.contains("gamma") || e.contains("beta"), "{e}");
        assert!(spec(1.0, 1.0).device(1, 0, 10).is_err());
        assert!(spec(1.0, 1.0).device(1, 60, 1).is_err());
    }
}
