//! Task commands (`"task": {"command": ...}`), as diffusers-workflow registers them
//! (`dw/tasks/task.py`, `dw/tasks/image_utils.py`): the ones dw runs, and the ones it
//! refuses by name, with why.

/// Commands dw runs. None of them needs a model.
pub const IMPLEMENTED: &[&str] = &[
    "gather_inputs",
    "get_dict_value",
    "format_chat_message",
    "extract_sections",
    "get_image_size",
    "crop_square",
    "strip_exif",
    "resize_center_crop",
    "resize_rescale",
    "resize_resample",
    "resize_bucket",
    "add_border_and_mask",
    "add_border_and_mask_with_size",
    "canny_cv",
    "qr_code",
    "gather_images",
];

const NEEDS_MODEL: &str = "it runs a model that dw does not build";
const VIDEO_AUDIO: &str = "dw runs image pipelines; video and audio are not built";
const NOT_YET: &str = "this image operation is not built yet";

/// Commands diffusers-workflow registers that dw refuses, and why.
pub const REFUSED: &[(&str, &str)] = &[
    ("add_watermark", NOT_YET),
    ("gather_videos", VIDEO_AUDIO),
    ("concat_videos", VIDEO_AUDIO),
    ("slice_audio", VIDEO_AUDIO),
    ("video_frames", VIDEO_AUDIO),
    ("pair_audio", VIDEO_AUDIO),
    ("crossfade_audio", VIDEO_AUDIO),
    ("get_frame", VIDEO_AUDIO),
    ("get_first_frame", VIDEO_AUDIO),
    ("get_last_frame", VIDEO_AUDIO),
    ("interpolate_frames", VIDEO_AUDIO),
    ("upscale", NEEDS_MODEL),
    ("diffusion_upscale", NEEDS_MODEL),
    ("restore_faces", NEEDS_MODEL),
    ("segment", NEEDS_MODEL),
    ("image_to_text", NEEDS_MODEL),
    ("text_generation", NEEDS_MODEL),
    ("batch_decode_post_process", NEEDS_MODEL),
    ("remove_background", NEEDS_MODEL),
    ("segmentation", NEEDS_MODEL),
    ("zoe_depth", NEEDS_MODEL),
    ("depth", NEEDS_MODEL),
    ("depth_estimator", NEEDS_MODEL),
    ("depth_estimator_tensor", NEEDS_MODEL),
    ("mlsd", NEEDS_MODEL),
    ("normal_bae", NEEDS_MODEL),
    ("lineart", NEEDS_MODEL),
    ("openpose", NEEDS_MODEL),
    ("hed", NEEDS_MODEL),
    ("scribble", NEEDS_MODEL),
    ("pidi", NEEDS_MODEL),
    ("midas", NEEDS_MODEL),
    ("zoe", NEEDS_MODEL),
    ("teed", NEEDS_MODEL),
    ("anyline", NEEDS_MODEL),
    ("leres", NEEDS_MODEL),
    ("sam", NEEDS_MODEL),
    ("dw_pose", NEEDS_MODEL),
    ("shuffle", NOT_YET),
    ("canny", NOT_YET),
    ("lineart_standard", NOT_YET),
];

/// Checks a command name: `Ok` if dw runs it, else the refusal to show.
pub fn check(command: &str) -> Result<(), String> {
    if IMPLEMENTED.contains(&command) {
        return Ok(());
    }
    match REFUSED.iter().find(|(name, _)| *name == command) {
        Some((_, why)) => Err(format!("task `{command}` is not supported: {why}")),
        None => Err(format!(
            "unknown task command `{command}`; registered commands: {}",
            registered().join(", ")
        )),
    }
}

/// Every command diffusers-workflow registers, sorted.
pub fn registered() -> Vec<&'static str> {
    let mut all: Vec<&str> = IMPLEMENTED
        .iter()
        .copied()
        .chain(REFUSED.iter().map(|(n, _)| *n))
        .collect();
    all.sort_unstable();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_tasks_are_refused_by_name_and_unknown_ones_list_the_registered() {
        assert!(check("gather_inputs").is_ok());
        assert_eq!(
            check("upscale").unwrap_err(),
            "task `upscale` is not supported: it runs a model that dw does not build"
        );
        let e = check("face_detector").unwrap_err();
        assert!(
            e.starts_with(
                "unknown task command `face_detector`; registered commands: add_border_and_mask, "
            ),
            "{e}"
        );
    }

    #[test]
    fn no_command_is_listed_twice() {
        let all = registered();
        let mut unique = all.clone();
        unique.dedup();
        assert_eq!(all, unique);
    }
}
