//! Prints what dwd's reproduction of torch's generators draws, for comparing with torch on
//! a machine that has it (`scripts/gpu-check.sh` does, on the GPU).
//!
//! Usage: torch_randn SEED COUNT GENERATOR [DRAWS]
//!   GENERATOR: cpu, or cuda:SMSxTHREADS (the GPU's multiprocessors and threads per one).
//! Prints one JSON line per draw: `{"draw": i, "offset": ..., "values": [...]}` (offset:
//! the CUDA generator's Philox offset before the draw; null for the CPU).

use anyhow::{bail, Context};
use dwd::pipelines::{CudaGeometry, TorchCpuGenerator, TorchCudaGenerator};

fn main() -> anyhow::Result<()> {
    let usage = "usage: torch_randn SEED COUNT cpu|cuda:SMSxTHREADS [DRAWS]";
    let args: Vec<String> = std::env::args().collect();
    let seed: u64 = args.get(1).context(usage)?.parse()?;
    let count: usize = args.get(2).context(usage)?.parse()?;
    let generator = args.get(3).context(usage)?;
    let draws: usize = args.get(4).map_or(Ok(1), |d| d.parse())?;
    let mut cpu = TorchCpuGenerator::new(seed);
    let mut cuda = match generator.strip_prefix("cuda:") {
        Some(geometry) => Some(TorchCudaGenerator::new(
            seed,
            CudaGeometry::parse(geometry).map_err(anyhow::Error::msg)?,
        )),
        None if generator == "cpu" => None,
        None => bail!("{usage}"),
    };
    for draw in 0..draws {
        let (offset, values) = match cuda.as_mut() {
            Some(cuda) => (Some(cuda.offset()), cuda.randn_f32(count)),
            None => (None, cpu.randn_f32(count)),
        };
        let line = serde_json::json!({"draw": draw, "offset": offset, "values": values});
        println!("{line}");
    }
    Ok(())
}
