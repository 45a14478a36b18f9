//! torch's CUDA generator, computed on the host: what
//! `torch.Generator("cuda").manual_seed(seed)` then `torch.randn(n, device="cuda")` draws,
//! so a seed gives the noise diffusers-workflow draws on a CUDA machine.
//!
//! The integer part is exact: the `(seed, offset)` state, Philox4x32-10 keyed by the
//! 64-bit seed, the launch geometry (256 threads a block, as many blocks as the GPU keeps
//! resident), which thread and iteration make which element, and the offset's advance.
//! The float part is Box–Muller in float32 (sine first), with the host's `logf`, `sinf` and
//! `cosf` where the GPU uses its own approximations: values agree with the device's to
//! about 1e-6, not bit for bit. Past `threads` elements the noise depends on the GPU's
//! multiprocessor count, so the generator is told the GPU it stands for.

use candle_core::{Device, Tensor};

use super::noise::NoiseSource;
use super::{InComponent, PipelineError};

/// Philox4x32's round multipliers and key increments (Salmon et al., Random123).
const MULTIPLIER_A: u64 = 0xD251_1F53;
const MULTIPLIER_B: u64 = 0xCD9E_8D57;
const KEY_BUMP_0: u32 = 0x9E37_79B9;
const KEY_BUMP_1: u32 = 0xBB67_AE85;
const ROUNDS: usize = 10;
const THREADS_PER_BLOCK: usize = 256;

/// The GPU whose draws are reproduced: how many threads torch's kernel launches at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaGeometry {
    /// `multiProcessorCount`.
    pub multiprocessors: usize,
    /// `maxThreadsPerMultiProcessor`.
    pub max_threads_per_multiprocessor: usize,
}

impl CudaGeometry {
    /// An H100 SXM: 132 multiprocessors of 2048 threads.
    pub const H100_SXM: CudaGeometry = CudaGeometry {
        multiprocessors: 132,
        max_threads_per_multiprocessor: 2048,
    };

    /// The threads a draw of `n` elements runs on: whole blocks, no more than fit at once.
    fn threads(&self, n: usize) -> usize {
        let resident_blocks =
            self.multiprocessors * (self.max_threads_per_multiprocessor / THREADS_PER_BLOCK);
        let blocks = n.div_ceil(THREADS_PER_BLOCK).min(resident_blocks.max(1));
        blocks * THREADS_PER_BLOCK
    }
}

impl CudaGeometry {
    /// The geometry of the GPU `device` is, from its driver; `None` on the CPU.
    pub fn of_device(device: &Device) -> Option<CudaGeometry> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = device {
            use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
            let context = cuda.cuda_stream().context().clone();
            let get = |attribute| {
                let value = context.attribute(attribute).ok()?;
                usize::try_from(value).ok()
            };
            return Some(CudaGeometry {
                multiprocessors: get(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
                max_threads_per_multiprocessor: get(
                    CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR,
                )?,
            });
        }
        let _ = device;
        None
    }

    /// `SMSxTHREADS`, such as `132x2048` (an H100 SXM) or `128x1536` (an RTX 4090).
    pub fn parse(text: &str) -> Result<CudaGeometry, String> {
        let parsed = text.split_once('x').and_then(|(sms, threads)| {
            let geometry = CudaGeometry {
                multiprocessors: sms.parse().ok()?,
                max_threads_per_multiprocessor: threads.parse().ok()?,
            };
            let sane = geometry.multiprocessors > 0
                && geometry.max_threads_per_multiprocessor >= THREADS_PER_BLOCK;
            sane.then_some(geometry)
        });
        parsed.ok_or_else(|| {
            format!("`{text}` is not a GPU geometry: give multiprocessors x threads per multiprocessor, such as 132x2048 (H100 SXM) or 128x1536 (RTX 4090)")
        })
    }
}

/// Philox4x32-10 on `counter` with `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..ROUNDS {
        if round > 0 {
            k = [k[0].wrapping_add(KEY_BUMP_0), k[1].wrapping_add(KEY_BUMP_1)];
        }
        let product_b = MULTIPLIER_B * u64::from(c[2]);
        let product_a = MULTIPLIER_A * u64::from(c[0]);
        c = [
            (product_b >> 32) as u32 ^ c[1] ^ k[0],
            product_b as u32,
            (product_a >> 32) as u32 ^ c[3] ^ k[1],
            product_a as u32,
        ];
    }
    c
}

/// torch's CUDA generator state: the seed and the Philox offset.
#[derive(Debug, Clone)]
pub struct TorchCudaGenerator {
    seed: u64,
    offset: u64,
    geometry: CudaGeometry,
}

impl TorchCudaGenerator {
    /// `manual_seed(seed)` (all 64 bits are used), for draws as `geometry` launches them.
    pub fn new(seed: u64, geometry: CudaGeometry) -> Self {
        TorchCudaGenerator {
            seed,
            offset: 0,
            geometry,
        }
    }

    /// The Philox offset the next draw starts from.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// `torch.randn(n)` in float32; the offset then advances by 4 per round of the threads.
    pub fn randn_f32(&mut self, n: usize) -> Vec<f32> {
        let threads = self.geometry.threads(n);
        let key = [self.seed as u32, (self.seed >> 32) as u32];
        let mut out = vec![0f32; n];
        for thread in 0..threads.min(n) {
            // Iteration i of a thread makes elements thread + threads·(4i + q), q = 0..3.
            let iterations = (n - thread).div_ceil(4 * threads);
            for iteration in 0..iterations {
                let counter64 = self.offset / 4 + iteration as u64;
                let thread64 = thread as u64;
                let counter = [
                    counter64 as u32,
                    (counter64 >> 32) as u32,
                    thread64 as u32,
                    (thread64 >> 32) as u32,
                ];
                let normals = box_muller(philox4x32_10(counter, key));
                for (q, value) in normals.into_iter().enumerate() {
                    let element = thread + threads * (4 * iteration + q);
                    if let Some(slot) = out.get_mut(element) {
                        *slot = value;
                    }
                }
            }
        }
        self.offset += 4 * (n as u64).div_ceil(4 * threads as u64);
        out
    }
}

impl NoiseSource for TorchCudaGenerator {
    fn next(&mut self, shape: &[usize]) -> Result<Tensor, PipelineError> {
        let values = self.randn_f32(shape.iter().product());
        Tensor::from_vec(values, shape, &Device::Cpu).in_component("noise")
    }
}

/// cuRAND's Box–Muller on two pairs of words, sine first: four normals.
fn box_muller(words: [u32; 4]) -> [f32; 4] {
    let pair = |a: u32, b: u32| -> [f32; 2] {
        const TWO_TO_MINUS_32: f32 = 1.0 / 4_294_967_296.0;
        let angle_scale = TWO_TO_MINUS_32 * std::f32::consts::TAU;
        let u = (a as f32).mul_add(TWO_TO_MINUS_32, TWO_TO_MINUS_32 / 2.0);
        let v = (b as f32).mul_add(angle_scale, angle_scale / 2.0);
        let radius = (-2.0 * u.ln()).sqrt();
        [radius * v.sin(), radius * v.cos()]
    };
    let [n0, n1] = pair(words[0], words[1]);
    let [n2, n3] = pair(words[2], words[3]);
    [n0, n1, n2, n3]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's known answers for Philox4x32-10 (`kat_vectors`): counter, key, output.
    #[test]
    fn philox_gives_random123s_known_answers() {
        let cases: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0; 4],
                [0; 2],
                [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd],
            ),
            (
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0],
                [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
            ),
        ];
        for (counter, key, want) in cases {
            assert_eq!(philox4x32_10(counter, key), want, "{counter:x?} {key:x?}");
        }
    }

    /// The values published for `torch.manual_seed(42); torch.randn(10, device="cuda")`,
    /// to the four decimals they were printed with.
    #[test]
    fn seed_42_gives_the_published_cuda_values() {
        let published = [
            0.1940, 2.1614, -0.1721, 0.8491, -1.9244, 0.6530, -0.6494, -0.8175, 0.5280, -1.2753,
        ];
        let mut generator = TorchCudaGenerator::new(42, CudaGeometry::H100_SXM);
        let drawn = generator.randn_f32(10);
        for (got, want) in drawn.iter().zip(published) {
            assert!((got - want).abs() <= 5e-5, "{drawn:?}");
        }
        assert_eq!(generator.offset(), 4);
    }

    /// Below the thread count every element is its own thread's first normal, whatever
    /// the GPU; above it the GPU's size decides which elements repeat a thread.
    #[test]
    fn the_geometry_matters_only_past_the_thread_count() {
        let small = CudaGeometry {
            multiprocessors: 1,
            max_threads_per_multiprocessor: 256,
        };
        let one = TorchCudaGenerator::new(7, small).randn_f32(200);
        let other = TorchCudaGenerator::new(7, CudaGeometry::H100_SXM).randn_f32(200);
        assert_eq!(one, other);
        let mut generator = TorchCudaGenerator::new(7, small);
        let large = generator.randn_f32(1024);
        let h100 = TorchCudaGenerator::new(7, CudaGeometry::H100_SXM).randn_f32(1024);
        assert_eq!(large[..256], h100[..256]);
        assert_ne!(large[256..], h100[256..]);
        assert_eq!(
            generator.offset(),
            4,
            "4 x 256 elements: one round of 256 threads"
        );
        generator.randn_f32(1025);
        assert_eq!(generator.offset(), 12, "1025 elements need a second round");
    }
}
