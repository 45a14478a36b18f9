//! Random LoRAs on every adaptable layer of a model, and the model with them merged into
//! its weights (`W + weight * alpha / rank * B @ A`, diffusers' `fuse_lora`): for families
//! with no recorded LoRA fixture, a LoRA run is held to its merged model.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use dwd::pipelines::lora::{Adapter, LoraAdapter, LoraModules};

pub const RANK: usize = 2;
pub const ALPHA: f32 = 3.0;

/// One adapted layer: its component and module, A, B and the delta at weight 1.
pub struct LoraLayer {
    pub component: &'static str,
    pub module: String,
    pub down: Tensor,
    pub up: Tensor,
    pub delta: Tensor,
}

/// Small deterministic values, different for each `seed`.
fn values(shape: &[usize], seed: usize) -> Tensor {
    let count: usize = shape.iter().product();
    let data: Vec<f32> = (0..count)
        .map(|i| (((i * 7 + seed * 13) % 17) as f32 - 8.0) / 40.0)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// A LoRA on every layer of each component's `modules`: A (rank, in...), B (out, rank,
/// 1...), and `alpha / rank * B @ A`.
pub fn random_lora(components: &[(&'static str, &LoraModules)]) -> Vec<LoraLayer> {
    let mut layers = Vec::new();
    for (component, modules) in components {
        for (module, shape) in modules.iter() {
            let seed = layers.len();
            let mut down_shape = vec![RANK];
            down_shape.extend_from_slice(&shape[1..]);
            let mut up_shape = vec![shape[0], RANK];
            up_shape.extend(std::iter::repeat_n(1, shape.len() - 2));
            let (down, up) = (values(&down_shape, seed), values(&up_shape, seed + 5));
            let product = up
                .reshape((shape[0], RANK))
                .and_then(|up| up.matmul(&down.reshape((RANK, ()))?))
                .unwrap();
            let delta = (product.reshape(shape.as_slice()).unwrap() * (ALPHA as f64 / RANK as f64))
                .unwrap();
            layers.push(LoraLayer {
                component,
                module: module.clone(),
                down,
                up,
                delta,
            });
        }
    }
    layers
}

pub fn save(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    metadata: Option<HashMap<String, String>>,
) {
    let views: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    safetensors::serialize_to_file(views, metadata, path).unwrap();
}

/// The layers as a diffusers/PEFT file, with rank and alpha in its header.
pub fn save_peft(layers: &[LoraLayer], path: &Path) {
    let mut tensors = HashMap::new();
    let mut components = BTreeSet::new();
    for layer in layers {
        let stem = format!("{}.{}", layer.component, layer.module);
        tensors.insert(format!("{stem}.lora_A.weight"), layer.down.clone());
        tensors.insert(format!("{stem}.lora_B.weight"), layer.up.clone());
        components.insert(layer.component);
    }
    let config: serde_json::Map<String, serde_json::Value> = components
        .iter()
        .flat_map(|c| {
            [
                (format!("{c}.r"), serde_json::json!(RANK)),
                (format!("{c}.lora_alpha"), serde_json::json!(ALPHA)),
            ]
        })
        .collect();
    let metadata = HashMap::from([(
        "lora_adapter_metadata".to_string(),
        serde_json::Value::Object(config).to_string(),
    )]);
    save(&tensors, path, Some(metadata));
}

/// A copy of `model` with `weight * delta` merged into each adapted weight; `files` are
/// the components' weight files in the folder.
pub fn merged_model(
    model: &Path,
    files: &[(&str, &str)],
    layers: &[LoraLayer],
    weight: f64,
    into: &Path,
) {
    super::copy_dir(model, into);
    for (component, file) in files {
        let path = into.join(file);
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        for layer in layers.iter().filter(|l| l.component == *component) {
            let name = format!("{}.weight", layer.module);
            let base = tensors[&name].to_dtype(DType::F32).unwrap();
            tensors.insert(name, (base + (&layer.delta * weight).unwrap()).unwrap());
        }
        save(&tensors, &path, None);
    }
}

/// A pipeline's `adapters` for the one LoRA file at `weight`, named "0" as
/// diffusers-workflow names the first.
pub fn one_lora(path: &Path, weight: f64) -> Vec<Adapter> {
    vec![Adapter {
        name: "0".to_string(),
        weight,
        lora: Arc::new(LoraAdapter::load(path).unwrap()),
    }]
}
