//! torch's CPU generator reproduced bit for bit: every tensor of
//! `tests/fixtures/torch-rng/cpu.safetensors` (a copy of the shared torch-rng reference,
//! drawn by torch 2.15 on x86-64 with AVX2 kernels) from its seed and the sequence of
//! draws made on that generator alone: the small cached path, the blocks of 16 and their
//! tail rule, float16 and bfloat16, seeds that alias modulo 2^32, and streams continued
//! across draws.

mod common;
use common::Fixture;

use candle_core::{DType, Device, Tensor};
use dwd::pipelines::TorchCpuGenerator;
use serde_json::Value;

/// One draw on the generator, as the fixture lists it, as a tensor of its dtype.
fn draw(generator: &mut TorchCpuGenerator, kind: &str, draw: &Value) -> Tensor {
    let shape: Vec<usize> = draw["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap() as usize)
        .collect();
    let count = shape.iter().product();
    let (values, dtype) = match (kind, draw["dtype"].as_str().unwrap()) {
        ("rand", "float32") => (generator.rand_f32(count), DType::F32),
        ("randn", "float32") => (generator.randn_f32(count), DType::F32),
        ("randn", "float16") => (generator.randn_half_f32(count), DType::F16),
        ("randn", "bfloat16") => (generator.randn_half_f32(count), DType::BF16),
        other => panic!("no such draw in the fixture: {other:?}"),
    };
    Tensor::from_vec(values, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The raw bits of a tensor, so equality is bit for bit (and -0.0 differs from 0.0).
fn bits(tensor: &Tensor) -> Vec<u32> {
    let flat = tensor.flatten_all().unwrap();
    match tensor.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .map(|v| u32::from(v.to_bits()))
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|v| u32::from(v.to_bits()))
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

#[test]
fn every_fixture_tensor_is_reproduced_bit_for_bit_from_its_seed() {
    let fixture = Fixture::new("torch-rng");
    let meta = fixture.json("cpu.json");
    let tensors = fixture.tensors("cpu.safetensors");
    let entries = meta["tensors"].as_array().unwrap();
    assert_eq!(entries.len(), 103);
    for entry in entries {
        let name = entry["name"].as_str().unwrap();
        let seed = entry["seed"].as_u64().unwrap();
        let kind = entry["kind"].as_str().unwrap();
        let index = entry["index"].as_u64().unwrap() as usize;
        let mut generator = TorchCpuGenerator::new(seed);
        let draws: Vec<Tensor> = entry["draws"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| draw(&mut generator, kind, d))
            .collect();
        let want = &tensors[name];
        let got = &draws[index];
        assert_eq!(got.dims(), want.dims(), "{name}: shape");
        let (got, want) = (bits(got), bits(want));
        let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            wrong,
            0,
            "{name}: {wrong} of {} elements differ",
            want.len()
        );
    }
}

#[test]
fn seeds_equal_modulo_two_to_the_32_share_a_stream() {
    let meta = Fixture::new("torch-rng").json("cpu.json");
    for alias in meta["seed_aliases"].as_array().unwrap() {
        // A negative seed is its two's complement, as torch reinterprets it.
        let seed = alias["seed"]
            .as_u64()
            .unwrap_or_else(|| alias["seed"].as_i64().unwrap() as u64);
        let same = alias["same_stream_as"].as_u64().unwrap();
        assert_eq!(
            TorchCpuGenerator::new(seed).randn_f32(64),
            TorchCpuGenerator::new(same).randn_f32(64),
            "{alias}"
        );
    }
}
