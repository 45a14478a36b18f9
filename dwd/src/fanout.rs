//! What earlier steps produced, and how a step's `previous_result:` references turn into
//! runs, as diffusers-workflow does it (`dw/previous_results.py`, `dw/result.py`):
//!
//! - every run of a step adds one item to its result (a pipeline run: its batch of images;
//!   a task: its value, a list adding one item per element);
//! - `previous_result:STEP` takes every artifact of every item (each image of each run);
//!   `previous_result:STEP.PROP` takes `PROP` of each item that has it, one value per run;
//! - a step with several references runs once per combination (cartesian product in the
//!   order they are written, the first varying slowest), at most
//!   [`MAX_RUNS_PER_STEP`]; a reference whose value is an object holding the argument's
//!   own name gives that member (`{"width": "previous_result:size"}`);
//! - a step that references nothing runs once; a task's `inputs` list runs once per item.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::Tensor;
use protocol::workflow::{PreviousResult, MAX_RUNS_PER_STEP};
use serde_json::{Map, Value};

use crate::pipelines::RgbImage;

/// One value a step produced.
#[derive(Debug, Clone)]
pub enum Artifact {
    Image(Arc<RgbImage>),
    /// A pipeline run's images (one item of its result).
    Images(Vec<Arc<RgbImage>>),
    /// Final latents (`output_type: "{latent}"`).
    Latents(Tensor),
    /// Text, numbers, lists and objects of plain values.
    Json(Value),
    /// An object some of whose members are images (a border and its mask).
    Map(BTreeMap<String, Artifact>),
}

impl Artifact {
    /// What `previous_result:STEP` takes from one item.
    fn artifacts(&self) -> Vec<Artifact> {
        match self {
            Artifact::Images(images) => images.iter().cloned().map(Artifact::Image).collect(),
            other => vec![other.clone()],
        }
    }

    /// What `previous_result:STEP.PROP` takes from one item, if it has `PROP`.
    fn property(&self, name: &str) -> Option<Artifact> {
        match self {
            Artifact::Json(Value::Object(map)) => map.get(name).cloned().map(Artifact::Json),
            Artifact::Map(map) => map.get(name).cloned(),
            Artifact::Images(images) if name == "images" => Some(Artifact::Images(images.clone())),
            _ => None,
        }
    }

    /// The member named `key`, when this is an object holding it (dw's implicit pick).
    fn member(&self, key: &str) -> Option<Artifact> {
        match self {
            Artifact::Json(Value::Object(map)) => map.get(key).cloned().map(Artifact::Json),
            Artifact::Map(map) => map.get(key).cloned(),
            _ => None,
        }
    }

    /// In words, for errors.
    pub fn describe(&self) -> &'static str {
        match self {
            Artifact::Image(_) => "an image",
            Artifact::Images(_) => "a list of images",
            Artifact::Latents(_) => "latents",
            Artifact::Json(Value::String(_)) => "text",
            Artifact::Json(_) => "a JSON value",
            Artifact::Map(_) => "an object of images",
        }
    }
}

/// The items each earlier step produced, by step name.
#[derive(Default)]
pub struct StepResults {
    items: HashMap<String, Vec<Artifact>>,
}

impl StepResults {
    pub fn record(&mut self, step: &str, items: Vec<Artifact>) {
        self.items.insert(step.to_string(), items);
    }

    /// The items of `step`, as recorded.
    pub fn items(&self, step: &str) -> &[Artifact] {
        self.items.get(step).map(Vec::as_slice).unwrap_or(&[])
    }

    fn names(&self) -> impl Iterator<Item = &str> + Clone {
        self.items.keys().map(String::as_str)
    }

    /// The values `reference` stands for, one per run it starts.
    pub fn values(&self, reference: &PreviousResult) -> Result<Vec<Artifact>, String> {
        let (step, property) = reference.resolve(self.names())?;
        let items = self.items(&step);
        Ok(match property {
            None => items.iter().flat_map(Artifact::artifacts).collect(),
            Some(name) => items
                .iter()
                .filter_map(|item| item.property(&name))
                .collect(),
        })
    }
}

/// One run of a step: its arguments with plain values filled in, and the values that are
/// not JSON (images, latents) by the argument that takes them.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub arguments: Map<String, Value>,
    pub bound: HashMap<String, Artifact>,
}

/// Where a reference sits: the keys and indices leading to it.
type Path = Vec<Key>;

#[derive(Debug, Clone, PartialEq)]
enum Key {
    Member(String),
    Index(usize),
}

/// The runs `template` starts, given what earlier steps produced.
pub fn runs(template: &Map<String, Value>, results: &StepResults) -> Result<Vec<Run>, String> {
    let root = Value::Object(template.clone());
    let mut references = Vec::new();
    find_references(&root, &mut Vec::new(), &mut references);
    let mut axes = Vec::with_capacity(references.len());
    let mut total: usize = 1;
    for (path, reference) in &references {
        let values = results.values(reference)?;
        total = total.saturating_mul(values.len());
        if total > MAX_RUNS_PER_STEP {
            return Err(format!(
                "the step's `previous_result:` references make more than {MAX_RUNS_PER_STEP} runs; that is the limit"
            ));
        }
        axes.push((path, values));
    }
    let mut runs = Vec::with_capacity(total);
    for combination in 0..total {
        let mut value = root.clone();
        let mut bound = HashMap::new();
        let mut rest = combination;
        // The last reference varies fastest.
        for (path, values) in axes.iter().rev() {
            let chosen = &values[rest % values.len()];
            rest /= values.len();
            place(&mut value, path, chosen, &mut bound);
        }
        let arguments = match value {
            Value::Object(arguments) => arguments,
            _ => Map::new(),
        };
        runs.push(Run { arguments, bound });
    }
    Ok(runs)
}

fn find_references(value: &Value, path: &mut Path, found: &mut Vec<(Path, PreviousResult)>) {
    match value {
        Value::String(_) => {
            if let Some(reference) = PreviousResult::parse(value) {
                found.push((path.clone(), reference));
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Key::Index(i));
                find_references(item, path, found);
                path.pop();
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                path.push(Key::Member(key.clone()));
                find_references(item, path, found);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Puts `chosen` at `path`: JSON in place; anything else stays bound by its path's first
/// key (the argument) with the reference left in the JSON.
fn place(root: &mut Value, path: &Path, chosen: &Artifact, bound: &mut HashMap<String, Artifact>) {
    let picked = match path.last() {
        Some(Key::Member(key)) => chosen.member(key).unwrap_or_else(|| chosen.clone()),
        _ => chosen.clone(),
    };
    match picked {
        Artifact::Json(json) => {
            if let Some(slot) = slot_at(root, path) {
                *slot = json;
            }
        }
        other => {
            if let Some(Key::Member(argument)) = path.first() {
                bound.insert(argument.clone(), other);
            }
        }
    }
}

fn slot_at<'v>(root: &'v mut Value, path: &Path) -> Option<&'v mut Value> {
    path.iter().try_fold(root, |value, key| match key {
        Key::Member(name) => value.get_mut(name.as_str()),
        Key::Index(i) => value.get_mut(*i),
    })
}

/// The runs of a task with `inputs`: one per item, taken as they are.
pub fn input_runs(inputs: &[Value]) -> Vec<Run> {
    inputs
        .iter()
        .map(|input| {
            let mut arguments = Map::new();
            arguments.insert("input".to_string(), input.clone());
            Run {
                arguments,
                bound: HashMap::new(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image(n: u8) -> Arc<RgbImage> {
        Arc::new(RgbImage {
            width: 1,
            height: 1,
            pixels: vec![n; 3],
        })
    }

    fn template(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    // dw/previous_results.py get_iterations: one run per artifact, not a batch.
    #[test]
    fn a_reference_to_two_images_makes_two_runs() {
        let mut results = StepResults::default();
        results.record("gen", vec![Artifact::Images(vec![image(1), image(2)])]);
        let runs = runs(
            &template(json!({"prompt": "x", "image": "previous_result:gen"})),
            &results,
        )
        .unwrap();
        assert_eq!(runs.len(), 2);
        let first = match &runs[0].bound["image"] {
            Artifact::Image(i) => i.pixels[0],
            other => panic!("{other:?}"),
        };
        assert_eq!(first, 1);
        assert_eq!(runs[1].arguments["prompt"], json!("x"));
    }

    // tests/test_previous_results.py: references multiply, the first varying slowest.
    #[test]
    fn several_references_multiply_with_the_first_varying_slowest() {
        let mut results = StepResults::default();
        results.record(
            "a",
            vec![Artifact::Json(json!("a0")), Artifact::Json(json!("a1"))],
        );
        results.record(
            "b",
            vec![
                Artifact::Json(json!("b0")),
                Artifact::Json(json!("b1")),
                Artifact::Json(json!("b2")),
            ],
        );
        let runs = runs(
            &template(json!({"x": "previous_result:a", "y": ["previous_result:b"]})),
            &results,
        )
        .unwrap();
        let pairs: Vec<(String, String)> = runs
            .iter()
            .map(|r| {
                (
                    r.arguments["x"].as_str().unwrap().to_string(),
                    r.arguments["y"][0].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(pairs.len(), 6);
        assert_eq!(pairs[0], ("a0".into(), "b0".into()));
        assert_eq!(pairs[1], ("a0".into(), "b1".into()));
        assert_eq!(pairs[3], ("a1".into(), "b0".into()));
    }

    #[test]
    fn a_property_takes_one_value_per_item_and_an_object_gives_the_named_member() {
        let mut results = StepResults::default();
        results.record(
            "size",
            vec![Artifact::Json(json!({"width": 64, "height": 48}))],
        );
        let runs = runs(
            &template(
                json!({"width": "previous_result:size", "height": "previous_result:size.height"}),
            ),
            &results,
        )
        .unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].arguments["width"], json!(64));
        assert_eq!(runs[0].arguments["height"], json!(48));
    }

    #[test]
    fn no_reference_means_one_run_and_too_many_are_refused() {
        let results = StepResults::default();
        assert_eq!(
            runs(&template(json!({"prompt": "x"})), &results)
                .unwrap()
                .len(),
            1
        );
        let mut results = StepResults::default();
        let many: Vec<Artifact> = (0..101).map(|i| Artifact::Json(json!(i))).collect();
        results.record("n", many);
        let e = runs(
            &template(json!({"a": "previous_result:n", "b": "previous_result:n"})),
            &results,
        )
        .unwrap_err();
        assert!(e.contains("more than 10000 runs"), "{e}");
    }

    #[test]
    fn a_step_name_with_a_dot_is_matched_whole_before_a_property() {
        let mut results = StepResults::default();
        results.record("v1.5", vec![Artifact::Json(json!("whole"))]);
        results.record("v1", vec![Artifact::Json(json!({"5": "property"}))]);
        let runs = runs(&template(json!({"p": "previous_result:v1.5"})), &results).unwrap();
        assert_eq!(runs[0].arguments["p"], json!("whole"));
    }
}
