//! Differential privacy primitives: clipping, Gaussian noise, DP-FedAvg and the RDP
//! accountant against independently computed values.

use tessera_core::privacy::{
    BoxMuller, DEFAULT_ORDERS, Gaussian, PrivacyError, RdpAccountant, add_gaussian_noise, clip_l2,
    dp_fedavg_client_side, dp_fedavg_server_side, l2_norm, noise_mean, rdp_sampled_gaussian,
};
use tessera_core::select::SplitMix64;

fn sampler(seed: u64) -> BoxMuller<impl FnMut() -> u64> {
    let mut rng = SplitMix64::new(seed);
    BoxMuller::new(move || rng.next_u64())
}

/// A "noise" source that is always 0, to check the deterministic part.
struct NoNoise;

impl Gaussian for NoNoise {
    fn next_gaussian(&mut self) -> f64 {
        0.0
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs())
}

#[test]
fn clipping_scales_down_only_above_the_norm() {
    let mut v = vec![3.0f32, 4.0];
    assert_eq!(clip_l2(&mut v, 10.0).unwrap(), 5.0);
    assert_eq!(v, vec![3.0, 4.0]);
    assert_eq!(clip_l2(&mut v, 1.0).unwrap(), 5.0);
    let n = l2_norm(&v);
    assert!(n <= 1.0 && n > 1.0 - 1e-5, "{n}");
    assert!((v[0] / v[1] - 0.75).abs() < 1e-6, "direction kept");
    // Large values: the norm is computed in f64, no overflow.
    let mut big = vec![3e38f32; 4];
    assert_eq!(clip_l2(&mut big, 1.0).unwrap(), f32::INFINITY, "6e38 does not fit in an f32");
    assert!(l2_norm(&big) <= 1.0);
    // Hostile input: nothing changes.
    let mut bad = vec![1.0, f32::NAN, 2.0];
    assert_eq!(clip_l2(&mut bad, 1.0), Err(PrivacyError::NonFinite { update: 0, index: 1 }));
    assert_eq!(bad[0], 1.0);
    let mut inf = vec![f32::NEG_INFINITY];
    assert!(matches!(clip_l2(&mut inf, 1.0), Err(PrivacyError::NonFinite { .. })));
    for norm in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(clip_l2(&mut v, norm), Err(PrivacyError::Parameter(_))), "{norm}");
    }
    assert_eq!(clip_l2(&mut [], 1.0).unwrap(), 0.0);
}

#[test]
fn box_muller_is_standard_normal() {
    let mut g = sampler(42);
    let n = 200_000;
    let xs: Vec<f64> = (0..n).map(|_| g.next_gaussian()).collect();
    let mean = xs.iter().sum::<f64>() / n as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let kurt = xs.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n as f64 / (var * var);
    let tail = xs.iter().filter(|x| x.abs() > 2.0).count() as f64 / n as f64;
    // Standard errors: mean 0.0022, variance 0.0032, kurtosis 0.011, tail 0.00047.
    assert!(mean.abs() < 0.01, "mean {mean}");
    assert!((var - 1.0).abs() < 0.02, "variance {var}");
    assert!((kurt - 3.0).abs() < 0.07, "kurtosis {kurt}");
    assert!((tail - 0.0455).abs() < 0.003, "P(|x| > 2) = {tail}");
    assert!(xs.iter().all(|x| x.is_finite()));
    // Seeded: the same seed gives the same draws.
    let mut again = sampler(42);
    assert!(xs[..10].iter().all(|&x| x == again.next_gaussian()));
}

#[test]
fn gaussian_noise_has_the_asked_spread() {
    let mut v = vec![1.0f32; 100_000];
    add_gaussian_noise(&mut v, 0.5, &mut sampler(7)).unwrap();
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    let sd = (v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    assert!((mean - 1.0).abs() < 0.01, "{mean}");
    assert!((sd - 0.5).abs() < 0.01, "{sd}");
    for sigma in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(add_gaussian_noise(&mut v, sigma, &mut sampler(1)), Err(PrivacyError::Parameter(_))));
    }
}

#[test]
fn server_side_clipping_averages_clipped_updates_and_adds_noise() {
    let a = [0.3f32, 0.4]; // norm 0.5
    let b = [6.0f32, 8.0]; // norm 10, clipped to 1
    let c = [0.0f32, -2.0]; // norm 2, clipped to 1
    let agg = dp_fedavg_server_side(&[&a, &b, &c], 1.0, 0.8, &mut NoNoise).unwrap();
    assert_eq!(agg.norms, vec![0.5, 10.0, 2.0]);
    assert_eq!(agg.clipped, 2);
    assert!(close(agg.noise_std, 0.8 * 1.0 / 3.0, 1e-12));
    let want = [(0.3 + 0.6) / 3.0, (0.4 + 0.8 - 1.0) / 3.0];
    for (g, w) in agg.mean.iter().zip(want) {
        assert!((f64::from(*g) - w).abs() < 1e-5, "{g} vs {w}");
    }
    // With real noise: the mean's deviation has std z·C/n.
    let zero = vec![0f32; 50_000];
    let updates: Vec<&[f32]> = vec![&zero; 4];
    let agg = dp_fedavg_server_side(&updates, 2.0, 1.5, &mut sampler(3)).unwrap();
    let sd = (agg.mean.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / zero.len() as f64).sqrt();
    assert!(close(agg.noise_std, 0.75, 1e-12));
    assert!((sd - 0.75).abs() < 0.02, "{sd}");
}

#[test]
fn client_side_clipping_checks_the_norms() {
    let mut a = vec![3.0f32, 4.0];
    let mut b = vec![-1.0f32, 0.0];
    clip_l2(&mut a, 1.0).unwrap();
    clip_l2(&mut b, 1.0).unwrap();
    let agg = dp_fedavg_client_side(&[&a, &b], 1.0, 1.0, &mut NoNoise).unwrap();
    assert!((agg.mean[0] - (0.6 - 1.0) / 2.0).abs() < 1e-5 && (agg.mean[1] - 0.4).abs() < 1e-5);
    assert_eq!(agg.noise_std, 0.5);
    let raw = [3.0f32, 4.0];
    assert!(matches!(
        dp_fedavg_client_side(&[&a, &raw], 1.0, 1.0, &mut NoNoise),
        Err(PrivacyError::NotClipped { update: 1, .. })
    ));
    // With secure aggregation: the server noises the mean it computed from the sum.
    let mut mean = vec![0.1f32; 4];
    assert_eq!(noise_mean(&mut mean, 10, 1.0, 2.0, &mut NoNoise).unwrap(), 0.2);
    assert_eq!(noise_mean(&mut mean, 0, 1.0, 2.0, &mut NoNoise), Err(PrivacyError::NoUpdates));
    mean[2] = f32::INFINITY;
    assert!(matches!(noise_mean(&mut mean, 3, 1.0, 2.0, &mut NoNoise), Err(PrivacyError::NonFinite { index: 2, .. })));
}

#[test]
fn aggregation_refuses_hostile_updates() {
    let ok = [1.0f32, 2.0];
    let nan = [0.0f32, f32::NAN];
    let short = [1.0f32];
    let g = &mut NoNoise;
    for f in [dp_fedavg_server_side, dp_fedavg_client_side] {
        assert_eq!(f(&[&ok, &nan], 10.0, 1.0, g), Err(PrivacyError::NonFinite { update: 1, index: 1 }));
        assert_eq!(f(&[&ok, &short], 10.0, 1.0, g), Err(PrivacyError::Shape { update: 1, expected: 2, got: 1 }));
        assert_eq!(f(&[], 10.0, 1.0, g), Err(PrivacyError::NoUpdates));
        for (clip, z) in [(0.0, 1.0), (-1.0, 1.0), (f32::NAN, 1.0), (1.0, 0.0), (1.0, -2.0), (1.0, f64::INFINITY)] {
            assert!(matches!(f(&[&ok], clip, z, g), Err(PrivacyError::Parameter(_))), "{clip} {z}");
        }
    }
}

#[test]
fn plain_gaussian_mechanism_matches_hand_computation() {
    // q = 1, z = 1, one step: RDP(α) = α/2.
    let mut acc = RdpAccountant::new();
    acc.step(1.0, 1.0, 1).unwrap();
    for (a, r) in acc.orders().iter().zip(acc.rdp()) {
        assert_eq!(*r, a / 2.0);
    }
    // Classic conversion: min over orders of α/2 + ln(1/δ)/(α - 1); the best order is 6.
    let (eps, order) = acc.epsilon_classic(1e-5).unwrap();
    assert_eq!(order, 6.0);
    assert!(close(eps, 3.0 + (1e5f64).ln() / 5.0, 1e-14), "{eps}");
    assert!(close(eps, 5.302585092994046, 1e-14));
    // Balle et al. 2020: α/2 + ln(1 - 1/α) - ln(δα)/(α - 1), best at α = 5.
    let (eps, order) = acc.epsilon(1e-5).unwrap();
    assert_eq!(order, 5.0);
    assert!(close(eps, 2.5 + (0.8f64).ln() - (5e-5f64).ln() / 4.0, 1e-14), "{eps}");
    assert!(close(eps, 4.752728336819822, 1e-13));
    // Steps compose linearly: 4 steps at z = 2 are one step at z = 1.
    let mut four = RdpAccountant::new();
    four.step(2.0, 1.0, 4).unwrap();
    assert_eq!(four.rdp(), acc.rdp());
}

/// `ln A_α` for integer α by the binomial expansion, written independently of the crate:
/// plain f64 products, no log-space tricks (fine for α <= 32 here).
fn rdp_integer_order(q: f64, z: f64, alpha: u32) -> f64 {
    let mut sum = 0.0;
    let mut binom = 1.0;
    for i in 0..=alpha {
        let fi = f64::from(i);
        sum += binom * q.powi(i as i32) * (1.0 - q).powi((alpha - i) as i32) * ((fi * fi - fi) / (2.0 * z * z)).exp();
        binom = binom * f64::from(alpha - i) / (fi + 1.0);
    }
    sum.ln() / (f64::from(alpha) - 1.0)
}

#[test]
fn subsampled_gaussian_matches_the_binomial_expansion() {
    let (q, z, steps, delta) = (0.01, 1.1, 1000, 1e-5f64);
    let orders: Vec<f64> = (2..=32).map(f64::from).collect();
    let mut acc = RdpAccountant::with_orders(orders.clone()).unwrap();
    acc.step(z, q, steps).unwrap();
    let mut best = (f64::INFINITY, 0.0);
    for (&a, &r) in orders.iter().zip(acc.rdp()) {
        let want = rdp_integer_order(q, z, a as u32) * steps as f64;
        assert!(close(r, want, 1e-10), "order {a}: {r} vs {want}");
        let eps = want + (1.0 / delta).ln() / (a - 1.0);
        if eps < best.0 {
            best = (eps, a);
        }
    }
    let (eps, order) = acc.epsilon_classic(delta).unwrap();
    assert_eq!(order, best.1);
    assert!(close(eps, best.0, 1e-10), "{eps} vs {}", best.0);
}

#[test]
#[allow(clippy::excessive_precision)] // the reference digits as computed
fn subsampled_gaussian_matches_numerical_integration() {
    // Reference values: A_α = E_{x ~ N(0, z²)} [((1 - q) + q exp((2x - 1) / (2z²)))^α]
    // integrated numerically with mpmath at 40 digits, RDP = ln A_α / (α - 1). This checks
    // the fractional orders (erfc series) as well as the integer ones.
    let cases = [
        (0.01, 1.1, 1.25, 0.000079280055348681650548),
        (0.01, 1.1, 1.5, 0.000095545285718748299493),
        (0.01, 1.1, 2.0, 0.000128510081605161802909),
        (0.01, 1.1, 2.5, 0.000162077409370003713934),
        (0.01, 1.1, 4.5, 0.00030303934941345493468),
        (0.01, 1.1, 8.0, 0.000584070335520251082009),
        (0.01, 1.1, 32.0, 8.4694164336759256321),
        (0.05, 0.8, 3.5, 0.030512649939325490029),
        (0.05, 0.8, 10.5, 4.8920599983704747992),
        (0.2, 2.0, 1.75, 0.0097716758310479419229),
        (0.001, 5.0, 20.5, 4.1863054360365116463e-7),
    ];
    for (q, z, a, want) in cases {
        let got = rdp_sampled_gaussian(q, z, a).unwrap();
        // The series stops at terms below e^-30 (as TF-privacy's), about 1e-13 in ln A_α.
        assert!((got - want).abs() <= 1e-9 * want + 1e-12 / (a - 1.0), "q={q} z={z} α={a}: {got} vs {want}");
    }
    // The tutorial setting: q = 1 %, z = 1.1, 1000 steps, δ = 1e-5, over the default orders.
    let mut acc = RdpAccountant::new();
    acc.step(1.1, 0.01, 1000).unwrap();
    let (eps, order) = acc.epsilon_classic(1e-5).unwrap();
    assert_eq!(order, 10.0);
    assert!(close(eps, 2.086796113574304, 1e-9), "{eps}");
    let (eps, order) = acc.epsilon(1e-5).unwrap();
    assert_eq!(order, 9.0);
    assert!(close(eps, 1.725290818044955, 1e-9), "{eps}");
}

#[test]
fn accountant_edge_cases() {
    let mut acc = RdpAccountant::default();
    assert_eq!(acc.orders(), &DEFAULT_ORDERS[..]);
    // Nothing spent: ε is 0 with the improved conversion (the KL bound).
    assert_eq!(acc.epsilon(1e-5).unwrap().0, 0.0);
    acc.step(1.0, 0.0, 1_000_000).unwrap();
    assert!(acc.rdp().iter().all(|&r| r == 0.0), "q = 0 spends nothing");
    acc.step(1.0, 0.5, 0).unwrap();
    assert!(acc.rdp().iter().all(|&r| r == 0.0), "0 steps spend nothing");
    // Monotone: more steps, more ε; more noise, less ε.
    let eps = |z: f64, steps: u64| {
        let mut a = RdpAccountant::new();
        a.step(z, 0.02, steps).unwrap();
        a.epsilon(1e-6).unwrap().0
    };
    assert!(eps(1.0, 100) < eps(1.0, 200));
    assert!(eps(2.0, 100) < eps(1.0, 100));
    // Tiny noise: enormous but finite ε, or infinite; never NaN.
    let mut a = RdpAccountant::new();
    a.step(0.05, 0.5, 10).unwrap();
    let (e, _) = a.epsilon(1e-5).unwrap();
    assert!(e > 10.0 && !e.is_nan(), "{e}");
    // Hostile parameters.
    let before = acc.clone();
    for (z, q) in
        [(0.0, 0.1), (-1.0, 0.1), (f64::NAN, 0.1), (f64::INFINITY, 0.1), (1.0, -0.1), (1.0, 1.5), (1.0, f64::NAN)]
    {
        assert!(matches!(acc.step(z, q, 1), Err(PrivacyError::Parameter(_))), "{z} {q}");
    }
    assert_eq!(acc, before, "refused steps change nothing");
    for delta in [0.0, -1e-5, 1.0, f64::NAN] {
        assert!(acc.epsilon(delta).is_err() && acc.epsilon_classic(delta).is_err(), "{delta}");
    }
    for orders in [vec![], vec![1.0], vec![0.5], vec![f64::NAN], vec![1e9]] {
        assert!(RdpAccountant::with_orders(orders.clone()).is_err(), "{orders:?}");
    }
    assert!(rdp_sampled_gaussian(0.1, 1.0, 1.0).is_err());
}
