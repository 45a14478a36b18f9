//! LoRA adapter files as diffusers' `load_lora_weights` reads them, matched to the layers
//! of the model they adapt.
//!
//! Two layouts, told apart by their tensor names:
//! - **diffusers/PEFT** (what `save_lora_weights` and diffusers' training scripts write):
//!   `<component>.<module>.lora_A.weight` and `.lora_B.weight`, the component `unet`,
//!   `text_encoder`, `text_encoder_2` or `transformer`. alpha is in the header's
//!   `__metadata__["lora_adapter_metadata"]`, PEFT's `LoraConfig` with every key prefixed by
//!   the component (`unet.lora_alpha`, `unet.alpha_pattern`, `unet.use_rslora`); a file
//!   without it has alpha = rank, as diffusers reads it.
//! - **kohya-ss / A1111**: `lora_unet_<module>` (text encoders `lora_te_`, SDXL's
//!   `lora_te1_` and `lora_te2_`) with `.lora_down.weight`, `.lora_up.weight` and a 0-dim
//!   `.alpha`; the module path is written with `_` for `.`, which is ambiguous
//!   (`to_out_0`), so a name is resolved against the model's own module names written the
//!   same way, never by string rules.
//!
//! For a layer with weight W (a Linear, out x in, or a convolution, out x in x kh x kw) an
//! adapter at weight w adds `w * scale * B @ A` with `scale = alpha / rank`
//! (`alpha / sqrt(rank)` with rsLoRA), A = `lora_A`/`lora_down` (rank x in [x kh x kw]),
//! B = `lora_B`/`lora_up` (out x rank [x 1 x 1]). Text encoders' modules are matched with
//! or without a leading `text_model.`, as diffusers matches them. A tensor of a layout
//! not read here (DoRA's magnitudes, the old `lora.down` names, LoRA biases) and a module
//! the model does not have are errors naming the key.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::weights::{load_tensors, read_header, read_text_metadata};
use super::{InComponent, PipelineError};

const COMPONENT: &str = "lora";

/// PEFT's component prefixes, the longest first.
const PEFT_COMPONENTS: &[&str] = &["text_encoder_2", "text_encoder", "unet", "transformer"];
/// kohya's prefixes and the components they name, the longest first.
const KOHYA_COMPONENTS: &[(&str, &str)] = &[
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
];
/// The prefix text encoders' modules may or may not carry.
const TEXT_MODEL: &str = "text_model.";

/// How a LoRA file names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraLayout {
    Peft,
    Kohya,
}

/// One adapted layer, as the file has it.
#[derive(Debug, Clone)]
pub struct LoraEntry {
    /// `unet`, `text_encoder`, `text_encoder_2` or `transformer`.
    pub component: &'static str,
    /// The module as the file names it: dotted (PEFT) or with `_` (kohya).
    pub name: String,
    /// A: (rank, in) or (rank, in, kh, kw), f32 on the CPU.
    pub down: Tensor,
    /// B: (out, rank) or (out, rank, 1, 1), f32 on the CPU.
    pub up: Tensor,
    /// alpha / rank (alpha / sqrt(rank) with rsLoRA).
    pub scale: f64,
}

impl LoraEntry {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// `scale * B @ A` in the shape of the layer's weight: what the adapter adds to it at
    /// weight 1.
    pub fn delta(&self) -> Result<Tensor, PipelineError> {
        let rank = self.rank();
        let down_dims = self.down.dims().to_vec();
        let out = self.up.dims()[0];
        let product = (|| {
            let up = self.up.reshape((out, rank))?;
            up.matmul(&self.down.reshape((rank, ()))?)? * self.scale
        })()
        .in_component(COMPONENT)?;
        let mut shape = vec![out];
        shape.extend_from_slice(&down_dims[1..]);
        product.reshape(shape).in_component(COMPONENT)
    }
}

/// A layer of the model an entry adapts, by the model's own module name.
#[derive(Debug, Clone, Copy)]
pub struct LoraTarget<'a> {
    pub module: &'a str,
    pub entry: &'a LoraEntry,
}

/// A LoRA file, read.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub path: PathBuf,
    pub layout: LoraLayout,
    pub entries: Vec<LoraEntry>,
}

impl LoraAdapter {
    /// Reads a LoRA file of either layout (tensors as f32 on the CPU).
    pub fn load(path: &Path) -> Result<Self, PipelineError> {
        let tensors = load_tensors(&[path.to_path_buf()], DType::F32, &Device::Cpu, COMPONENT)?;
        let layout = layout(path, tensors.keys())?;
        let entries = match layout {
            LoraLayout::Peft => {
                let metadata = PeftMetadata::read(path)?;
                peft_entries(path, tensors, &metadata)?
            }
            LoraLayout::Kohya => kohya_entries(path, tensors)?,
        };
        Ok(Self {
            path: path.to_path_buf(),
            layout,
            entries,
        })
    }

    /// Bytes its matrices hold.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.entries
            .iter()
            .map(|e| size(&e.down) + size(&e.up))
            .sum()
    }

    /// The components it adapts, in file order.
    pub fn components(&self) -> Vec<&'static str> {
        let mut components: Vec<&'static str> = Vec::new();
        for entry in &self.entries {
            if !components.contains(&entry.component) {
                components.push(entry.component);
            }
        }
        components
    }

    /// Its entries for `component`, each matched to one of the model's modules
    /// (`modules`: module name to weight shape, as [`module_shapes`] reads them); an entry
    /// that matches none, or whose matrices do not fit the weight, is an error naming it.
    pub fn targets<'a>(
        &'a self,
        component: &str,
        modules: &'a BTreeMap<String, Vec<usize>>,
    ) -> Result<Vec<LoraTarget<'a>>, PipelineError> {
        let index = ModuleIndex::new(modules, self.layout);
        self.entries
            .iter()
            .filter(|entry| entry.component == component)
            .map(|entry| {
                let module = index.find(&entry.name).ok_or_else(|| {
                    self.bad(format!(
                        "`{}` names no layer of the {component}: {}",
                        entry.name,
                        index.hint(&entry.name)
                    ))
                })?;
                self.check_fits(entry, module, &modules[module])?;
                Ok(LoraTarget { module, entry })
            })
            .collect()
    }

    /// A (rank, in [, kh, kw]) and B (out, rank [, 1, 1]) against the layer's weight.
    fn check_fits(
        &self,
        entry: &LoraEntry,
        module: &str,
        weight: &[usize],
    ) -> Result<(), PipelineError> {
        let (down, up) = (entry.down.dims(), entry.up.dims());
        let rank = entry.rank();
        let fits = weight.len() >= 2
            && down.len() == weight.len()
            && up.len() == weight.len()
            && up[0] == weight[0]
            && up[1] == rank
            && up[2..].iter().all(|&d| d == 1)
            && down[1..] == weight[1..];
        if fits {
            return Ok(());
        }
        Err(self.bad(format!(
            "`{}` does not fit `{module}`: A is {down:?} and B {up:?}, the layer's weight {weight:?}",
            entry.name
        )))
    }

    fn bad(&self, problem: String) -> PipelineError {
        bad(&self.path, problem)
    }
}

/// Every module of a component's weight files with a `.weight`, and that weight's shape:
/// what a LoRA's names are matched against.
pub fn module_shapes(files: &[PathBuf]) -> Result<BTreeMap<String, Vec<usize>>, PipelineError> {
    let mut modules = BTreeMap::new();
    for file in files {
        let (_, entries) = read_header(file)?;
        for entry in entries {
            if let Some(module) = entry.name.strip_suffix(".weight") {
                modules.insert(module.to_string(), entry.shape.clone());
            }
        }
    }
    Ok(modules)
}

/// The model's modules, findable by a LoRA's names.
struct ModuleIndex<'a> {
    /// A name as the layout writes it, without a text encoder's `text_model.`, to the
    /// model's own.
    by_name: HashMap<String, &'a str>,
    layout: LoraLayout,
}

impl<'a> ModuleIndex<'a> {
    fn new(modules: &'a BTreeMap<String, Vec<usize>>, layout: LoraLayout) -> Self {
        let by_name = modules
            .keys()
            .map(|module| (normal(module, layout), module.as_str()))
            .collect();
        Self { by_name, layout }
    }

    fn find(&self, name: &str) -> Option<&'a str> {
        self.by_name.get(&normal(name, self.layout)).copied()
    }

    /// The model's modules that share the name's last part, to show what was meant.
    fn hint(&self, name: &str) -> String {
        let separator = match self.layout {
            LoraLayout::Peft => '.',
            LoraLayout::Kohya => '_',
        };
        let last = name.rsplit(separator).next().unwrap_or(name);
        let mut near: Vec<&str> = self
            .by_name
            .values()
            .copied()
            .filter(|m| m.ends_with(last))
            .collect();
        near.sort_unstable();
        near.truncate(3);
        match near.is_empty() {
            true => "it has no layer of that name (is the LoRA for another model?)".to_string(),
            false => format!("layers ending alike: {}", near.join(", ")),
        }
    }
}

/// A module name as `layout` writes it, without a leading `text_model.`.
fn normal(name: &str, layout: LoraLayout) -> String {
    match layout {
        LoraLayout::Peft => name.strip_prefix(TEXT_MODEL).unwrap_or(name).to_string(),
        LoraLayout::Kohya => {
            let underscored = name.replace('.', "_");
            let text_model = TEXT_MODEL.replace('.', "_");
            match underscored.strip_prefix(&text_model) {
                Some(rest) => rest.to_string(),
                None => underscored,
            }
        }
    }
}

/// The layout of a file's tensor names; a file of both, or of neither, is refused.
fn layout<'a>(
    path: &Path,
    names: impl Iterator<Item = &'a String>,
) -> Result<LoraLayout, PipelineError> {
    let names: Vec<&String> = names.collect();
    let peft = names.iter().any(|n| n.ends_with(".lora_A.weight"));
    let kohya = names.iter().any(|n| n.ends_with(".lora_down.weight"));
    match (peft, kohya) {
        (true, false) => Ok(LoraLayout::Peft),
        (false, true) => Ok(LoraLayout::Kohya),
        (true, true) => Err(bad(path, "holds both PEFT (`lora_A`) and kohya (`lora_down`) tensors; a LoRA file is one or the other".to_string())),
        (false, false) => {
            let example = names.iter().min().map_or("none".to_string(), |n| format!("`{n}`"));
            Err(bad(path, format!("holds no LoRA tensors (`lora_A`/`lora_B` or `lora_down`/`lora_up`); its first tensor: {example}")))
        }
    }
}

/// The PEFT config a diffusers LoRA file's header carries, per component.
struct PeftMetadata {
    config: Option<serde_json::Map<String, Value>>,
}

impl PeftMetadata {
    fn read(path: &Path) -> Result<Self, PipelineError> {
        let metadata = read_text_metadata(path)?;
        let config = match metadata.get("lora_adapter_metadata") {
            None => None,
            Some(text) => match serde_json::from_str(text) {
                Ok(Value::Object(map)) => Some(map),
                _ => {
                    return Err(bad(
                        path,
                        "its `lora_adapter_metadata` is not a JSON object".to_string(),
                    ))
                }
            },
        };
        Ok(Self { config })
    }

    fn get(&self, component: &str, key: &str) -> Option<&Value> {
        self.config.as_ref()?.get(&format!("{component}.{key}"))
    }

    /// alpha / rank for a module of `component` (alpha = rank without a config).
    fn scale(
        &self,
        path: &Path,
        (component, module): (&str, &str),
        rank: usize,
    ) -> Result<f64, PipelineError> {
        if self.get(component, "use_dora") == Some(&Value::Bool(true)) {
            return Err(bad(
                path,
                format!("`{component}.use_dora` is true: DoRA adapters are not read yet"),
            ));
        }
        let pattern = self
            .get(component, "alpha_pattern")
            .and_then(Value::as_object)
            .map(|patterns| pattern_value(path, patterns, module))
            .transpose()?
            .flatten();
        let alpha =
            match pattern.or_else(|| self.get(component, "lora_alpha").and_then(Value::as_f64)) {
                Some(alpha) => alpha,
                None => rank as f64,
            };
        let rslora = self.get(component, "use_rslora") == Some(&Value::Bool(true));
        Ok(match rslora {
            true => alpha / (rank as f64).sqrt(),
            false => alpha / rank as f64,
        })
    }
}

/// The value of the `alpha_pattern` key that names `module` (the module itself or a suffix
/// of its dotted path, as PEFT matches a plain key).
fn pattern_value(
    path: &Path,
    patterns: &serde_json::Map<String, Value>,
    module: &str,
) -> Result<Option<f64>, PipelineError> {
    for (key, value) in patterns {
        if key.contains(|c: char| "*+?()[]{}|^$\\".contains(c)) {
            return Err(bad(path, format!("`alpha_pattern` key `{key}` is a regular expression, which is not read yet; name modules plainly")));
        }
        if module == key || module.ends_with(&format!(".{key}")) {
            return Ok(value.as_f64());
        }
    }
    Ok(None)
}

/// The pairs of a PEFT file, with their scales.
fn peft_entries(
    path: &Path,
    mut tensors: HashMap<String, Tensor>,
    metadata: &PeftMetadata,
) -> Result<Vec<LoraEntry>, PipelineError> {
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort_unstable();
    let mut entries = Vec::new();
    for name in &names {
        let Some(stem) = name.strip_suffix(".lora_A.weight") else {
            if name.ends_with(".lora_B.weight") {
                continue;
            }
            return Err(unread_key(path, name));
        };
        let (component, module) = peft_component(path, stem)?;
        let down = take(path, &mut tensors, name)?;
        let up = take(path, &mut tensors, &format!("{stem}.lora_B.weight"))?;
        let rank = down.dims().first().copied().unwrap_or(0);
        let scale = metadata.scale(path, (component, module), rank)?;
        entries.push(LoraEntry {
            component,
            name: module.to_string(),
            down,
            up,
            scale,
        });
    }
    Ok(entries)
}

/// `unet.down_blocks...` into its component and module.
fn peft_component<'a>(
    path: &Path,
    stem: &'a str,
) -> Result<(&'static str, &'a str), PipelineError> {
    PEFT_COMPONENTS
        .iter()
        .find_map(|c| Some((*c, stem.strip_prefix(c)?.strip_prefix('.')?)))
        .ok_or_else(|| {
            bad(
                path,
                format!(
                    "`{stem}` names no component dw adapts; PEFT names start with one of: {}",
                    PEFT_COMPONENTS.join(", ")
                ),
            )
        })
}

/// The pairs of a kohya file, with their scales.
fn kohya_entries(
    path: &Path,
    mut tensors: HashMap<String, Tensor>,
) -> Result<Vec<LoraEntry>, PipelineError> {
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort_unstable();
    let mut entries = Vec::new();
    for name in &names {
        let Some(stem) = name.strip_suffix(".lora_down.weight") else {
            if name.ends_with(".lora_up.weight") || name.ends_with(".alpha") {
                continue;
            }
            return Err(unread_key(path, name));
        };
        let (component, module) = KOHYA_COMPONENTS
            .iter()
            .find_map(|(prefix, c)| Some((*c, stem.strip_prefix(prefix)?)))
            .ok_or_else(|| {
                let prefixes: Vec<&str> = KOHYA_COMPONENTS.iter().map(|(p, _)| *p).collect();
                bad(
                    path,
                    format!(
                        "`{stem}` names no component dw adapts; kohya names start with one of: {}",
                        prefixes.join(", ")
                    ),
                )
            })?;
        let down = take(path, &mut tensors, name)?;
        let up = take(path, &mut tensors, &format!("{stem}.lora_up.weight"))?;
        let rank = down.dims().first().copied().unwrap_or(0);
        let alpha = match tensors.remove(&format!("{stem}.alpha")) {
            Some(alpha) => alpha
                .flatten_all()
                .and_then(|a| a.get(0))
                .and_then(|a| a.to_scalar::<f32>())
                .in_component(COMPONENT)? as f64,
            None => rank as f64,
        };
        entries.push(LoraEntry {
            component,
            name: module.to_string(),
            down,
            up,
            scale: alpha / rank as f64,
        });
    }
    Ok(entries)
}

/// A tensor of the pair, removed from the file's tensors; one that is not there is an error
/// naming it.
fn take(
    path: &Path,
    tensors: &mut HashMap<String, Tensor>,
    name: &str,
) -> Result<Tensor, PipelineError> {
    let tensor = tensors
        .remove(name)
        .ok_or_else(|| bad(path, format!("`{name}` is missing: each A needs its B")))?;
    if tensor.rank() < 2 {
        return Err(bad(
            path,
            format!(
                "`{name}` has shape {:?}; a LoRA matrix has two dimensions or four",
                tensor.dims()
            ),
        ));
    }
    Ok(tensor)
}

/// A tensor name of a layout not read here, refused by what it is.
fn unread_key(path: &Path, name: &str) -> PipelineError {
    let what = if name.contains("lora_magnitude_vector") || name.ends_with(".dora_scale") {
        "a DoRA magnitude; DoRA adapters are not read yet"
    } else if name.contains(".lora.down.") || name.contains(".lora.up.") {
        "the old diffusers attention-processor layout (`lora.down`/`lora.up`), which is not read yet"
    } else if name.ends_with(".bias") {
        "a LoRA bias, which is not read yet"
    } else {
        "not part of a LoRA pair (`lora_A`/`lora_B`, or `lora_down`/`lora_up`/`alpha`)"
    };
    bad(path, format!("tensor `{name}` is {what}"))
}

fn bad(path: &Path, problem: String) -> PipelineError {
    PipelineError::BadConfig {
        file: path.to_path_buf(),
        problem,
    }
}
