//! Pipeline families: the diffusers classes dw runs, and what each one takes.
//!
//! A family declares, in one table, the pipeline classes it serves (each with its argument
//! schema), the `_class_name`s of the model folders it loads (what `DiffusionPipeline` and
//! the `AutoPipelineFor*` classes resolve from `model_index.json`), its components by their
//! names in `model_index.json`, and the schedulers it runs. `dwctl validate` and the daemon
//! read the same tables, so a bad argument is caught before anything loads. The daemon's
//! implementation of a family lives in `dwd/src/pipelines/<family>/`; adding one is a table
//! here, that folder, and one line in each registry.

mod common;
pub mod flux;
pub mod schedule;
pub mod stable_diffusion;
pub mod stable_diffusion_3;
pub mod stable_diffusion_xl;
#[cfg(debug_assertions)]
pub mod test_noise;

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::workflow::{ArgSpec, Arguments};

/// What a pipeline class makes, as diffusers' auto pipelines tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    TextToImage,
    ImageToImage,
    /// Repainting the masked part of an image with a model trained for it (FLUX.1-Fill);
    /// no auto class resolves to it.
    Fill,
}

/// One diffusers pipeline class.
#[derive(Debug, PartialEq)]
pub struct PipelineClass {
    /// The class name, as `configuration.component_type` writes it.
    pub name: &'static str,
    /// The [`Family::id`] it belongs to.
    pub family: &'static str,
    pub task: Task,
    /// Its `__call__` arguments dw accepts, in groups (those its family's classes share,
    /// then its own).
    pub arguments: &'static [&'static [ArgSpec]],
}

impl PipelineClass {
    /// Every argument it takes.
    pub fn argument_specs(&self) -> impl Iterator<Item = &'static ArgSpec> {
        self.arguments.iter().flat_map(|group| group.iter())
    }

    pub fn argument(&self, name: &str) -> Option<&'static ArgSpec> {
        self.argument_specs().find(|a| a.name == name)
    }

    pub fn argument_names(&self) -> Vec<&'static str> {
        self.argument_specs().map(|a| a.name).collect()
    }

    /// Checks a step's arguments against this class.
    pub fn check(
        &self,
        arguments: &serde_json::Map<String, Value>,
    ) -> Result<Arguments, crate::workflow::ArgumentError> {
        Arguments::check(arguments, self)
    }
}

/// A component of a family's pipelines: its name in `model_index.json` (also its folder)
/// and the class it must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComponentSpec {
    pub name: &'static str,
    pub class: &'static str,
    /// Whether a folder may go without it (diffusers' `_optional_components`, listed as
    /// `[null, null]` in `model_index.json`, as the SDXL refiner lists its first text
    /// encoder); the pipeline then runs without it.
    pub optional: bool,
}

impl ComponentSpec {
    pub const fn required(name: &'static str, class: &'static str) -> Self {
        ComponentSpec {
            name,
            class,
            optional: false,
        }
    }

    pub const fn optional(name: &'static str, class: &'static str) -> Self {
        ComponentSpec {
            name,
            class,
            optional: true,
        }
    }
}

/// Everything a workflow can ask of one family.
#[derive(Debug, PartialEq)]
pub struct Family {
    /// Its folder under `dwd/src/pipelines/`.
    pub id: &'static str,
    /// What users call it, for messages.
    pub title: &'static str,
    pub classes: &'static [PipelineClass],
    /// `model_index.json` `_class_name`s of the folders it loads.
    pub folder_classes: &'static [&'static str],
    pub components: &'static [ComponentSpec],
    /// Scheduler classes its pipelines run.
    pub schedulers: &'static [&'static str],
    /// Whether its pipelines take `loras` (LoRA adapters) yet.
    pub loras: bool,
}

impl Family {
    pub fn component(&self, name: &str) -> Option<&'static ComponentSpec> {
        self.components.iter().find(|c| c.name == name)
    }

    fn class_for(&self, task: Task) -> Option<&'static PipelineClass> {
        self.classes.iter().find(|c| c.task == task)
    }
}

/// The noise-prediction schedulers (diffusers' Karras-diffusion family) dw implements, by
/// their diffusers names: what UNet pipelines (SD, SDXL) run.
pub const NOISE_SCHEDULERS: &[&str] = &[
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
];

/// The flow-matching schedulers dw implements: what rectified-flow transformers (FLUX)
/// run.
pub const FLOW_SCHEDULERS: &[&str] = &["FlowMatchEulerDiscreteScheduler"];

/// Every scheduler class dw implements.
pub const SCHEDULERS: &[&str] = &[
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
    "FlowMatchEulerDiscreteScheduler",
];

/// The families users can name, in the order messages list them.
pub static FAMILIES: &[&Family] = &[
    &stable_diffusion::FAMILY,
    &stable_diffusion_xl::FAMILY,
    &flux::FAMILY,
    &stable_diffusion_3::FAMILY,
];

/// Families only the test builds have (a tiny one that proves the seam).
#[cfg(debug_assertions)]
static TEST_FAMILIES: &[&Family] = &[&test_noise::FAMILY];
#[cfg(not(debug_assertions))]
static TEST_FAMILIES: &[&Family] = &[];

/// Every family this build runs.
pub fn families() -> impl Iterator<Item = &'static Family> {
    FAMILIES.iter().chain(TEST_FAMILIES).copied()
}

/// The family with this id.
pub fn family(id: &str) -> Option<&'static Family> {
    families().find(|f| f.id == id)
}

/// Class names users can write, for messages.
pub fn supported_classes() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.classes.iter().map(|c| c.name))
        .collect()
}

/// Every component name a family has, each once (`shared_components` and friends).
pub fn component_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for spec in families().flat_map(|f| f.components) {
        if !names.contains(&spec.name) {
            names.push(spec.name);
        }
    }
    names
}

/// Classes diffusers resolves from a model folder's `model_index.json`, and the task each
/// asks for (`None`: the folder's own class decides).
const AUTO_CLASSES: &[(&str, Option<Task>)] = &[
    ("DiffusionPipeline", None),
    ("AutoPipelineForText2Image", Some(Task::TextToImage)),
    ("AutoPipelineForImage2Image", Some(Task::ImageToImage)),
];

fn bare(component_type: &str) -> &str {
    component_type
        .strip_prefix("diffusers.")
        .unwrap_or(component_type)
}

/// Whether `component_type` is one diffusers resolves from `model_index.json`.
pub fn is_auto_class(component_type: &str) -> bool {
    AUTO_CLASSES.iter().any(|(n, _)| *n == bare(component_type))
}

/// The class a `component_type` names (bare, or as `diffusers.Name`), or why it cannot
/// run. An auto class gives, until its model folder is read, the first family's class for
/// the task it asks for; [`resolve_auto_class`] decides once the folder is known.
pub fn pipeline_class(component_type: &str) -> Result<&'static PipelineClass, String> {
    let class = bare(component_type);
    if let Some(found) = families().flat_map(|f| f.classes).find(|c| c.name == class) {
        return Ok(found);
    }
    if let Some((_, task)) = AUTO_CLASSES.iter().find(|(n, _)| *n == class) {
        let task = task.unwrap_or(Task::TextToImage);
        if let Some(found) = FAMILIES.iter().find_map(|f| f.class_for(task)) {
            return Ok(found);
        }
    }
    let supported = supported_classes().join(", ");
    if class.contains('.') {
        return Err(format!("pipeline class `{component_type}` is not supported: dw runs diffusers' own pipelines, not Python code from other modules; supported: {supported}"));
    }
    Err(format!(
        "pipeline class `{class}` is not supported yet; supported: {supported}"
    ))
}

/// The classes an auto `component_type` may resolve to, in registry order.
pub fn auto_candidates(component_type: &str) -> Vec<&'static PipelineClass> {
    let Some((_, task)) = AUTO_CLASSES
        .iter()
        .find(|(n, _)| *n == bare(component_type))
    else {
        return Vec::new();
    };
    families()
        .flat_map(|f| f.classes)
        .filter(|c| task.is_none_or(|t| c.task == t))
        .collect()
}

/// A model folder's `model_index.json`, read once for everything asked of it: its
/// `_class_name` (what an auto class resolves from) and the components it lists.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    path: PathBuf,
    /// Its entries (`None`: not a JSON object), or why it cannot be read.
    read: Result<Option<Map<String, Value>>, String>,
}

impl ModelIndex {
    /// Reads `model_dir/model_index.json` (bounded, a regular file only).
    pub fn read(model_dir: &Path) -> Self {
        let path = model_dir.join("model_index.json");
        let read = crate::input::read_text_bounded(&path, crate::input::CONFIG_BYTES)
            .map(|text| match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(entries)) => Some(entries),
                _ => None,
            })
            .map_err(|e| e.to_string());
        ModelIndex { path, read }
    }

    /// Its `_class_name`.
    pub fn class_name(&self) -> Result<String, String> {
        let entries = self
            .read
            .as_ref()
            .map_err(|e| format!("{} cannot be read: {e}", self.path.display()))?;
        entries
            .as_ref()
            .and_then(|e| e.get("_class_name")?.as_str().map(str::to_string))
            .ok_or_else(|| format!("{} has no `_class_name`", self.path.display()))
    }
}

impl ModelIndex {
    /// A boolean pipeline option it records (`force_zeros_for_empty_prompt`); `None` when
    /// absent or unreadable.
    pub fn flag(&self, key: &str) -> Option<bool> {
        let entries = self.read.as_ref().ok()?.as_ref()?;
        entries.get(key)?.as_bool()
    }

    /// How it lists component `name`: `Some(Some(class))`, `Some(None)` when absent or
    /// `[null, null]`, `None` when the index cannot be read.
    fn listed(&self, name: &str) -> Option<Option<&str>> {
        let entries = self.read.as_ref().ok()?.as_ref()?;
        Some(
            entries
                .get(name)
                .and_then(|v| v.get(1))
                .and_then(Value::as_str),
        )
    }
}

/// The optional components of `family` that a folder goes without: listed as null (or not
/// at all) in its `model_index.json` and not `supplied` from elsewhere. The pipeline runs
/// without them, as diffusers does.
pub fn omitted_components(
    family: &Family,
    index: &ModelIndex,
    supplied: &[&str],
) -> Vec<&'static str> {
    family
        .components
        .iter()
        .filter(|c| c.optional && !supplied.contains(&c.name))
        .filter(|c| index.listed(c.name) == Some(None))
        .map(|c| c.name)
        .collect()
}

/// Why `family` does not take `loras` yet.
pub fn loras_refusal(family: &Family) -> String {
    let taking: Vec<&str> = families().filter(|f| f.loras).map(|f| f.title).collect();
    format!(
        "`loras` on a {} pipeline is not built yet; LoRAs run on {} pipelines",
        family.title,
        taking.join(", ")
    )
}

/// Whether `family`'s pipelines can run without the component `name`, as a workflow asks
/// with `"name": null` in `from_pretrained_arguments`; the error says what can be left out.
pub fn check_omitted(family: &Family, name: &str) -> Result<(), String> {
    let optional: Vec<&str> = family
        .components
        .iter()
        .filter(|c| c.optional)
        .map(|c| c.name)
        .collect();
    let can = if optional.is_empty() {
        "none of its components can be".to_string()
    } else {
        format!("only {} can be", optional.join(", "))
    };
    match family.components.iter().find(|c| c.name == name) {
        Some(c) if c.optional => Ok(()),
        Some(_) => Err(format!(
            "`{name}`: null loads the pipeline without it, but a {} pipeline needs it; {can} left out",
            family.title
        )),
        None => Err(format!(
            "`{name}`: null loads the pipeline without it, but a {} pipeline has no `{name}` ({can} left out)",
            family.title
        )),
    }
}

/// The class an auto `component_type` resolves to for a folder whose `model_index.json`
/// names `folder_class`, as diffusers resolves it; an error names the class it would need.
pub fn resolve_auto_class(
    component_type: &str,
    folder_class: &str,
) -> Result<&'static PipelineClass, String> {
    let class = bare(component_type);
    let Some((_, task)) = AUTO_CLASSES.iter().find(|(n, _)| *n == class) else {
        return Err(format!("`{class}` is not an auto pipeline class"));
    };
    let unsupported = || {
        format!(
            "`{class}` resolves to `{folder_class}` from the model's model_index.json, which is not supported yet; supported: {}",
            supported_classes().join(", ")
        )
    };
    let family = families()
        .find(|f| f.folder_classes.contains(&folder_class))
        .ok_or_else(unsupported)?;
    let resolved = match task {
        Some(task) => family.class_for(*task),
        None => family.classes.iter().find(|c| c.name == folder_class),
    };
    resolved.ok_or_else(unsupported)
}

/// Resolves an auto `component_type` from the model folder's index; any other class is
/// itself.
pub fn class_for_folder(
    component_type: &str,
    written: &'static PipelineClass,
    index: &ModelIndex,
) -> Result<&'static PipelineClass, String> {
    if !is_auto_class(component_type) {
        return Ok(written);
    }
    let folder = index
        .class_name()
        .map_err(|e| format!("`{component_type}` is resolved from the model folder: {e}"))?;
    resolve_auto_class(component_type, &folder)
}

/// Why a model folder cannot give a family's component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FolderComponentError {
    /// `model_index.json` lists no such component (or lists it as `null`).
    Missing(String),
    /// It lists the component as another class than the family's.
    WrongClass(String),
}

/// Checks the components a model folder's `model_index.json` names against `family`'s:
/// each one the step does not take from elsewhere (`supplied`: component blocks and
/// reused components) must be listed there, as the class the family loads. A folder
/// without a `model_index.json` is not checked (the component folders speak for it).
pub fn check_folder_components(
    family: &Family,
    index: &ModelIndex,
    supplied: &[&str],
) -> Result<(), FolderComponentError> {
    let Ok(read) = &index.read else {
        return Ok(());
    };
    if read.is_none() {
        return Err(FolderComponentError::WrongClass(format!(
            "{} is not a JSON object",
            index.path.display()
        )));
    }
    for spec in family
        .components
        .iter()
        .filter(|c| !supplied.contains(&c.name))
    {
        let class = index.listed(spec.name).flatten();
        let path = &index.path;
        match class {
            None if spec.optional => {}
            None => {
                return Err(FolderComponentError::Missing(format!(
                    "{} lists no `{}`, which a {} pipeline needs; give it with a `{}` block",
                    path.display(),
                    spec.name,
                    family.title,
                    spec.name
                )))
            }
            Some(class) if bare_class(class) != bare_class(spec.class) => {
                return Err(FolderComponentError::WrongClass(format!(
                    "{} lists `{}` as `{class}`; a {} `{}` is `{}`",
                    path.display(),
                    spec.name,
                    family.title,
                    spec.name,
                    spec.class
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// A class name without its library (`transformers.CLIPTextModel` is `CLIPTextModel`).
fn bare_class(class: &str) -> &str {
    class.rsplit('.').next().unwrap_or(class)
}

/// Checks a component block (`"vae": {"configuration": {"component_type": ...}}`) against
/// the components of `class`'s family.
pub fn check_component(
    class: &PipelineClass,
    slot: &str,
    component_type: &str,
) -> Result<(), String> {
    let family = family(class.family).ok_or_else(|| format!("no family `{}`", class.family))?;
    let Some(spec) = family.component(slot) else {
        let slots: Vec<&str> = family.components.iter().map(|c| c.name).collect();
        return Err(format!(
            "`{slot}` is not supported here: a {} pipeline has no `{slot}`; its components are {}",
            family.title,
            slots.join(", ")
        ));
    };
    if bare(component_type) == bare(spec.class) {
        Ok(())
    } else {
        Err(format!(
            "component class `{component_type}` is not supported for `{slot}`; a {} `{slot}` is `{}`",
            family.title, spec.class
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_lists_every_scheduler_the_registry_has() {
        let readme = include_str!("../../../README.md");
        let section = readme
            .split("- **Schedulers**")
            .nth(1)
            .and_then(|rest| rest.split("\n- **").next())
            .expect("README.md has a Schedulers entry");
        for name in SCHEDULERS {
            assert!(
                section.contains(&format!("`{name}`")),
                "README.md should list {name}"
            );
        }
    }

    #[test]
    fn an_auto_class_resolves_through_the_registry_to_any_family() {
        let class = resolve_auto_class("DiffusionPipeline", "DwTestNoisePipeline").unwrap();
        assert_eq!(
            (class.name, class.family),
            ("DwTestNoisePipeline", "test_noise")
        );
        let class = resolve_auto_class("AutoPipelineForText2Image", "DwTestNoisePipeline").unwrap();
        assert_eq!(class.name, "DwTestNoisePipeline");
        let e =
            resolve_auto_class("AutoPipelineForImage2Image", "DwTestNoisePipeline").unwrap_err();
        assert!(
            e.contains("`AutoPipelineForImage2Image` resolves to `DwTestNoisePipeline`"),
            "{e}"
        );
    }

    #[test]
    fn auto_candidates_follow_the_task_an_auto_class_asks_for() {
        let names = |c: &str| -> Vec<&str> { auto_candidates(c).iter().map(|c| c.name).collect() };
        assert_eq!(
            names("AutoPipelineForImage2Image"),
            [
                "StableDiffusionImg2ImgPipeline",
                "StableDiffusionXLImg2ImgPipeline",
                "FluxImg2ImgPipeline",
                "StableDiffusion3Img2ImgPipeline"
            ]
        );
        assert!(names("DiffusionPipeline").contains(&"StableDiffusionImg2ImgPipeline"));
        assert!(names("StableDiffusionPipeline").is_empty());
    }

    fn fixture_index(folder: &str) -> ModelIndex {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-sdxl");
        ModelIndex::read(&dir.join(folder))
    }

    /// The SDXL refiner lists `tokenizer` and `text_encoder` as `[null, null]`: optional in
    /// SDXL (diffusers' `_optional_components`), so the folder passes and goes without them;
    /// a Stable Diffusion pipeline needs its `text_encoder` and says so.
    #[test]
    fn a_folder_may_go_without_an_optional_component_only() {
        let sdxl = &stable_diffusion_xl::FAMILY;
        let refiner = fixture_index("refiner");
        assert_eq!(check_folder_components(sdxl, &refiner, &[]), Ok(()));
        assert_eq!(
            omitted_components(sdxl, &refiner, &[]),
            ["tokenizer", "text_encoder"]
        );
        assert_eq!(
            omitted_components(sdxl, &refiner, &["text_encoder"]),
            ["tokenizer"],
            "a component given from elsewhere is loaded"
        );
        assert!(omitted_components(sdxl, &fixture_index("model"), &[]).is_empty());
        let sd = &stable_diffusion::FAMILY;
        match check_folder_components(sd, &refiner, &[]) {
            Err(FolderComponentError::Missing(m)) => assert!(m.contains("`tokenizer`"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn folder_options_are_read_from_model_index() {
        assert_eq!(
            fixture_index("model").flag("force_zeros_for_empty_prompt"),
            Some(true)
        );
        let refiner = fixture_index("refiner");
        assert_eq!(refiner.flag("force_zeros_for_empty_prompt"), Some(false));
        assert_eq!(refiner.flag("requires_aesthetics_score"), Some(true));
        assert_eq!(refiner.flag("no_such_option"), None);
    }

    #[test]
    fn a_component_block_is_checked_against_its_familys_table() {
        let sd = pipeline_class("StableDiffusionPipeline").unwrap();
        assert!(check_component(sd, "vae", "diffusers.AutoencoderKL").is_ok());
        let e = check_component(sd, "transformer", "FluxTransformer2DModel").unwrap_err();
        assert!(
            e.contains("a Stable Diffusion pipeline has no `transformer`"),
            "{e}"
        );
        let e = check_component(sd, "vae", "AutoencoderTiny").unwrap_err();
        assert!(
            e.contains("a Stable Diffusion `vae` is `AutoencoderKL`"),
            "{e}"
        );
        let noise = pipeline_class("DwTestNoisePipeline").unwrap();
        let e = check_component(noise, "vae", "AutoencoderKL").unwrap_err();
        assert!(e.contains("its components are "), "{e}");
    }

    #[test]
    fn a_folder_must_list_each_component_as_the_class_its_family_loads() {
        let dir = tempfile::tempdir().unwrap();
        let sd = &stable_diffusion::FAMILY;
        assert!(
            check_folder_components(sd, &ModelIndex::read(dir.path()), &[]).is_ok(),
            "no index: not checked"
        );
        let index = |text: &str| std::fs::write(dir.path().join("model_index.json"), text).unwrap();
        index(
            r#"{"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderTiny"]}"#,
        );
        match check_folder_components(sd, &ModelIndex::read(dir.path()), &[]) {
            Err(FolderComponentError::WrongClass(m)) => {
                assert!(m.contains("lists `vae` as `AutoencoderTiny`; a Stable Diffusion `vae` is `AutoencoderKL`"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            check_folder_components(sd, &ModelIndex::read(dir.path()), &["vae"]).is_ok(),
            "a vae block replaces it"
        );
        index(
            r#"{"text_encoder": [null, null], "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}"#,
        );
        match check_folder_components(sd, &ModelIndex::read(dir.path()), &[]) {
            Err(FolderComponentError::Missing(m)) => {
                assert!(m.contains("lists no `text_encoder`"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_class_names_a_family_that_lists_it() {
        for family in families() {
            for class in family.classes {
                assert_eq!(class.family, family.id, "{}", class.name);
            }
            assert!(family.schedulers.iter().all(|s| SCHEDULERS.contains(s)));
        }
    }
}
