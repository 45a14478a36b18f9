//! End-to-end: LoRAs written as diffusers-workflow writes them (`"loras": [{model_name,
//! weight_name, adapter_name, scale}]` beside `configuration`; dw's `docs/LORAS.md`),
//! through `dwctl run` and the real daemon on `tests/fixtures/tiny-sd15-lora`: two
//! adapters, one adapter at another weight, the kohya file and `cross_attention_kwargs`
//! give diffusers' images within one level; a LoRA is a cached component of its own, so
//! changing only weights loads nothing and the base image comes back bit for bit; the FLUX
//! LoRA (`tests/fixtures/tiny-flux-lora`) likewise.

use dw_tests::{max_level_difference, png_pixels, repo_root, TestDaemon};

fn fixture(path: &str) -> std::path::PathBuf {
    repo_root().join("tests/fixtures/tiny-sd15-lora").join(path)
}

/// Runs the LoRA example, edited by `edit`, with `overrides` (`name=value`).
fn run(daemon: &TestDaemon, edit: impl Fn(String) -> String, overrides: &[&str]) -> dw_tests::Run {
    // Paths the edit writes are made absolute as `example_text` makes the example's.
    let fixtures = repo_root().join("tests/fixtures");
    let text = edit(dw_tests::example_text("tiny-sd-lora.json"))
        .replace("../tests/fixtures", fixtures.to_str().unwrap());
    let workflow = daemon.dir.path().join("lora.json");
    std::fs::write(&workflow, text).unwrap();
    let out = daemon.output_dir();
    let mut args = vec![
        "run",
        workflow.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(overrides);
    daemon.dwctl(&args)
}

fn pixels(run: &dw_tests::Run) -> Vec<u8> {
    run.assert_code(0);
    let summary = run.json();
    png_pixels(std::path::Path::new(
        summary["outputs"][0]["path"].as_str().unwrap(),
    ))
    .2
}

fn levels_from(ours: &[u8], case: &str) -> u8 {
    max_level_difference(
        ours,
        &png_pixels(&fixture(&format!("expected_{case}.png"))).2,
    )
}

fn misses(run: &dw_tests::Run) -> u64 {
    run.json()["cache"]["misses"].as_u64().unwrap()
}

/// Only the `loras` list, as another workflow would write it.
fn with_loras(loras: impl Into<String>) -> impl Fn(String) -> String {
    let loras = loras.into();
    move |text: String| {
        let start = text.find("\"loras\": [").unwrap();
        let end = start + text[start..].find("],\n        \"scheduler\"").unwrap() + 2;
        format!("{}\"loras\": {loras},{}", &text[..start], &text[end..])
    }
}

const PEFT_A: &str =
    r#"{"model_name": "../tests/fixtures/tiny-sd15-lora/peft", "adapter_name": "style"}"#;

#[test]
fn two_adapters_then_other_weights_then_none_on_one_warm_pipeline() {
    let daemon = TestDaemon::new();
    let both = run(&daemon, |t| t, &[]);
    assert!(levels_from(&pixels(&both), "a_b") <= 1);
    // tokenizer, text encoder, UNet, VAE and the two LoRAs.
    assert_eq!(misses(&both), 6, "{}", both.stdout);

    let scaled = run(&daemon, |t| t, &["style_scale=0.6", "detail_scale=0"]);
    assert!(levels_from(&pixels(&scaled), "a_scaled") <= 1);
    assert_eq!(
        misses(&scaled),
        0,
        "other weights load nothing: {}",
        scaled.stdout
    );

    let status = daemon.dwctl(&["status", "--json"]);
    status.assert_code(0);
    let loaded = status.json()["loaded"].as_array().unwrap().clone();
    let loras: Vec<_> = loaded
        .iter()
        .filter(|c| c["component_type"] == "lora")
        .collect();
    assert_eq!(loras.len(), 2, "{loaded:?}");
    assert!(loras.iter().all(|c| c["bytes"].as_u64().unwrap() > 0));

    let base = run(&daemon, with_loras("[]"), &[]);
    let base_pixels = pixels(&base);
    assert!(levels_from(&base_pixels, "base") <= 1);
    assert_eq!(misses(&base), 0);
    let fresh = TestDaemon::new();
    let untouched = pixels(&run(&fresh, with_loras("[]"), &[]));
    assert_eq!(
        base_pixels, untouched,
        "the base image after LoRA runs is the base image"
    );
}

/// The kohya file of LoRA A (found by diffusers' guess of the folder's one file) and
/// `cross_attention_kwargs` over weight 1.0.
#[test]
fn the_kohya_file_and_the_attention_scale_give_diffusers_images() {
    let daemon = TestDaemon::new();
    let kohya = run(
        &daemon,
        with_loras(
            r#"[{"model_name": "../tests/fixtures/tiny-sd15-lora/kohya", "adapter_name": "style"}]"#,
        ),
        &[],
    );
    assert!(levels_from(&pixels(&kohya), "kohya_a") <= 1);
    let scaled = run(
        &daemon,
        |t| {
            with_loras(format!("[{PEFT_A}]"))(t).replace(
                "\"guidance_scale\": 7.5,",
                "\"guidance_scale\": 7.5, \"cross_attention_kwargs\": {\"scale\": 0.6},",
            )
        },
        &[],
    );
    assert!(levels_from(&pixels(&scaled), "a_scaled") <= 1);
}

#[test]
fn lora_mistakes_are_refused_by_name() {
    let daemon = TestDaemon::new();
    let twice = run(&daemon, with_loras(format!("[{PEFT_A}, {PEFT_A}]")), &[]);
    assert_eq!(twice.code, 2, "{}", twice.stderr);
    assert!(
        twice
            .stderr
            .contains("adapter name `style` is already LoRA 0's"),
        "{}",
        twice.stderr
    );

    let other_kwarg = run(
        &daemon,
        |t| {
            t.replace(
                "\"guidance_scale\": 7.5,",
                "\"guidance_scale\": 7.5, \"cross_attention_kwargs\": {\"scale\": 1, \"ip\": 2},",
            )
        },
        &[],
    );
    assert_ne!(other_kwarg.code, 0);
    let text = format!("{}{}", other_kwarg.stdout, other_kwarg.stderr);
    assert!(
        text.contains("`cross_attention_kwargs` key `ip` is not read"),
        "{text}"
    );
}

/// FLUX.1-dev-style workflow with a PEFT LoRA on the transformer: weight 1.0, then 0.5
/// (nothing loads), then `joint_attention_kwargs` over 1.0, each diffusers' image.
#[test]
fn a_flux_lora_gives_diffusers_images_at_each_weight() {
    let daemon = TestDaemon::new();
    let text = dw_tests::example_text("tiny-flux-lora.json");
    let workflow = daemon.dir.path().join("flux-lora.json");
    std::fs::write(&workflow, &text).unwrap();
    let out = daemon.output_dir();
    let flux_run = |overrides: &[&str]| {
        let mut args = vec![
            "run",
            workflow.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(overrides);
        daemon.dwctl(&args)
    };
    let flux_fixture =
        |case: &str| repo_root().join(format!("tests/fixtures/tiny-flux-lora/expected_{case}.png"));
    let full = flux_run(&[]);
    assert!(max_level_difference(&pixels(&full), &png_pixels(&flux_fixture("a")).2) <= 1);
    // Six pipeline components and the LoRA.
    assert_eq!(misses(&full), 7, "{}", full.stdout);
    let half = flux_run(&["lora_scale=0.5"]);
    assert!(max_level_difference(&pixels(&half), &png_pixels(&flux_fixture("a_scaled")).2) <= 1);
    assert_eq!(misses(&half), 0);
    std::fs::write(
        &workflow,
        text.replace(
            "\"guidance_scale\": 3.5,",
            "\"guidance_scale\": 3.5, \"joint_attention_kwargs\": {\"scale\": 0.5},",
        ),
    )
    .unwrap();
    let kwarg = flux_run(&[]);
    assert!(max_level_difference(&pixels(&kwarg), &png_pixels(&flux_fixture("a_scaled")).2) <= 1);
}

/// An SD 1.5 LoRA on a FLUX pipeline: its UNet tensors would load and do nothing, so the
/// run is refused naming the LoRA and the component.
#[test]
fn a_lora_for_another_family_is_refused_by_component() {
    let daemon = TestDaemon::new();
    let text = dw_tests::example_text("tiny-flux-lora.json")
        .replace("tiny-flux-lora/peft", "tiny-sd15-lora/peft");
    let workflow = daemon.dir.path().join("wrong-lora.json");
    std::fs::write(&workflow, text).unwrap();
    let out = daemon.output_dir();
    let run = daemon.dwctl(&[
        "run",
        workflow.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("LoRA `style`")
            && run
                .stderr
                .contains("adapts `unet`, which a FLUX.1 pipeline does not adapt"),
        "{}",
        run.stderr
    );
}
