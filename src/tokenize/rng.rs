//! The two sources of randomness a tokenizer may use.
//!
//! - [`Mt19937`]: numpy's legacy global generator (`np.random.seed(S)`, `np.random.rand`),
//!   reproduced bit for bit so that `--ties numpy` matches scGPT's draws exactly.
//! - [`CellRng`]: the default, seeded from (run seed, barcode) so that a cell gets the same
//!   tokens whatever batch it arrives in and whichever thread tokenizes it.

/// Mersenne Twister MT19937 as numpy's `RandomState` seeds and uses it.
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    /// `np.random.seed(seed)` for an integer seed in `0..2^32` (numpy's `init_genrand`).
    pub fn new(seed: u32) -> Mt19937 {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        for i in 0..624 {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % 624] & LOWER);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// numpy's legacy `random_sample`: 53 random bits from two draws (`genrand_res53`).
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) / 9_007_199_254_740_992.0
    }
}

/// A small, fast per-cell generator (xoshiro256++), keyed by the run seed and the barcode.
pub struct CellRng {
    s: [u64; 4],
}

pub(super) fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl CellRng {
    /// FNV-1a of the barcode mixed with the seed: stable across platforms and releases.
    pub fn for_cell(seed: u64, barcode: &str) -> CellRng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in barcode.as_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut x = h ^ seed.rotate_left(32) ^ seed;
        let s = [
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
        ];
        CellRng { s }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Uniform in `0..n`, `n > 0` (Lemire's multiply-shift; the division that removes the
    /// bias only runs in the rare case that needs it).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }

    /// A draw from Binomial(`n`, `p`): each of `n` trials kept with probability `p`. Exact
    /// (one uniform per trial) up to [`BINOMIAL_EXACT_UP_TO`] trials, a rounded normal draw
    /// beyond, so a huge count costs no more than that.
    pub fn binomial(&mut self, n: u32, p: f64) -> u32 {
        if n <= BINOMIAL_EXACT_UP_TO {
            return (0..n).filter(|_| self.next_f64() < p).count() as u32;
        }
        let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
        // Box–Muller; 1 − u keeps the logarithm's argument in (0, 1].
        let (u, v) = (1.0 - self.next_f64(), self.next_f64());
        let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
        (mean + sd * z).round().clamp(0.0, n as f64) as u32
    }
}

/// Trials [`CellRng::binomial`] draws one by one.
pub const BINOMIAL_EXACT_UP_TO: u32 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_draws_have_the_right_mean_on_both_sides_of_the_exact_limit() {
        let mut rng = CellRng::for_cell(3, "binomial");
        for (n, p) in [(7u32, 0.25), (900, 0.1), (5000, 0.25)] {
            let draws: Vec<u32> = (0..2000).map(|_| rng.binomial(n, p)).collect();
            assert!(draws.iter().all(|&d| d <= n));
            let mean = draws.iter().map(|&d| d as f64).sum::<f64>() / draws.len() as f64;
            let sd = (n as f64 * p * (1.0 - p) / draws.len() as f64).sqrt();
            assert!(
                (mean - n as f64 * p).abs() < 5.0 * sd,
                "{n} {p}: mean {mean}"
            );
        }
        assert_eq!(rng.binomial(10, 0.0), 0);
        assert_eq!(rng.binomial(10, 1.0), 10);
    }

    #[test]
    fn mt19937_matches_numpy_seed_0() {
        // np.random.seed(0); np.random.rand(3)
        let mut mt = Mt19937::new(0);
        let want = [0.5488135039273248, 0.7151893663724195, 0.6027633760716439];
        for w in want {
            assert_eq!(mt.next_f64(), w);
        }
    }

    #[test]
    fn mt19937_reference_output() {
        // The reference implementation's first output for init_genrand(5489).
        assert_eq!(Mt19937::new(5489).next_u32(), 3_499_211_612);
    }

    #[test]
    fn below_is_in_range_and_uniform() {
        let mut r = CellRng::for_cell(1, "x");
        let mut seen = [0u32; 7];
        for _ in 0..70_000 {
            seen[r.below(7) as usize] += 1;
        }
        assert!(
            seen.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{seen:?}"
        );
    }

    #[test]
    fn cell_rng_is_keyed_by_barcode_and_seed() {
        let a = CellRng::for_cell(0, "AAAC-1").next_u64();
        assert_eq!(a, CellRng::for_cell(0, "AAAC-1").next_u64());
        assert_ne!(a, CellRng::for_cell(1, "AAAC-1").next_u64());
        assert_ne!(a, CellRng::for_cell(0, "AAAG-1").next_u64());
    }
}
