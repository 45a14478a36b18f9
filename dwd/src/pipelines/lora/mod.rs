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
//!   same way, never by string rules. kohya's SDXL files name the UNet after Stability's
//!   own model (`input_blocks_4_1_...`); [`sgm`] reads those as diffusers does.
//! - FLUX.1 files of either layout may name Black Forest Labs' original modules
//!   (`double_blocks_0_img_attn_qkv`, `double_blocks.0.img_attn.qkv`); [`flux_names`]
//!   splits their fused layers into diffusers' as diffusers converts them.
//!
//! For a layer with weight W (a Linear, out x in, or a convolution, out x in x kh x kw) an
//! adapter at weight w adds `w * scale * B @ A` with `scale = alpha / rank`
//! (`alpha / sqrt(rank)` with rsLoRA), A = `lora_A`/`lora_down` (rank x in [x kh x kw]),
//! B = `lora_B`/`lora_up` (out x rank [x 1 x 1]). Text encoders' modules are matched with
//! or without a leading `text_model.`, as diffusers matches them. A tensor of a layout
//! not read here (DoRA's magnitudes, the old `lora.down` names, LoRA biases) and a module
//! the model does not have are errors naming the key.
//!
//! **How adapters run.** As PEFT runs them: a low-rank branch beside the layer,
//! `base(x) + w * scale * B(A(x))`, never merged into the weights, so the base model stays
//! loaded and untouched and another set of LoRAs, or other weights, costs nothing but the
//! branches. A pipeline builds the [`ActiveAdapters`] of one component for one run and runs
//! that component's forward passes inside [`with_adapters`]; the layers
//! (`ops::Linear`, `ops::Conv2d`) ask [`add_branches`] for the branches of their module
//! name. Outside `with_adapters` (every run without LoRAs) they find none.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use serde_json::Value;

mod flux_names;
mod sgm;

use super::weights::{load_tensors, read_header, read_text_metadata};
use super::{InComponent, PipelineError};

const COMPONENT: &str = "lora";

/// A LoRA as a run uses it: its file, the name it was loaded under and its weight
/// (`set_adapters`' `adapter_weights`).
#[derive(Debug, Clone)]
pub struct Adapter {
    pub name: String,
    pub weight: f64,
    pub lora: Arc<LoraAdapter>,
}

/// Refuses an adapter with tensors for a component the pipeline does not adapt (`adapted`,
/// by the pipeline's component names): they would load and do nothing.
pub fn check_components(
    adapters: &[Adapter],
    adapted: &[&str],
    pipeline: &str,
) -> Result<(), PipelineError> {
    for adapter in adapters {
        if let Some(other) = adapter
            .lora
            .components()
            .into_iter()
            .find(|c| !adapted.contains(c))
        {
            return Err(PipelineError::invalid(
                "loras",
                format!(
                    "LoRA `{}` ({}) adapts `{other}`, which a {pipeline} pipeline does not adapt; it adapts {}",
                    adapter.name,
                    adapter.lora.path.display(),
                    adapted.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// One low-rank branch of a layer, in the model's dtype and on its device.
#[derive(Debug, Clone)]
struct Branch {
    down: Tensor,
    up: Tensor,
    /// The adapter's weight times its `alpha / rank` times the call's scale.
    factor: f64,
}

/// The branches of one component's layers for one run, by the model's module names.
#[derive(Debug, Default)]
pub struct ActiveAdapters {
    branches: HashMap<String, Vec<Branch>>,
}

impl ActiveAdapters {
    /// The branches `adapters` put on `component` (whose modules are `modules`), each at
    /// its adapter's weight times `scale` (the call's `cross_attention_kwargs` scale);
    /// `None` when none of them adapts it.
    pub fn build(
        component: &str,
        modules: &BTreeMap<String, Vec<usize>>,
        adapters: &[Adapter],
        scale: f64,
        (dtype, device): (DType, &Device),
    ) -> Result<Option<Arc<Self>>, PipelineError> {
        let mut branches: HashMap<String, Vec<Branch>> = HashMap::new();
        for adapter in adapters {
            for target in adapter.lora.targets(component, modules)? {
                let place = |t: &Tensor| t.to_device(device).and_then(|t| t.to_dtype(dtype));
                let branch = Branch {
                    down: place(&target.entry.down).in_component(COMPONENT)?,
                    up: place(&target.entry.up).in_component(COMPONENT)?,
                    factor: adapter.weight * target.entry.scale * scale,
                };
                branches
                    .entry(target.module.to_string())
                    .or_default()
                    .push(branch);
            }
        }
        Ok((!branches.is_empty()).then(|| Arc::new(Self { branches })))
    }

    /// How many layers carry a branch.
    pub fn layers(&self) -> usize {
        self.branches.len()
    }
}

thread_local! {
    /// The adapters of the component whose forward pass runs on this thread.
    static ACTIVE: RefCell<Option<Arc<ActiveAdapters>>> = const { RefCell::new(None) };
    /// While a model is built inside [`adaptable_modules`], the layers that apply
    /// branches, by module name, with their weights' shapes.
    static BUILT: RefCell<Option<LoraModules>> = const { RefCell::new(None) };
}

/// Builds a model with `build` and gives, beside it, the layers in it that apply LoRA
/// branches, with their weights' shapes: a LoRA is matched only against those, so one that
/// targets a layer dw does not adapt (a norm, an embedding) is refused instead of silently
/// doing nothing.
pub fn adaptable_modules<T>(build: impl FnOnce() -> T) -> (T, LoraModules) {
    let previous = BUILT.with(|built| built.replace(Some(LoraModules::new())));
    let model = build();
    let modules = BUILT
        .with(|built| built.replace(previous))
        .unwrap_or_default();
    (model, modules)
}

/// Called by each adaptable layer as it is built, with its weight's shape.
pub(crate) fn register_adaptable(module: &str, weight: &[usize]) {
    BUILT.with(|built| {
        if let Some(modules) = built.borrow_mut().as_mut() {
            modules.insert(module.to_string(), weight.to_vec());
        }
    });
}

/// Runs `f` (a component's forward passes) with `adapters` active on this thread, and
/// restores what was active before, also when `f` panics.
pub fn with_adapters<R>(adapters: Option<&Arc<ActiveAdapters>>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Arc<ActiveAdapters>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            ACTIVE.with(|active| *active.borrow_mut() = previous);
        }
    }
    let previous = ACTIVE.with(|active| active.replace(adapters.cloned()));
    let _restore = Restore(previous);
    f()
}

/// candle-nn's linear layer, with the branches of any LoRA active on it (for the models
/// built on candle-nn's layers, such as the CLIP text encoder).
#[derive(Debug, Clone)]
pub struct AdaptableLinear {
    layer: candle_nn::Linear,
    module: Arc<str>,
}

impl AdaptableLinear {
    /// Loads `weight` and `bias` from `vb`, as `candle_nn::linear` does.
    pub fn load(
        in_features: usize,
        out_features: usize,
        vb: candle_nn::VarBuilder,
    ) -> candle_core::Result<Self> {
        let module: Arc<str> = vb.prefix().into();
        let layer = candle_nn::linear(in_features, out_features, vb)?;
        register_adaptable(&module, layer.weight().dims());
        Ok(Self { layer, module })
    }
}

impl Module for AdaptableLinear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let ys = self.layer.forward(xs)?;
        add_branches(&self.module, LayerKind::Linear, xs, ys)
    }
}

/// How a layer applies its input: the branch's first matrix runs the same way.
#[derive(Debug, Clone, Copy)]
pub enum LayerKind {
    Linear,
    Conv2d { stride: usize, padding: usize },
}

/// `output` plus the active branches of `module` applied to `input`: the output as it is
/// when no adapter targets the module (or none is active).
pub fn add_branches(
    module: &str,
    kind: LayerKind,
    input: &Tensor,
    output: Tensor,
) -> candle_core::Result<Tensor> {
    ACTIVE.with(|active| {
        let active = active.borrow();
        let Some(branches) = active.as_ref().and_then(|a| a.branches.get(module)) else {
            return Ok(output);
        };
        let mut output = output;
        for branch in branches {
            let low = match kind {
                LayerKind::Linear => {
                    let down = candle_nn::Linear::new(branch.down.clone(), None);
                    let up = candle_nn::Linear::new(branch.up.clone(), None);
                    up.forward(&down.forward(&input.contiguous()?)?)?
                }
                LayerKind::Conv2d { stride, padding } => input
                    .conv2d(&branch.down, padding, stride, 1, 1)?
                    .conv2d(&branch.up, 0, 1, 1, 1)?,
            };
            output = (output + (low * branch.factor)?)?;
        }
        Ok(output)
    })
}

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
        let entries = with_flux_layers_split(entries).map_err(|e| bad(path, e))?;
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
        let sgm = self.sgm_unet(component, modules)?;
        self.entries
            .iter()
            .filter(|entry| entry.component == component)
            .map(|entry| {
                let name = match sgm {
                    Some(layers) if sgm::is_sgm(&entry.name) => {
                        sgm::to_diffusers(&entry.name, layers).ok_or_else(|| {
                            self.bad(format!(
                                "`{}` is an SDXL (sgm) UNet name of no layer a LoRA adapts",
                                entry.name
                            ))
                        })?
                    }
                    _ => entry.name.clone(),
                };
                let module = index.find(&name).ok_or_else(|| {
                    self.bad(format!(
                        "`{}` names no layer of the {component}: {}",
                        entry.name,
                        index.hint(&name)
                    ))
                })?;
                self.check_fits(entry, module, &modules[module])?;
                Ok(LoraTarget { module, entry })
            })
            .collect()
    }

    /// For a kohya file on an SDXL UNet (one with the added text-time embedding, whose
    /// LoRAs kohya names after Stability's sgm UNet), the UNet's layers per block, which the
    /// sgm names are read with; `None` where names are diffusers' own. A file naming the
    /// UNet both ways is refused: diffusers would silently drop its sgm half.
    fn sgm_unet(
        &self,
        component: &str,
        modules: &BTreeMap<String, Vec<usize>>,
    ) -> Result<Option<usize>, PipelineError> {
        let sdxl = modules.keys().any(|m| m.starts_with("add_embedding."));
        if self.layout != LoraLayout::Kohya || component != "unet" || !sdxl {
            return Ok(None);
        }
        let names = || self.entries.iter().filter(|e| e.component == component);
        let sgm = names().find(|e| sgm::is_sgm(&e.name));
        let diffusers = names().find(|e| sgm::is_diffusers(&e.name));
        if let (Some(sgm), Some(diffusers)) = (sgm, diffusers) {
            return Err(self.bad(format!(
                "names the UNet both after Stability's sgm model (`{}`) and after diffusers' (`{}`); diffusers would drop the sgm names without a word, so give a file of one naming",
                sgm.name, diffusers.name
            )));
        }
        let layers: std::collections::BTreeSet<&str> = modules
            .keys()
            .filter_map(|m| m.strip_prefix("down_blocks.0.resnets.")?.split('.').next())
            .collect();
        Ok(sgm.map(|_| layers.len()))
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

/// A component's modules by name, with their weights' shapes.
pub type LoraModules = BTreeMap<String, Vec<usize>>;

/// Every module of a component's weight files with a `.weight`, and that weight's shape:
/// what a LoRA's names are matched against.
pub fn module_shapes(files: &[PathBuf]) -> Result<LoraModules, PipelineError> {
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
    if let Some(module) = bfl_module(stem) {
        return Ok((flux_names::TRANSFORMER, module));
    }
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

/// A FLUX module under BFL's names, bare or under `transformer.` or `diffusion_model.`
/// (ComfyUI's prefix, which diffusers reads as kohya's `lora_unet_`).
fn bfl_module(stem: &str) -> Option<&str> {
    let module = ["transformer.", "diffusion_model.", ""]
        .iter()
        .find_map(|prefix| stem.strip_prefix(prefix))?;
    flux_names::is_bfl(module).then_some(module)
}

/// Entries naming FLUX's original modules (kohya's `lora_unet_double_blocks_*`, BFL's
/// `double_blocks.*`), fused ones split, as entries of diffusers' transformer layers.
fn with_flux_layers_split(entries: Vec<LoraEntry>) -> Result<Vec<LoraEntry>, String> {
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let original = matches!(entry.component, "unet" | "transformer");
        match original && flux_names::is_bfl(&entry.name) {
            true => out.extend(flux_names::to_diffusers(entry)?),
            false => out.push(entry),
        }
    }
    Ok(out)
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
        let (component, module) = bfl_module(stem)
            .map(|module| (flux_names::TRANSFORMER, module))
            .or_else(|| {
                KOHYA_COMPONENTS
                    .iter()
                    .find_map(|(prefix, c)| Some((*c, stem.strip_prefix(prefix)?)))
            })
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
