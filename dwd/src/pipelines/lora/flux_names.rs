//! FLUX.1 LoRAs that name Black Forest Labs' original modules, read as diffusers'
//! `_convert_kohya_flux_lora_to_diffusers` and `_convert_bfl_flux_control_lora_to_diffusers`
//! map them onto `FluxTransformer2DModel`.
//!
//! kohya's trainer writes `lora_unet_double_blocks_0_img_attn_qkv` (`lora_down`/`lora_up`
//! and `.alpha`), ComfyUI the same under `diffusion_model.`, and BFL's own tools
//! `double_blocks.0.img_attn.qkv.lora_A.weight` (bare, or under `transformer.` or
//! `diffusion_model.`). BFL's model fuses what diffusers keeps apart: a double block's
//! `qkv` is diffusers' `to_q`, `to_k` and `to_v` (the text stream's `add_*_proj`) stacked by
//! rows, and a single block's `linear1` is `to_q`, `to_k`, `to_v` and `proj_mlp` (the MLP
//! four times the width). A fused layer's LoRA is `B @ A` with B's rows in that same order,
//! so each diffusers layer takes A whole and its own rows of B, as diffusers splits them;
//! the sum of the parts is exactly the fused delta. The final layer's modulation is stored
//! (shift, scale) by BFL and (scale, shift) by diffusers: B's two halves of rows swap.

use candle_core::Tensor;

use super::LoraEntry;

/// The component every one of BFL's modules belongs to.
pub const TRANSFORMER: &str = "transformer";

/// Whether a module name (dotted or underscored) is one of BFL's FLUX modules.
pub fn is_bfl(module: &str) -> bool {
    let underscored = module.replace('.', "_");
    [
        "double_blocks_",
        "single_blocks_",
        "final_layer_",
        "time_in_",
        "vector_in_",
        "guidance_in_",
    ]
    .iter()
    .any(|prefix| underscored.starts_with(prefix))
        || matches!(underscored.as_str(), "img_in" | "txt_in")
}

/// How a BFL module's B rows become diffusers' layers.
enum Rows {
    /// One layer, rows as they are.
    Whole(&'static str),
    /// Equal parts, in order.
    Equal(&'static [&'static str]),
    /// A single block's `linear1`: q, k, v of width `w` each, then the MLP of `4w`.
    QkvMlp,
    /// The two halves swapped: (shift, scale) to (scale, shift).
    Swapped(&'static str),
}

/// A double block's layers by BFL's name after `double_blocks.N.`.
fn double(rest: &str) -> Option<Rows> {
    Some(match rest {
        "img_attn_qkv" => Rows::Equal(&["attn.to_q", "attn.to_k", "attn.to_v"]),
        "img_attn_proj" => Rows::Whole("attn.to_out.0"),
        "img_mlp_0" => Rows::Whole("ff.net.0.proj"),
        "img_mlp_2" => Rows::Whole("ff.net.2"),
        "img_mod_lin" => Rows::Whole("norm1.linear"),
        "txt_attn_qkv" => Rows::Equal(&["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
        "txt_attn_proj" => Rows::Whole("attn.to_add_out"),
        "txt_mlp_0" => Rows::Whole("ff_context.net.0.proj"),
        "txt_mlp_2" => Rows::Whole("ff_context.net.2"),
        "txt_mod_lin" => Rows::Whole("norm1_context.linear"),
        _ => return None,
    })
}

/// A single block's layers by BFL's name after `single_blocks.N.`.
fn single(rest: &str) -> Option<Rows> {
    Some(match rest {
        "linear1" => Rows::QkvMlp,
        "linear2" => Rows::Whole("proj_out"),
        "modulation_lin" => Rows::Whole("norm.linear"),
        _ => return None,
    })
}

/// The layers outside the blocks.
fn global(name: &str) -> Option<Rows> {
    Some(match name {
        "img_in" => Rows::Whole("x_embedder"),
        "txt_in" => Rows::Whole("context_embedder"),
        "time_in_in_layer" => Rows::Whole("time_text_embed.timestep_embedder.linear_1"),
        "time_in_out_layer" => Rows::Whole("time_text_embed.timestep_embedder.linear_2"),
        "vector_in_in_layer" => Rows::Whole("time_text_embed.text_embedder.linear_1"),
        "vector_in_out_layer" => Rows::Whole("time_text_embed.text_embedder.linear_2"),
        "guidance_in_in_layer" => Rows::Whole("time_text_embed.guidance_embedder.linear_1"),
        "guidance_in_out_layer" => Rows::Whole("time_text_embed.guidance_embedder.linear_2"),
        "final_layer_linear" => Rows::Whole("proj_out"),
        "final_layer_adaLN_modulation_1" => Rows::Swapped("norm_out.linear"),
        _ => return None,
    })
}

/// The diffusers block prefix and its layers' rows for a BFL module name.
fn resolve(module: &str) -> Option<(String, Rows)> {
    let underscored = module.replace('.', "_");
    let block = |prefix: &str| -> Option<(usize, String)> {
        let tail = underscored.strip_prefix(prefix)?;
        let (index, layer) = tail.split_once('_')?;
        Some((index.parse().ok()?, layer.to_string()))
    };
    if let Some((index, layer)) = block("double_blocks_") {
        return Some((format!("transformer_blocks.{index}."), double(&layer)?));
    }
    if let Some((index, layer)) = block("single_blocks_") {
        return Some((
            format!("single_transformer_blocks.{index}."),
            single(&layer)?,
        ));
    }
    Some((String::new(), global(&underscored)?))
}

/// A LoRA entry for one of BFL's modules as the entries of diffusers' layers it covers
/// (component `transformer`, dotted diffusers names); an unknown module, or rows that do
/// not split as the layout says, is an error naming it.
pub fn to_diffusers(entry: LoraEntry) -> Result<Vec<LoraEntry>, String> {
    let (prefix, rows) = resolve(&entry.name).ok_or_else(|| {
        format!(
            "`{}` is not a FLUX.1 module a LoRA adapts (double_blocks.N.{{img,txt}}_{{attn.qkv,attn.proj,mlp.0,mlp.2,mod.lin}}, single_blocks.N.{{linear1,linear2,modulation.lin}}, img_in, txt_in, time_in, vector_in, guidance_in, final_layer)",
            entry.name
        )
    })?;
    let total = entry.up.dims()[0];
    let parts: Vec<(&str, usize, usize)> = match rows {
        Rows::Whole(layer) => vec![(layer, 0, total)],
        Rows::Swapped(layer) => {
            let half = share(&entry.name, total, 2)?;
            let up = &entry.up;
            let swap = || Tensor::cat(&[up.narrow(0, half, half)?, up.narrow(0, 0, half)?], 0);
            let up = swap().map_err(|e| e.to_string())?;
            return Ok(vec![LoraEntry {
                component: TRANSFORMER,
                name: format!("{prefix}{layer}"),
                up,
                ..entry
            }]);
        }
        Rows::Equal(layers) => {
            let width = share(&entry.name, total, layers.len())?;
            layers
                .iter()
                .enumerate()
                .map(|(i, layer)| (*layer, i * width, width))
                .collect()
        }
        Rows::QkvMlp => {
            let width = share(&entry.name, total, 7)?;
            vec![
                ("attn.to_q", 0, width),
                ("attn.to_k", width, width),
                ("attn.to_v", 2 * width, width),
                ("proj_mlp", 3 * width, 4 * width),
            ]
        }
    };
    parts
        .into_iter()
        .map(|(layer, start, rows)| {
            Ok(LoraEntry {
                component: TRANSFORMER,
                name: format!("{prefix}{layer}"),
                down: entry.down.clone(),
                up: entry.up.narrow(0, start, rows).map_err(|e| e.to_string())?,
                scale: entry.scale,
            })
        })
        .collect()
}

/// `total` rows in `parts` equal shares (a single block's `linear1` in sevenths: three
/// of attention, four of MLP); the size of one.
fn share(name: &str, total: usize, parts: usize) -> Result<usize, String> {
    if total == 0 || !total.is_multiple_of(parts) {
        return Err(format!(
            "`{name}`: B has {total} rows, which do not split into the {parts} equal parts this FLUX layer fuses"
        ));
    }
    Ok(total / parts)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn entry(name: &str, rows: usize) -> LoraEntry {
        let up: Vec<f32> = (0..rows * 2).map(|v| v as f32).collect();
        LoraEntry {
            component: "unet",
            name: name.to_string(),
            down: Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap(),
            up: Tensor::from_vec(up, (rows, 2), &Device::Cpu).unwrap(),
            scale: 0.5,
        }
    }

    fn first_row(entry: &LoraEntry) -> Vec<f32> {
        entry.up.get(0).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn a_fused_qkv_splits_b_by_rows_and_keeps_a_whole() {
        for name in [
            "double_blocks_3_img_attn_qkv",
            "double_blocks.3.img_attn.qkv",
        ] {
            let parts = to_diffusers(entry(name, 6)).unwrap();
            let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(
                names,
                [
                    "transformer_blocks.3.attn.to_q",
                    "transformer_blocks.3.attn.to_k",
                    "transformer_blocks.3.attn.to_v"
                ]
            );
            assert_eq!(first_row(&parts[1]), [4.0, 5.0]);
            assert!(parts
                .iter()
                .all(|p| p.down.dims() == [2, 3] && p.scale == 0.5));
            assert!(parts.iter().all(|p| p.component == "transformer"));
        }
    }

    #[test]
    fn a_single_blocks_linear1_is_q_k_v_and_the_four_times_wider_mlp() {
        let parts = to_diffusers(entry("single_blocks_0_linear1", 14)).unwrap();
        let rows: Vec<(&str, usize)> = parts
            .iter()
            .map(|p| (p.name.as_str(), p.up.dims()[0]))
            .collect();
        assert_eq!(
            rows,
            [
                ("single_transformer_blocks.0.attn.to_q", 2),
                ("single_transformer_blocks.0.attn.to_k", 2),
                ("single_transformer_blocks.0.attn.to_v", 2),
                ("single_transformer_blocks.0.proj_mlp", 8)
            ]
        );
        assert_eq!(first_row(&parts[3]), [12.0, 13.0]);
        let e = to_diffusers(entry("single_blocks_0_linear1", 15)).unwrap_err();
        assert!(e.contains("15 rows"), "{e}");
    }

    #[test]
    fn the_final_modulation_swaps_shift_and_scale_in_b_only() {
        let parts = to_diffusers(entry("final_layer_adaLN_modulation_1", 4)).unwrap();
        assert_eq!(parts[0].name, "norm_out.linear");
        assert_eq!(first_row(&parts[0]), [4.0, 5.0]);
        assert_eq!(parts[0].down.dims(), [2, 3]);
    }

    #[test]
    fn globals_and_unknown_modules() {
        let parts = to_diffusers(entry("time_in.in_layer", 4)).unwrap();
        assert_eq!(parts[0].name, "time_text_embed.timestep_embedder.linear_1");
        let parts = to_diffusers(entry("txt_in", 4)).unwrap();
        assert_eq!(parts[0].name, "context_embedder");
        let e = to_diffusers(entry("double_blocks_0_img_attn_norm", 4)).unwrap_err();
        assert!(
            e.contains("`double_blocks_0_img_attn_norm` is not a FLUX.1 module"),
            "{e}"
        );
        assert!(is_bfl("single_blocks.1.linear2") && !is_bfl("transformer_blocks.0.attn.to_q"));
    }
}
