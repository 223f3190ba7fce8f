//! What a benchmark client does next: which operation, on which key, with which value.
//!
//! Everything here is pure and seeded, so a run is reproducible from its `--seed` and the
//! distributions can be checked without a cluster.

use bytes::Bytes;
use clap::ValueEnum;
use rand::Rng;
use serde::Serialize;
use thiserror::Error;

/// A workload parameter that makes no sense.
#[derive(Debug, Error, PartialEq)]
pub enum WorkloadError {
    #[error("--keys must be at least 1")]
    NoKeys,
    #[error("{name} must be between 0 and 1, got {value}")]
    NotAFraction { name: &'static str, value: f64 },
    #[error("--zipf exponent must be a finite number >= 0, got {0}")]
    BadZipfExponent(f64),
    #[error("--scan-length must be between 1 and 10000, got {0}")]
    BadScanLength(u32),
}

/// How keys are picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    /// Every key equally likely.
    Uniform,
    /// A fraction `--hot-ops` of operations goes to the first `--hot-keys` fraction of keys.
    Hotkey,
    /// Zipf over key ranks (rank 0, the first key, is the most popular).
    Zipf,
}

impl Distribution {
    pub fn as_str(self) -> &'static str {
        match self {
            Distribution::Uniform => "uniform",
            Distribution::Hotkey => "hotkey",
            Distribution::Zipf => "zipf",
        }
    }
}

/// The whole description of a workload, as given on the command line.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadSpec {
    pub distribution: Distribution,
    /// Number of distinct keys.
    pub keys: u64,
    /// Fraction of operations that are gets (0 = put-only, 1 = get-only).
    pub read_ratio: f64,
    /// Bytes per written value.
    pub value_size: usize,
    /// Hot-key workload: fraction of the key space that is hot.
    pub hot_keys: f64,
    /// Hot-key workload: fraction of operations that go to hot keys.
    pub hot_ops: f64,
    /// Zipf workload: the exponent s.
    pub zipf: f64,
    /// Fraction of operations that are short scans (YCSB E: 0.95 with `read_ratio` 0).
    pub scan_ratio: f64,
    /// A scan lists up to this many keys from its start key: uniformly 1 to this many, as
    /// YCSB's `maxscanlength` does.
    pub scan_length: u32,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            distribution: Distribution::Uniform,
            keys: 10_000,
            read_ratio: 0.5,
            value_size: 256,
            hot_keys: 0.1,
            hot_ops: 0.9,
            zipf: 0.99,
            scan_ratio: 0.0,
            scan_length: 100,
        }
    }
}

impl WorkloadSpec {
    /// Checks the parameters once, so that the choosers built from it cannot fail.
    pub fn validate(&self) -> Result<(), WorkloadError> {
        if self.keys == 0 {
            return Err(WorkloadError::NoKeys);
        }
        fraction("--read-ratio", self.read_ratio)?;
        fraction("--hot-keys", self.hot_keys)?;
        fraction("--hot-ops", self.hot_ops)?;
        fraction("--scan-ratio", self.scan_ratio)?;
        if !(1..=10_000).contains(&self.scan_length) {
            return Err(WorkloadError::BadScanLength(self.scan_length));
        }
        if !self.zipf.is_finite() || self.zipf < 0.0 {
            return Err(WorkloadError::BadZipfExponent(self.zipf));
        }
        Ok(())
    }

    /// The key chooser this spec describes.
    pub fn chooser(&self) -> Result<KeyChooser, WorkloadError> {
        self.validate()?;
        Ok(match self.distribution {
            Distribution::Uniform => KeyChooser::Uniform(Uniform::new(self.keys)?),
            Distribution::Hotkey => {
                KeyChooser::HotKey(HotKey::new(self.keys, self.hot_keys, self.hot_ops)?)
            }
            Distribution::Zipf => KeyChooser::Zipf(Zipf::new(self.keys, self.zipf)?),
        })
    }

    /// Picks the next operation kind: a scan with probability `scan_ratio`, else a get
    /// with probability `read_ratio`, else a put.
    pub fn next_op<R: Rng + ?Sized>(&self, rng: &mut R) -> OpKind {
        // `random::<f64>()` is in [0, 1): a ratio of 0 never reads and 1 always does. No
        // draw without scans, so runs without them keep their seeded sequences.
        if self.scan_ratio > 0.0 && rng.random::<f64>() < self.scan_ratio {
            OpKind::Scan
        } else if rng.random::<f64>() < self.read_ratio {
            OpKind::Get
        } else {
            OpKind::Put
        }
    }

    /// How many keys the next scan asks for.
    pub fn next_scan_length<R: Rng + ?Sized>(&self, rng: &mut R) -> u32 {
        rng.random_range(1..=self.scan_length.max(1))
    }
}

fn fraction(name: &'static str, value: f64) -> Result<f64, WorkloadError> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(WorkloadError::NotAFraction { name, value })
    }
}

/// The operations of a workload (every target serves gets and puts; scans only replikv).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    Get,
    Put,
    Scan,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Get => "get",
            OpKind::Put => "put",
            OpKind::Scan => "scan",
        }
    }
}

/// Picks key indices in `0..keys` from one of the distributions.
#[derive(Clone, Debug)]
pub enum KeyChooser {
    Uniform(Uniform),
    HotKey(HotKey),
    Zipf(Zipf),
}

impl KeyChooser {
    /// The next key index.
    pub fn next_index<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        match self {
            KeyChooser::Uniform(u) => u.sample(rng),
            KeyChooser::HotKey(h) => h.sample(rng),
            KeyChooser::Zipf(z) => z.sample(rng),
        }
    }

    /// The next key, named as [`key_name`] names it.
    pub fn next_key<R: Rng + ?Sized>(&self, rng: &mut R) -> Bytes {
        key_name(self.next_index(rng))
    }

    /// Number of distinct keys this chooser picks from.
    pub fn keys(&self) -> u64 {
        match self {
            KeyChooser::Uniform(u) => u.keys,
            KeyChooser::HotKey(h) => h.keys,
            KeyChooser::Zipf(z) => z.keys,
        }
    }
}

/// The name of key number `index`: fixed width, so every target stores keys of one size.
pub fn key_name(index: u64) -> Bytes {
    Bytes::from(format!("key-{index:010}"))
}

/// A value of exactly `size` bytes that names its writer, so a value read back can be traced
/// to the put that wrote it (useful when looking at a store by hand after a run).
pub fn make_value(size: usize, client: usize, seq: u64) -> Bytes {
    let mut value = format!("c{client}-s{seq}-").into_bytes();
    value.resize(size, b'.');
    Bytes::from(value)
}

/// Every key equally likely.
#[derive(Clone, Debug)]
pub struct Uniform {
    keys: u64,
}

impl Uniform {
    pub fn new(keys: u64) -> Result<Self, WorkloadError> {
        if keys == 0 {
            return Err(WorkloadError::NoKeys);
        }
        Ok(Uniform { keys })
    }

    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        rng.random_range(0..self.keys)
    }
}

/// The first `hot` keys receive a fraction `hot_ops` of the operations, spread evenly among
/// them; the remaining keys share the rest evenly.
#[derive(Clone, Debug)]
pub struct HotKey {
    keys: u64,
    hot: u64,
    hot_ops: f64,
}

impl HotKey {
    /// `hot_keys` is a fraction of `keys`; at least one key is hot, so a tiny fraction of a
    /// small key set still means something.
    pub fn new(keys: u64, hot_keys: f64, hot_ops: f64) -> Result<Self, WorkloadError> {
        if keys == 0 {
            return Err(WorkloadError::NoKeys);
        }
        let hot_keys = fraction("--hot-keys", hot_keys)?;
        let hot_ops = fraction("--hot-ops", hot_ops)?;
        let hot = ((keys as f64 * hot_keys).round() as u64).clamp(1, keys);
        Ok(HotKey { keys, hot, hot_ops })
    }

    /// Number of hot keys (indices `0..hot`).
    pub fn hot(&self) -> u64 {
        self.hot
    }

    /// Whether `index` is one of the hot keys.
    pub fn is_hot(&self, index: u64) -> bool {
        index < self.hot
    }

    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        // With every key hot there is no cold set to fall back to.
        if self.hot == self.keys || rng.random::<f64>() < self.hot_ops {
            rng.random_range(0..self.hot)
        } else {
            rng.random_range(self.hot..self.keys)
        }
    }
}

/// Zipf over ranks `0..keys` with exponent `s`: P(rank k) is proportional to 1/(k+1)^s.
///
/// Rejection-inversion sampling (Hörmann and Derflinger, 1996): O(1) set-up and O(1)
/// expected time per sample for any `s >= 0`, so large key sets and `s >= 1` cost nothing
/// extra, unlike the YCSB generator whose set-up sums the whole zeta series and which
/// cannot take `s = 1`.
#[derive(Clone, Debug)]
pub struct Zipf {
    keys: u64,
    s: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    squeeze: f64,
}

impl Zipf {
    pub fn new(keys: u64, s: f64) -> Result<Self, WorkloadError> {
        if keys == 0 {
            return Err(WorkloadError::NoKeys);
        }
        if !s.is_finite() || s < 0.0 {
            return Err(WorkloadError::BadZipfExponent(s));
        }
        let mut z = Zipf {
            keys,
            s,
            h_integral_x1: 0.0,
            h_integral_n: 0.0,
            squeeze: 0.0,
        };
        z.h_integral_x1 = z.h_integral(1.5) - 1.0;
        z.h_integral_n = z.h_integral(keys as f64 + 0.5);
        z.squeeze = 2.0 - z.h_integral_inverse(z.h_integral(2.5) - z.h(2.0));
        Ok(z)
    }

    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        loop {
            let u =
                self.h_integral_n + rng.random::<f64>() * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inverse(u);
            // Ranks here are 1-based, as in the paper.
            let k = (x + 0.5).floor().clamp(1.0, self.keys as f64);
            if k - x <= self.squeeze || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64 - 1;
            }
        }
    }

    /// h(x) = x^-s, the unnormalised density.
    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }

    /// H(x) = (x^(1-s) - 1) / (1-s), an antiderivative of h, written so that s = 1 is fine.
    fn h_integral(&self, x: f64) -> f64 {
        let log_x = x.ln();
        helper2((1.0 - self.s) * log_x) * log_x
    }

    fn h_integral_inverse(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.s)).max(-1.0);
        (helper1(t) * x).exp()
    }
}

/// ln(1+x)/x, accurate near 0.
fn helper1(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

/// (e^x - 1)/x, accurate near 0.
fn helper2(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x))
    }
}

/// A per-client seed derived from the run's seed (splitmix64), so clients draw independent
/// streams and the whole run is still reproducible from one number.
pub fn client_seed(seed: u64, client: usize) -> u64 {
    let mut z = seed.wrapping_add((client as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn a_scan_workload_draws_scans_at_its_ratio_and_lengths_in_range() {
        let spec = WorkloadSpec {
            scan_ratio: 0.95,
            read_ratio: 0.0,
            scan_length: 100,
            ..WorkloadSpec::default()
        };
        spec.validate().unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let n = 100_000;
        let kinds: Vec<OpKind> = (0..n).map(|_| spec.next_op(&mut rng)).collect();
        let scans = kinds.iter().filter(|k| **k == OpKind::Scan).count();
        assert!(
            (scans as f64 / n as f64 - 0.95).abs() < 0.01,
            "{scans} scans"
        );
        assert!(
            !kinds.contains(&OpKind::Get),
            "read ratio 0: the rest are puts"
        );
        let lengths: Vec<u32> = (0..10_000)
            .map(|_| spec.next_scan_length(&mut rng))
            .collect();
        assert!(lengths.iter().all(|l| (1..=100).contains(l)));
        assert!(lengths.contains(&1) && lengths.contains(&100));
        for bad in [0, 10_001] {
            let spec = WorkloadSpec {
                scan_length: bad,
                ..WorkloadSpec::default()
            };
            assert_eq!(spec.validate(), Err(WorkloadError::BadScanLength(bad)));
        }
        let spec = WorkloadSpec {
            scan_ratio: 1.5,
            ..WorkloadSpec::default()
        };
        assert!(spec.validate().is_err());
    }

    #[test]
    fn hot_key_share_matches_setting() {
        for &(hot_keys, hot_ops) in &[(0.1, 0.9), (0.01, 0.5), (0.2, 0.99), (0.5, 0.1)] {
            let chooser = HotKey::new(10_000, hot_keys, hot_ops).unwrap();
            let mut rng = StdRng::seed_from_u64(7);
            let n = 200_000;
            let hot = (0..n)
                .filter(|_| chooser.is_hot(chooser.sample(&mut rng)))
                .count();
            let share = hot as f64 / n as f64;
            assert!(
                (share - hot_ops).abs() <= 0.02,
                "hot share {share} for --hot-ops {hot_ops} --hot-keys {hot_keys}"
            );
            assert_eq!(chooser.hot(), (10_000.0 * hot_keys) as u64);
        }
    }

    #[test]
    fn hot_key_spreads_over_hot_and_cold_sets() {
        let chooser = HotKey::new(100, 0.1, 0.9).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let mut seen = [false; 100];
        for _ in 0..100_000 {
            seen[chooser.sample(&mut rng) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s), "every key, hot or cold, is chosen");
    }

    #[test]
    fn hot_key_with_every_key_hot_is_uniform() {
        let chooser = HotKey::new(10, 1.0, 0.3).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        assert!((0..1000).all(|_| chooser.sample(&mut rng) < 10));
    }

    /// Exact Zipf probability of 0-based rank `k` among `n` with exponent `s`.
    fn zipf_p(n: u64, s: f64, k: u64) -> f64 {
        let norm: f64 = (1..=n).map(|i| (i as f64).powf(-s)).sum();
        ((k + 1) as f64).powf(-s) / norm
    }

    #[test]
    fn zipf_frequencies_match_the_distribution() {
        for &s in &[0.5, 0.99, 1.0, 1.5] {
            let n = 1000;
            let zipf = Zipf::new(n, s).unwrap();
            let mut rng = StdRng::seed_from_u64(11);
            let samples = 400_000;
            let mut counts = vec![0u64; n as usize];
            for _ in 0..samples {
                let k = zipf.sample(&mut rng);
                assert!(k < n);
                counts[k as usize] += 1;
            }
            for k in [0, 1, 2, 9, 99] {
                let expected = zipf_p(n, s, k);
                let got = counts[k as usize] as f64 / samples as f64;
                // Five standard deviations of a binomial proportion, plus a little slack.
                let tolerance = 5.0 * (expected * (1.0 - expected) / samples as f64).sqrt() + 1e-4;
                assert!(
                    (got - expected).abs() <= tolerance,
                    "s={s} rank {k}: got {got}, expected {expected}"
                );
            }
            assert!(counts[0] > counts[1] && counts[1] > counts[9] && counts[9] > counts[99]);
        }
    }

    #[test]
    fn zipf_edge_cases() {
        let mut rng = StdRng::seed_from_u64(5);
        let one = Zipf::new(1, 0.99).unwrap();
        assert!((0..100).all(|_| one.sample(&mut rng) == 0));
        // s = 0 is uniform.
        let flat = Zipf::new(4, 0.0).unwrap();
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[flat.sample(&mut rng) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(Zipf::new(0, 1.0).unwrap_err(), WorkloadError::NoKeys);
        assert!(Zipf::new(10, -1.0).is_err());
        assert!(Zipf::new(10, f64::NAN).is_err());
    }

    #[test]
    fn same_seed_same_keys() {
        let spec = WorkloadSpec {
            distribution: Distribution::Zipf,
            ..WorkloadSpec::default()
        };
        let chooser = spec.chooser().unwrap();
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(client_seed(seed, 3));
            (0..50)
                .map(|_| chooser.next_index(&mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(9), draw(9));
        assert_ne!(draw(9), draw(10));
    }

    #[test]
    fn read_ratio_extremes_and_middle() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut spec = WorkloadSpec {
            read_ratio: 0.0,
            ..WorkloadSpec::default()
        };
        assert!((0..1000).all(|_| spec.next_op(&mut rng) == OpKind::Put));
        spec.read_ratio = 1.0;
        assert!((0..1000).all(|_| spec.next_op(&mut rng) == OpKind::Get));
        spec.read_ratio = 0.25;
        let gets = (0..100_000)
            .filter(|_| spec.next_op(&mut rng) == OpKind::Get)
            .count();
        assert!((23_000..27_000).contains(&gets), "{gets}");
    }

    #[test]
    fn bad_parameters_are_rejected() {
        let bad = |f: fn(&mut WorkloadSpec)| {
            let mut spec = WorkloadSpec::default();
            f(&mut spec);
            spec.chooser().is_err()
        };
        assert!(bad(|s| s.keys = 0));
        assert!(bad(|s| s.read_ratio = 1.5));
        assert!(bad(|s| s.hot_keys = -0.1));
        assert!(bad(|s| s.hot_ops = f64::NAN));
        assert!(bad(|s| s.zipf = f64::INFINITY));
    }

    #[test]
    fn values_have_the_requested_size() {
        assert_eq!(make_value(256, 3, 99).len(), 256);
        assert_eq!(make_value(2, 3, 99).len(), 2);
        assert_eq!(make_value(0, 0, 0).len(), 0);
        assert!(make_value(64, 7, 1).starts_with(b"c7-s1-"));
        assert_eq!(key_name(42), Bytes::from_static(b"key-0000000042"));
    }
}
