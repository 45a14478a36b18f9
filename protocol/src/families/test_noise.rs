//! A family only test builds have: `DwTestNoisePipeline` loads no weights and returns its
//! noise as images. It exists to prove that a family is added through the registries
//! alone; release builds do not contain it.

use super::{Family, PipelineClass, Task};
use crate::workflow::{ArgDefault, ArgSpec, ArgType, OutputType};

const ID: &str = "test_noise";

const SIDE: ArgType = ArgType::Integer { min: 1, max: 256 };

const ARGUMENTS: &[ArgSpec] = &[
    ArgSpec::new("prompt", ArgType::Prompts, ArgDefault::Unset),
    ArgSpec::new(
        "num_inference_steps",
        ArgType::Integer { min: 1, max: 100 },
        ArgDefault::Integer(2),
    ),
    ArgSpec::new("height", SIDE, ArgDefault::Integer(8)),
    ArgSpec::new("width", SIDE, ArgDefault::Integer(8)),
    ArgSpec::new(
        "num_images_per_prompt",
        ArgType::Integer { min: 1, max: 8 },
        ArgDefault::Integer(1),
    ),
    ArgSpec::new(
        "output_type",
        ArgType::OutputType,
        ArgDefault::Output(OutputType::Image),
    ),
];

pub static FAMILY: Family = Family {
    id: ID,
    title: "test noise",
    classes: &[PipelineClass {
        name: "DwTestNoisePipeline",
        family: ID,
        task: Task::TextToImage,
        arguments: &[ARGUMENTS],
    }],
    folder_classes: &["DwTestNoisePipeline"],
    components: &[],
    schedulers: &[],
    loras: false,
};
