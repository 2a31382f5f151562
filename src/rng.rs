//! Counter-based random numbers (Philox4x32-10, Salmon et al. 2011).
//!
//! Every value is a pure function of `(seed, stream, step, index)`, so any element can be
//! generated independently, in any order, on any thread or on the GPU, and always comes out the
//! same. That is what lets a CUDA step be compared with a CPU step exactly, and what makes a
//! resumed run continue bit for bit.

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// One Philox4x32-10 block: 4 random 32-bit words for a 128-bit counter and a 64-bit key.
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let p0 = (PHILOX_M0 as u64) * (c[0] as u64);
        let p1 = (PHILOX_M1 as u64) * (c[2] as u64);
        c = [
            ((p1 >> 32) as u32) ^ c[1] ^ k[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// Named streams, so that different consumers of randomness never share numbers.
pub mod stream {
    /// Parameter initialisation; `step` is the parameter tensor's index.
    pub const INIT: u32 = 1;
    /// Slot initialisation noise; `step` is the training step.
    pub const SLOT_NOISE: u32 = 2;
    /// Dropout masks; `step` is the training step, the iteration is folded into the stream.
    pub const DROPOUT: u32 = 3;
    /// Procedural datasets; `step` is the example index.
    pub const DATA: u32 = 4;
    /// Shuffling of the training set; `step` is the epoch.
    pub const SHUFFLE: u32 = 5;
    /// Dropout of slot-attention iteration `iter` uses stream `DROPOUT_ITER_BASE + iter`.
    pub const DROPOUT_ITER_BASE: u32 = 0x100;
    /// Random batches of the `train` smoke path (no dataset).
    pub const RANDOM_BATCH: u32 = 6;
}

/// A seeded counter-based generator. Cheap to copy; holds no state but the seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Philox {
    pub seed: u64,
}

impl Philox {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// The 4 raw words for element `index` of `(stream, step)`.
    pub fn words(&self, stream: u32, step: u32, index: u64) -> [u32; 4] {
        philox4x32(
            [index as u32, (index >> 32) as u32, stream, step],
            [self.seed as u32, (self.seed >> 32) as u32],
        )
    }

    /// Uniform in [0, 1) with 24 random bits (exactly representable in f32).
    pub fn uniform(&self, stream: u32, step: u32, index: u64) -> f64 {
        (self.words(stream, step, index)[0] >> 8) as f64 * (1.0 / 16_777_216.0)
    }

    /// Standard normal by Box-Muller from the first two words, computed in f64.
    pub fn normal(&self, stream: u32, step: u32, index: u64) -> f64 {
        let w = self.words(stream, step, index);
        // u1 in (0, 1] so the log is finite.
        let u1 = ((w[0] >> 8) as f64 + 1.0) * (1.0 / 16_777_216.0);
        let u2 = (w[1] >> 8) as f64 * (1.0 / 16_777_216.0);
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A uniform integer in [0, n) (n > 0), from a 64-bit draw (bias below 2^-32 for n < 2^32).
    pub fn below(&self, stream: u32, step: u32, index: u64, n: u64) -> u64 {
        let w = self.words(stream, step, index);
        let x = ((w[0] as u64) << 32) | w[1] as u64;
        ((x as u128 * n as u128) >> 64) as u64
    }

    /// Fill `out` with standard normals, element `i` being `normal(stream, step, i)`.
    pub fn fill_normal<T: num_traits::FromPrimitive>(&self, stream: u32, step: u32, out: &mut [T]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = T::from_f64(self.normal(stream, step, i as u64)).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answer() {
        // Known-answer vectors of the Random123 distribution (kat_vectors, philox4x32 10 rounds).
        assert_eq!(
            philox4x32([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32([0xffffffff; 4], [0xffffffff; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn normal_moments_and_determinism() {
        let r = Philox::new(7);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|i| r.normal(stream::SLOT_NOISE, 3, i)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
        assert_eq!(r.normal(2, 3, 12345), Philox::new(7).normal(2, 3, 12345));
        assert_ne!(r.normal(2, 3, 12345), r.normal(2, 4, 12345));
        assert_ne!(r.normal(2, 3, 12345), Philox::new(8).normal(2, 3, 12345));
    }

    #[test]
    fn uniform_range() {
        let r = Philox::new(1);
        for i in 0..10_000 {
            let u = r.uniform(1, 0, i);
            assert!((0.0..1.0).contains(&u));
            assert!(r.below(1, 0, i, 6) < 6);
        }
    }
}
