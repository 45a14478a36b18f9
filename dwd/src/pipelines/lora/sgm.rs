//! kohya's SDXL UNet names, read as diffusers' `_maybe_map_sgm_blocks_to_diffusers` and
//! `_convert_unet_lora_key` read them.
//!
//! kohya-ss trains SDXL on Stability's own UNet (the "sgm" code), so its SDXL LoRAs name
//! the UNet's layers after that model: `input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
//! `middle_block_2_emb_layers_1`, `output_blocks_5_2_conv`. Each sgm block holds one
//! diffusers module: with `L` layers per block, input block `n` (from 1) is down block
//! `(n - 1) / (L + 1)`, its `(n - 1) % (L + 1)`-th resnet (sub-block 0) or attention
//! (sub-block 1), or the downsampler (`op`); output block `n` is up block `n / (L + 1)`,
//! resnet or attention `n % (L + 1)`, or the upsampler (sub-block 2); the middle block is
//! resnet 0, attention 0, resnet 1. Inside a resnet, `in_layers_2` is `conv1`,
//! `out_layers_3` `conv2`, `emb_layers_1` `time_emb_proj`, `skip_connection`
//! `conv_shortcut`; attention layers keep their names. Outside the blocks, `input_blocks_0_0`
//! is `conv_in`, `out_2` `conv_out`, `time_embed_0`/`_2` the time embedding's linears and
//! `label_emb_0_0`/`_0_2` the added embedding's.
//!
//! The result is a diffusers module path written with `_` for `.`, as kohya writes
//! diffusers-named files, to be matched against the model's own modules.

/// Whether a kohya UNet name is written after the sgm UNet.
pub fn is_sgm(name: &str) -> bool {
    ["input_blocks_", "middle_block_", "output_blocks_"]
        .iter()
        .any(|prefix| name.starts_with(prefix))
        || matches!(
            name,
            "time_embed_0" | "time_embed_2" | "label_emb_0_0" | "label_emb_0_2" | "out_2"
        )
}

/// Whether a kohya UNet name is written after diffusers' UNet.
pub fn is_diffusers(name: &str) -> bool {
    ["down_blocks_", "mid_block_", "up_blocks_"]
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// The diffusers module (underscored) an sgm name means, for a UNet with
/// `layers_per_block`; `None` where the name is not one of an adapted layer.
pub fn to_diffusers(name: &str, layers_per_block: usize) -> Option<String> {
    let whole = match name {
        "input_blocks_0_0" => Some("conv_in"),
        "out_2" => Some("conv_out"),
        "time_embed_0" => Some("time_embedding_linear_1"),
        "time_embed_2" => Some("time_embedding_linear_2"),
        "label_emb_0_0" => Some("add_embedding_linear_1"),
        "label_emb_0_2" => Some("add_embedding_linear_2"),
        _ => None,
    };
    if let Some(whole) = whole {
        return Some(whole.to_string());
    }
    let per_block = layers_per_block + 1;
    if let Some(rest) = name.strip_prefix("input_blocks_") {
        let (block, sub, layer) = indices(rest)?;
        let (down, index) = (block.checked_sub(1)? / per_block, (block - 1) % per_block);
        return match (sub, layer) {
            (0, "op") => Some(format!("down_blocks_{down}_downsamplers_0_conv")),
            (0, layer) => Some(format!(
                "down_blocks_{down}_resnets_{index}_{}",
                resnet(layer)?
            )),
            (1, layer) => Some(format!("down_blocks_{down}_attentions_{index}_{layer}")),
            _ => None,
        };
    }
    if let Some(rest) = name.strip_prefix("output_blocks_") {
        let (block, sub, layer) = indices(rest)?;
        let (up, index) = (block / per_block, block % per_block);
        return match sub {
            0 => Some(format!("up_blocks_{up}_resnets_{index}_{}", resnet(layer)?)),
            1 => Some(format!("up_blocks_{up}_attentions_{index}_{layer}")),
            2 if layer == "conv" => Some(format!("up_blocks_{up}_upsamplers_0_conv")),
            _ => None,
        };
    }
    let rest = name.strip_prefix("middle_block_")?;
    let (sub, layer) = rest.split_once('_')?;
    match sub {
        "0" => Some(format!("mid_block_resnets_0_{}", resnet(layer)?)),
        "1" => Some(format!("mid_block_attentions_0_{layer}")),
        "2" => Some(format!("mid_block_resnets_1_{}", resnet(layer)?)),
        _ => None,
    }
}

/// `N_M_layer` into (N, M, layer).
fn indices(rest: &str) -> Option<(usize, usize, &str)> {
    let (block, rest) = rest.split_once('_')?;
    let (sub, layer) = rest.split_once('_')?;
    Some((block.parse().ok()?, sub.parse().ok()?, layer))
}

/// A resnet's layer under its diffusers name.
fn resnet(layer: &str) -> Option<&'static str> {
    match layer {
        "in_layers_2" => Some("conv1"),
        "out_layers_3" => Some("conv2"),
        "emb_layers_1" => Some("time_emb_proj"),
        "skip_connection" => Some("conv_shortcut"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diffusers' own mapping for SDXL (two layers per block), as its conversion gives it.
    #[test]
    fn sgm_names_map_to_the_diffusers_modules_diffusers_maps_them_to() {
        let cases = [
            (
                "input_blocks_1_0_in_layers_2",
                "down_blocks_0_resnets_0_conv1",
            ),
            (
                "input_blocks_1_0_emb_layers_1",
                "down_blocks_0_resnets_0_time_emb_proj",
            ),
            (
                "input_blocks_2_0_out_layers_3",
                "down_blocks_0_resnets_1_conv2",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            (
                "input_blocks_4_0_skip_connection",
                "down_blocks_1_resnets_0_conv_shortcut",
            ),
            (
                "input_blocks_4_1_proj_in",
                "down_blocks_1_attentions_0_proj_in",
            ),
            (
                "input_blocks_4_1_transformer_blocks_1_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q",
            ),
            (
                "input_blocks_5_1_transformer_blocks_0_attn2_to_out_0",
                "down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0",
            ),
            ("input_blocks_6_0_op", "down_blocks_1_downsamplers_0_conv"),
            (
                "input_blocks_8_1_transformer_blocks_9_ff_net_0_proj",
                "down_blocks_2_attentions_1_transformer_blocks_9_ff_net_0_proj",
            ),
            ("middle_block_0_in_layers_2", "mid_block_resnets_0_conv1"),
            (
                "middle_block_2_emb_layers_1",
                "mid_block_resnets_1_time_emb_proj",
            ),
            (
                "middle_block_1_transformer_blocks_3_attn1_to_k",
                "mid_block_attentions_0_transformer_blocks_3_attn1_to_k",
            ),
            (
                "output_blocks_0_0_skip_connection",
                "up_blocks_0_resnets_0_conv_shortcut",
            ),
            (
                "output_blocks_0_1_proj_out",
                "up_blocks_0_attentions_0_proj_out",
            ),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            ("output_blocks_5_2_conv", "up_blocks_1_upsamplers_0_conv"),
            (
                "output_blocks_5_1_transformer_blocks_1_attn2_to_v",
                "up_blocks_1_attentions_2_transformer_blocks_1_attn2_to_v",
            ),
            (
                "output_blocks_8_0_out_layers_3",
                "up_blocks_2_resnets_2_conv2",
            ),
            ("input_blocks_0_0", "conv_in"),
            ("out_2", "conv_out"),
            ("time_embed_0", "time_embedding_linear_1"),
            ("time_embed_2", "time_embedding_linear_2"),
            ("label_emb_0_0", "add_embedding_linear_1"),
            ("label_emb_0_2", "add_embedding_linear_2"),
        ];
        for (sgm, diffusers) in cases {
            assert!(is_sgm(sgm), "{sgm}");
            assert_eq!(to_diffusers(sgm, 2).as_deref(), Some(diffusers), "{sgm}");
        }
    }

    #[test]
    fn names_of_layers_no_lora_adapts_map_to_nothing() {
        for name in [
            "input_blocks_1_0_in_layers_0",
            "middle_block_3_in_layers_2",
            "output_blocks_1_3_conv",
            "input_blocks_x_0_op",
        ] {
            assert_eq!(to_diffusers(name, 2), None, "{name}");
        }
        assert!(!is_sgm("down_blocks_0_resnets_0_conv1"));
        assert!(is_diffusers("down_blocks_0_resnets_0_conv1"));
    }
}
