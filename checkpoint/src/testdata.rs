//! Deterministic data that looks like trained weights (small, roughly normal
//! values), for the crate's tests, examples and benchmarks: compression
//! ratios and speeds measured on it resemble a real checkpoint's. Checkpoints
//! themselves never use it; the codec policy's probes do (the CPU probe
//! compresses its weights-like values, the write probe writes raw random
//! bytes).

/// A xorshift64 generator: fast, deterministic, not for anything secret.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `seed`, mixed so that nearby seeds differ.
    pub fn new(seed: u64) -> Rng {
        Rng::from_state(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// A generator that starts from `state` as it is (it must not be 0).
    pub fn from_state(state: u64) -> Rng {
        Rng(state)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1), with 24 bits.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Roughly normal (the sum of four uniforms), mean 0, standard deviation
    /// `std`: what trained weights look like to a compressor.
    pub fn normal(&mut self, std: f32) -> f32 {
        let s: f32 = (0..4).map(|_| self.uniform()).sum();
        (s - 2.0) * std * 1.732
    }

    /// `n` values of [`Rng::normal`].
    pub fn normal_f32(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal(std)).collect()
    }
}
