//! Secure aggregation and Shamir secret sharing, end to end through the wire encoding.

use std::collections::BTreeSet;

use tessera_core::select::SplitMix64;
use tessera_identity::secagg::{
    AdvertiseKeys, Coordinator, KeyDirectory, MaskedInput, Participant, SecAggConfig, SecAggError, ShareBundle,
    SharesFor, UnmaskRequest, UnmaskResponse, Unmasked, dequantize_sum, max_participants, quantize,
};
use tessera_identity::shamir::{ShamirError, Share, combine, split};

fn config(n: u16, t: u16, len: usize) -> SecAggConfig {
    SecAggConfig { session: "fl.mnist".into(), round: 7, n, threshold: t, vector_len: len, clip: 1.0, scale_bits: 16 }
}

/// Deterministic floats in `[-range, range]`.
fn floats(seed: u64, len: usize, range: f32) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..len).map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * range).collect()
}

fn wrapping_sum(vectors: &[&Vec<u32>], len: usize) -> Vec<u32> {
    let mut sum = vec![0u32; len];
    for v in vectors {
        for (s, x) in sum.iter_mut().zip(v.iter()) {
            *s = s.wrapping_add(*x);
        }
    }
    sum
}

/// Everything that went over the wire, and the state at the end.
struct Round {
    coordinator: Coordinator,
    participants: Vec<Participant>,
    relayed: Vec<SharesFor>,
    masked: Vec<MaskedInput>,
    request: UnmaskRequest,
}

/// Runs rounds 0-2 through the byte encoding; participants in `drop_before_masking` share
/// but never send their masked input. Returns at the unmask request.
fn run_to_unmask(cfg: &SecAggConfig, inputs: &[Vec<u32>], drop_before_masking: &[u16]) -> Result<Round, SecAggError> {
    let mut coordinator = Coordinator::new(cfg.clone())?;
    let mut participants = Vec::new();
    for id in 1..=cfg.n {
        let (p, advert) = Participant::new(cfg.clone(), id)?;
        coordinator.receive_keys(AdvertiseKeys::from_bytes(&advert.to_bytes())?)?;
        participants.push(p);
    }
    let directory = KeyDirectory::from_bytes(&coordinator.key_directory()?.to_bytes())?;
    for p in &mut participants {
        let bundle = p.share(&directory)?;
        coordinator.receive_shares(ShareBundle::from_bytes(&bundle.to_bytes())?)?;
    }
    let relayed = coordinator.relay_shares()?;
    let mut masked = Vec::new();
    for (p, r) in participants.iter_mut().zip(&relayed) {
        assert_eq!(p.id(), r.to);
        let y = p.masked_input(&SharesFor::from_bytes(&r.to_bytes())?, &inputs[usize::from(p.id()) - 1])?;
        if drop_before_masking.contains(&p.id()) {
            continue;
        }
        coordinator.receive_masked(MaskedInput::from_bytes(&y.to_bytes())?)?;
        masked.push(y);
    }
    let request = UnmaskRequest::from_bytes(&coordinator.unmask_request()?.to_bytes())?;
    Ok(Round { coordinator, participants, relayed, masked, request })
}

/// Round 3: every survivor answers except those in `silent`.
fn finish(round: &mut Round, silent: &[u16]) -> Result<Unmasked, SecAggError> {
    for p in &mut round.participants {
        if !round.request.survivors.contains(&p.id()) || silent.contains(&p.id()) {
            continue;
        }
        let response = p.unmask(&round.request)?;
        round.coordinator.receive_unmask(UnmaskResponse::from_bytes(&response.to_bytes())?)?;
    }
    round.coordinator.finish()
}

fn quantized_inputs(cfg: &SecAggConfig) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let floats: Vec<Vec<f32>> = (0..cfg.n).map(|i| floats(u64::from(i) + 1, cfg.vector_len, 0.9)).collect();
    let quantized = floats.iter().map(|f| cfg.quantize(f).unwrap()).collect();
    (floats, quantized)
}

#[test]
fn ten_participants_without_dropout_get_the_exact_sum() {
    let cfg = config(10, 6, 1000);
    let (floats, inputs) = quantized_inputs(&cfg);
    let mut round = run_to_unmask(&cfg, &inputs, &[]).unwrap();
    assert!(round.request.dropped.is_empty());
    let result = finish(&mut round, &[]).unwrap();
    assert_eq!(result.survivors, (1..=10).collect::<Vec<u16>>());
    assert_eq!(result.sum, wrapping_sum(&inputs.iter().collect::<Vec<_>>(), cfg.vector_len), "bit for bit");

    let mean = cfg.dequantize_sum(&result.sum, 10).unwrap();
    let bound = 10.0 * cfg.clip / ((1u32 << cfg.scale_bits) - 1) as f32 + 1e-5;
    for (k, got) in mean.iter().enumerate() {
        let want: f32 = floats.iter().map(|f| f[k]).sum();
        assert!((got - want).abs() <= bound, "element {k}: {got} vs {want}");
    }
}

#[test]
fn masked_inputs_look_unrelated_to_the_inputs() {
    let cfg = config(10, 6, 4096);
    let (_, inputs) = quantized_inputs(&cfg);
    let round = run_to_unmask(&cfg, &inputs, &[]).unwrap();
    for y in &round.masked {
        let x = &inputs[usize::from(y.from) - 1];
        assert_ne!(&y.masked, x);
        let diffs: BTreeSet<u32> = y.masked.iter().zip(x).map(|(a, b)| a.wrapping_sub(*b)).collect();
        assert!(diffs.len() > cfg.vector_len * 99 / 100, "y - x is not a constant offset");
        // Pearson correlation between x and y: near 0 (its spread is about 1/64 here).
        let mean = |v: &[u32]| v.iter().map(|&a| f64::from(a)).sum::<f64>() / v.len() as f64;
        let (mx, my) = (mean(x), mean(&y.masked));
        let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
        for (&a, &b) in x.iter().zip(&y.masked) {
            let (dx, dy) = (f64::from(a) - mx, f64::from(b) - my);
            sxy += dx * dy;
            sxx += dx * dx;
            syy += dy * dy;
        }
        let r = sxy / (sxx * syy).sqrt();
        assert!(r.abs() < 0.15, "correlation {r}");
    }
    // Nor does the coordinator see the shares in the clear: relayed ciphertexts only.
    assert!(round.relayed.iter().all(|r| r.shares.len() == 9));
}

#[test]
fn two_dropouts_after_sharing_leave_the_exact_sum_of_the_others() {
    let cfg = config(10, 6, 777);
    let (_, inputs) = quantized_inputs(&cfg);
    let mut round = run_to_unmask(&cfg, &inputs, &[3, 7]).unwrap();
    assert_eq!(round.request.dropped, vec![3, 7]);
    assert_eq!(round.request.survivors, vec![1, 2, 4, 5, 6, 8, 9, 10]);
    // Two survivors also go silent in the last round: 6 responses are still enough.
    let result = finish(&mut round, &[1, 10]).unwrap();
    let kept: Vec<&Vec<u32>> = inputs.iter().enumerate().filter(|(i, _)| ![2, 6].contains(i)).map(|(_, v)| v).collect();
    assert_eq!(result.sum, wrapping_sum(&kept, cfg.vector_len));
    assert_eq!(result.dropped, vec![3, 7]);
}

#[test]
fn too_few_survivors_fail_clearly() {
    let cfg = config(10, 6, 64);
    let (_, inputs) = quantized_inputs(&cfg);
    match run_to_unmask(&cfg, &inputs, &[1, 2, 3, 4, 5]) {
        Err(SecAggError::TooFew { have: 5, need: 6, .. }) => {}
        other => panic!("expected TooFew, got {:?}", other.err()),
    }
    // Enough masked inputs but too few unmask responses.
    let mut round = run_to_unmask(&cfg, &inputs, &[1, 2]).unwrap();
    match finish(&mut round, &[3, 4, 5]) {
        Err(SecAggError::TooFew { have: 5, need: 6, .. }) => {}
        other => panic!("expected TooFew, got {other:?}"),
    }
    // A dropped participant is not asked, and refuses, to unmask.
    let late = round.participants[0].unmask(&round.request);
    assert!(matches!(late, Err(SecAggError::Inconsistent(_))), "participant 1 is listed as dropped: {late:?}");
}

#[test]
fn a_survivor_refuses_to_reveal_both_secrets_of_anyone() {
    let cfg = config(5, 3, 16);
    let (_, inputs) = quantized_inputs(&cfg);
    let mut round = run_to_unmask(&cfg, &inputs, &[]).unwrap();
    let p = &mut round.participants[0];
    let mut both = round.request.clone();
    both.dropped.push(4);
    assert_eq!(p.unmask(&both), Err(SecAggError::BothRequested(4)));
    // Naming this participant as dropped, omitting a sharer, or a stranger: refused.
    let mut me_dropped = round.request.clone();
    me_dropped.survivors.retain(|&j| j != 1);
    me_dropped.dropped.push(1);
    assert!(matches!(p.unmask(&me_dropped), Err(SecAggError::Inconsistent(_))));
    let mut missing = round.request.clone();
    missing.survivors.retain(|&j| j != 5);
    assert!(matches!(p.unmask(&missing), Err(SecAggError::Inconsistent(_))));
    let mut stranger = round.request.clone();
    stranger.dropped.push(9);
    assert_eq!(p.unmask(&stranger), Err(SecAggError::UnknownParticipant(9)));
    let mut duplicate = round.request.clone();
    duplicate.survivors.push(2);
    assert_eq!(p.unmask(&duplicate), Err(SecAggError::Duplicate(2)));
    // One answer per round: the same request gets it again, any other request is refused.
    let first = p.unmask(&round.request).unwrap();
    assert_eq!(p.unmask(&round.request).unwrap(), first);
    let mut other = round.request.clone();
    other.survivors.retain(|&j| j != 5);
    other.dropped.push(5);
    assert!(matches!(p.unmask(&other), Err(SecAggError::Inconsistent(_))));
}

#[test]
fn tampered_or_misrouted_shares_are_refused() {
    let cfg = config(4, 3, 8);
    let inputs = vec![vec![1u32; 8]; 4];
    let mut coordinator = Coordinator::new(cfg.clone()).unwrap();
    let mut participants = Vec::new();
    for id in 1..=4 {
        let (p, advert) = Participant::new(cfg.clone(), id).unwrap();
        coordinator.receive_keys(advert).unwrap();
        participants.push(p);
    }
    let directory = coordinator.key_directory().unwrap();
    for p in &mut participants {
        coordinator.receive_shares(p.share(&directory).unwrap()).unwrap();
    }
    let relayed = coordinator.relay_shares().unwrap();

    let mut flipped = relayed[0].clone();
    flipped.shares[1].ciphertext[5] ^= 1;
    let from = flipped.shares[1].from;
    assert_eq!(participants[0].masked_input(&flipped, &inputs[0]), Err(SecAggError::ShareAuth { from }));
    // A ciphertext for participant 2 presented to participant 1 as its own.
    let mut rerouted = relayed[0].clone();
    let stolen = relayed[1].shares.iter().find(|e| e.from == 3).unwrap().clone();
    let slot = rerouted.shares.iter_mut().find(|e| e.from == 3).unwrap();
    slot.ciphertext = stolen.ciphertext;
    assert_eq!(participants[0].masked_input(&rerouted, &inputs[0]), Err(SecAggError::ShareAuth { from: 3 }));
    // Relabelling the sender breaks authentication too.
    let mut relabelled = relayed[0].clone();
    relabelled.shares.retain(|e| e.from != 4);
    relabelled.shares.iter_mut().find(|e| e.from == 3).unwrap().from = 4;
    assert_eq!(participants[0].masked_input(&relabelled, &inputs[0]), Err(SecAggError::ShareAuth { from: 4 }));
    let mut truncated = relayed[0].clone();
    truncated.shares[0].ciphertext.pop();
    assert!(matches!(participants[0].masked_input(&truncated, &inputs[0]), Err(SecAggError::Length { .. })));
    let mut duplicated = relayed[0].clone();
    duplicated.shares.push(duplicated.shares[0].clone());
    assert!(matches!(participants[0].masked_input(&duplicated, &inputs[0]), Err(SecAggError::Duplicate(_))));
    assert!(matches!(participants[0].masked_input(&relayed[1], &inputs[0]), Err(SecAggError::Inconsistent(_))));
    assert!(matches!(participants[0].masked_input(&relayed[0], &inputs[0][..7]), Err(SecAggError::Length { .. })));
    // Failed attempts change nothing: the genuine message still works.
    participants[0].masked_input(&relayed[0], &inputs[0]).unwrap();
}

#[test]
fn hostile_messages_get_typed_errors() {
    let cfg = config(4, 3, 8);
    let mut coordinator = Coordinator::new(cfg.clone()).unwrap();
    let (mut p1, a1) = Participant::new(cfg.clone(), 1).unwrap();
    for bad in [&b""[..], b"{}", b"[1,2]", b"\xff\xfe", b"{\"session\":\"fl.mnist\"}"] {
        assert!(matches!(AdvertiseKeys::from_bytes(bad), Err(SecAggError::Malformed(_))), "{bad:?}");
    }
    let text = String::from_utf8(a1.to_bytes()).unwrap();
    let short_key = text.replace(&text[text.find("\"cipher_key\":\"").unwrap() + 14..][..4], "");
    assert!(matches!(AdvertiseKeys::from_bytes(short_key.as_bytes()), Err(SecAggError::Malformed(_))));
    let extra = text.replacen('{', "{\"extra\":1,", 1);
    assert!(matches!(AdvertiseKeys::from_bytes(extra.as_bytes()), Err(SecAggError::Malformed(_))));

    let mut stranger = a1.clone();
    stranger.from = 5;
    assert_eq!(coordinator.receive_keys(stranger), Err(SecAggError::UnknownParticipant(5)));
    let mut zero = a1.clone();
    zero.from = 0;
    assert_eq!(coordinator.receive_keys(zero), Err(SecAggError::UnknownParticipant(0)));
    let mut other_round = a1.clone();
    other_round.round = 8;
    assert!(matches!(coordinator.receive_keys(other_round), Err(SecAggError::WrongRound { .. })));
    let mut low_order = a1.clone();
    low_order.mask_key = [0u8; 32];
    assert_eq!(coordinator.receive_keys(low_order), Err(SecAggError::BadKey(1)));
    coordinator.receive_keys(a1.clone()).unwrap();
    assert_eq!(coordinator.receive_keys(a1.clone()), Err(SecAggError::Duplicate(1)));
    let mut copycat = a1.clone();
    copycat.from = 2;
    assert_eq!(coordinator.receive_keys(copycat), Err(SecAggError::BadKey(2)));
    assert!(matches!(coordinator.key_directory(), Err(SecAggError::TooFew { have: 1, need: 3, .. })));
    assert!(matches!(coordinator.relay_shares(), Err(SecAggError::OutOfOrder { .. })));
    assert!(matches!(coordinator.finish(), Err(SecAggError::OutOfOrder { .. })));

    let mut others = Vec::new();
    for id in 2..=4 {
        let (p, a) = Participant::new(cfg.clone(), id).unwrap();
        coordinator.receive_keys(a).unwrap();
        others.push(p);
    }
    let directory = coordinator.key_directory().unwrap();
    // A directory that alters this participant's keys, repeats an entry or is too small.
    let mut altered = directory.clone();
    altered.keys[0].cipher_key = altered.keys[1].cipher_key;
    assert!(p1.share(&altered).is_err());
    let mut repeated = directory.clone();
    repeated.keys.push(repeated.keys[2].clone());
    assert_eq!(p1.share(&repeated), Err(SecAggError::Duplicate(3)));
    let mut small = directory.clone();
    small.keys.truncate(2);
    assert!(matches!(p1.share(&small), Err(SecAggError::TooFew { .. })));
    let bundle = p1.share(&directory).unwrap();
    assert!(matches!(p1.share(&directory), Err(SecAggError::OutOfOrder { .. })));

    let mut forged = bundle.clone();
    forged.from = 2;
    assert!(matches!(coordinator.receive_shares(forged), Err(SecAggError::Inconsistent(_))));
    let mut partial = bundle.clone();
    partial.shares.pop();
    assert!(matches!(coordinator.receive_shares(partial), Err(SecAggError::Inconsistent(_))));
    let mut to_self = bundle.clone();
    to_self.shares[0].to = 1;
    assert_eq!(coordinator.receive_shares(to_self), Err(SecAggError::UnknownParticipant(1)));
    coordinator.receive_shares(bundle.clone()).unwrap();
    assert_eq!(coordinator.receive_shares(bundle), Err(SecAggError::Duplicate(1)));
    for p in &mut others {
        coordinator.receive_shares(p.share(&directory).unwrap()).unwrap();
    }
    let relayed = coordinator.relay_shares().unwrap();
    let y1 = p1.masked_input(&relayed[0], &[0; 8]).unwrap();
    let mut long = y1.clone();
    long.masked.push(0);
    assert!(matches!(coordinator.receive_masked(long), Err(SecAggError::Length { .. })));
    let bytes = String::from_utf8(y1.to_bytes()).unwrap();
    assert!(MaskedInput::from_bytes(bytes.replace("\"masked\":\"", "\"masked\":\"AA").as_bytes()).is_err());
    coordinator.receive_masked(y1.clone()).unwrap();
    assert_eq!(coordinator.receive_masked(y1), Err(SecAggError::Duplicate(1)));
    let mut ys = Vec::new();
    for (p, r) in others.iter_mut().zip(&relayed[1..]) {
        ys.push(p.masked_input(r, &[0; 8]).unwrap());
    }
    coordinator.receive_masked(ys.remove(0)).unwrap();
    coordinator.receive_masked(ys.remove(0)).unwrap();
    let request = coordinator.unmask_request().unwrap();
    assert_eq!(request.dropped, vec![4]);
    // Participant 4's masked input arrives too late.
    assert!(matches!(coordinator.receive_masked(ys.remove(0)), Err(SecAggError::OutOfOrder { .. })));

    let response = p1.unmask(&request).unwrap();
    let mut wrong_len = response.clone();
    wrong_len.self_mask_shares[0].value.pop();
    assert!(matches!(coordinator.receive_unmask(wrong_len), Err(SecAggError::Length { .. })));
    let mut swapped = response.clone();
    std::mem::swap(&mut swapped.self_mask_shares, &mut swapped.mask_key_shares);
    assert!(coordinator.receive_unmask(swapped).is_err());
    let mut missing = response.clone();
    missing.mask_key_shares.clear();
    assert!(matches!(coordinator.receive_unmask(missing), Err(SecAggError::Inconsistent(_))));
    // An altered share of the dropped participant's key is caught against its public key.
    let mut altered = response.clone();
    altered.mask_key_shares[0].value[0] ^= 0x0100;
    coordinator.receive_unmask(altered).unwrap();
    assert_eq!(coordinator.receive_unmask(response), Err(SecAggError::Duplicate(1)));
    for p in &mut others[..2] {
        coordinator.receive_unmask(p.unmask(&request).unwrap()).unwrap();
    }
    assert!(matches!(coordinator.finish(), Err(SecAggError::Reconstruct { participant: 4, .. })));
}

#[test]
fn configs_are_checked() {
    let ok = config(10, 6, 10);
    ok.validate().unwrap();
    for (n, t) in [(10, 5), (10, 11), (10, 0), (1, 1), (1001, 600)] {
        assert!(matches!(config(n, t, 10).validate(), Err(SecAggError::Config(_))), "n={n} t={t}");
    }
    config(3, 2, 1).validate().unwrap();
    config(2, 2, 1).validate().unwrap();
    assert!(Participant::new(ok.clone(), 11).is_err());
    assert!(Participant::new(ok.clone(), 0).is_err());
    for bad in [
        SecAggConfig { vector_len: 0, ..ok.clone() },
        SecAggConfig { session: String::new(), ..ok.clone() },
        SecAggConfig { clip: f32::NAN, ..ok.clone() },
        SecAggConfig { clip: 0.0, ..ok.clone() },
        SecAggConfig { scale_bits: 0, ..ok.clone() },
        SecAggConfig { scale_bits: 32, ..ok.clone() },
        // 300 participants with 24 bits could overflow (at most 256).
        SecAggConfig { n: 300, threshold: 200, scale_bits: 24, ..ok.clone() },
    ] {
        assert!(Coordinator::new(bad.clone()).is_err(), "{bad:?}");
    }
}

#[test]
fn quantization_clips_and_round_trips() {
    assert_eq!(max_participants(16), 65537);
    assert_eq!(max_participants(24), 256);
    assert_eq!(max_participants(0), 0);
    let q = quantize(&[-1.0, 0.0, 1.0, -5.0, 7.0, f32::INFINITY, f32::NEG_INFINITY], 1.0, 8).unwrap();
    assert_eq!(q, vec![0, 128, 255, 0, 255, 255, 0]);
    assert_eq!(quantize(&[0.0, f32::NAN], 1.0, 8), Err(SecAggError::NotANumber(1)));
    assert!(quantize(&[0.0], -1.0, 8).is_err());
    // 256 values at the maximum of 24 bits sum to just under 2^32.
    let top = quantize(&[2.5], 2.5, 24).unwrap()[0];
    assert_eq!(u64::from(top) * 256, (1u64 << 32) - 256);
    let back = dequantize_sum(&[top.wrapping_mul(256)], 256, 2.5, 24).unwrap();
    assert!((back[0] - 640.0).abs() < 1e-3);
    assert!(dequantize_sum(&[0], 257, 2.5, 24).is_err());
    assert!(dequantize_sum(&[0], 0, 2.5, 24).is_err());
    let xs = floats(99, 1000, 3.0);
    let sum = dequantize_sum(&quantize(&xs, 3.0, 20).unwrap(), 1, 3.0, 20).unwrap();
    for (a, b) in xs.iter().zip(&sum) {
        assert!((a - b).abs() <= 3.0 / ((1 << 20) - 1) as f32 + 1e-6);
    }
}

fn counter_rng(seed: u64) -> impl FnMut(&mut [u8]) {
    let mut rng = SplitMix64::new(seed);
    move |buf: &mut [u8]| buf.iter_mut().for_each(|b| *b = rng.next_u64() as u8)
}

#[test]
fn shamir_any_t_shares_recover_the_secret() {
    let secret = b"thirty-two bytes of mask seed!!!";
    let shares = split(secret, 5, 3, &mut counter_rng(1)).unwrap();
    assert_eq!(shares.len(), 5);
    assert!(shares.iter().all(|s| s.value.len() == secret.len()));
    for a in 0..5 {
        for b in a + 1..5 {
            for c in b + 1..5 {
                let subset = vec![shares[a].clone(), shares[b].clone(), shares[c].clone()];
                assert_eq!(combine(&subset).unwrap(), secret, "{a} {b} {c}");
            }
            // Two shares (t - 1): an error or another value, never the secret.
            let two = [shares[a].clone(), shares[b].clone()];
            assert!(combine(&two).map_or(true, |v| v != secret), "{a} {b}");
        }
    }
    assert_eq!(combine(&shares).unwrap(), secret, "more than t shares work too");
    // Threshold 1 and threshold n.
    assert_eq!(combine(&split(b"x", 3, 1, &mut counter_rng(2)).unwrap()[2..]).unwrap(), b"x");
    let all = split(b"xyz", 4, 4, &mut counter_rng(3)).unwrap();
    assert_eq!(combine(&all).unwrap(), b"xyz");
    assert!(combine(&all[..3]).map_or(true, |v| v != b"xyz"));
    // Beyond 255 shares (GF(2^16)).
    let many = split(secret, 1000, 501, &mut counter_rng(4)).unwrap();
    assert_eq!(combine(&many[499..]).unwrap(), secret);
    assert!(combine(&many[500..]).map_or(true, |v| v != secret));
}

#[test]
fn shamir_refuses_bad_input() {
    assert_eq!(split(b"s", 3, 0, &mut counter_rng(1)).unwrap_err(), ShamirError::Threshold { n: 3, t: 0 });
    assert_eq!(split(b"s", 3, 4, &mut counter_rng(1)).unwrap_err(), ShamirError::Threshold { n: 3, t: 4 });
    assert_eq!(split(b"", 3, 2, &mut counter_rng(1)).unwrap_err(), ShamirError::EmptySecret);
    let shares = split(b"secret", 4, 2, &mut counter_rng(5)).unwrap();
    assert_eq!(combine(&[]), Err(ShamirError::NoShares));
    assert_eq!(combine(&[shares[0].clone(), shares[0].clone()]), Err(ShamirError::DuplicateIndex(1)));
    let zero = Share { index: 0, value: shares[0].value.clone() };
    assert_eq!(combine(&[zero, shares[1].clone()]), Err(ShamirError::ZeroIndex));
    let short = Share { index: 3, value: shares[2].value[..5].to_vec() };
    assert_eq!(combine(&[shares[0].clone(), short]), Err(ShamirError::LengthMismatch));
    // Shares of two different secrets, or an altered share, do not combine to either secret.
    let other = split(b"SECRET", 4, 2, &mut counter_rng(6)).unwrap();
    let mixed = combine(&[shares[0].clone(), other[1].clone()]);
    assert!(mixed.as_deref().map_or(true, |v| v != b"secret" && v != b"SECRET"));
    let mut altered = shares[1].clone();
    altered.value[0] ^= 0x4000;
    assert_eq!(combine(&[shares[0].clone(), altered]), Err(ShamirError::Inconsistent));
    // Byte encoding.
    let bytes = shares[0].value_bytes();
    assert_eq!(Share::from_value_bytes(1, &bytes).unwrap(), shares[0]);
    assert!(Share::from_value_bytes(1, &bytes[1..]).is_none());
    assert_eq!(format!("{:?}", shares[0]), "Share { index: 1, len: 6 }", "no secret material in Debug");
}
