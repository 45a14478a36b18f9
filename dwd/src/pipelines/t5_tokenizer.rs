//! The T5 tokenizer, on Hugging Face's `tokenizers` library, giving the ids diffusers'
//! FLUX and SD 3 pipelines get from transformers' `T5TokenizerFast(text,
//! padding="max_length", max_length=n, truncation=True, add_special_tokens=True)`.
//!
//! The folder's `tokenizer.json` (a Unigram model behind SentencePiece's precompiled
//! normalizer and the Metaspace pre-tokenizer) is read as it is; special tokens typed in
//! the text (`</s>`, `<extra_id_0>`) are those tokens. A folder with only the SentencePiece
//! model (`spiece.model`) is refused: converting it is transformers' job, and every FLUX
//! and SD 3 repository ships the converted file. The ids are then framed as transformers
//! frames them: the text's ids truncated to leave room for `</s>`, then `</s>`, then
//! `<pad>` up to the fixed length. The end and pad tokens are those the folder's
//! `special_tokens_map.json` (else `tokenizer_config.json`) names, T5's `</s>` and `<pad>`
//! where neither does.

use std::path::Path;

use tokenizers::Tokenizer;

use super::tokenizer::{bad_file, special_token_content, special_tokens_file};
use super::PipelineError;

/// T5's end and pad tokens, where the folder names none.
const END_OF_TEXT: &str = "</s>";
const PAD: &str = "<pad>";

/// T5's SentencePiece (Unigram) tokenizer.
#[derive(Debug, Clone)]
pub struct T5Tokenizer {
    tokenizer: Tokenizer,
    eos_id: u32,
    pad_id: u32,
}

impl T5Tokenizer {
    /// Loads a tokenizer folder's `tokenizer.json`, with the end and pad tokens its
    /// `special_tokens_map.json` or `tokenizer_config.json` names.
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(missing_tokenizer_json(dir));
        }
        let tokenizer = Tokenizer::from_file(&file).map_err(|e| bad_file(&file, e))?;
        let (eos, pad) = special_tokens(dir)?;
        let id = |role: &str, token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                bad_file(&file, format!("{role} {token:?} is not in the vocabulary"))
            })
        };
        Ok(Self {
            eos_id: id("eos_token", &eos)?,
            pad_id: id("pad_token", &pad)?,
            tokenizer,
        })
    }

    /// Id of `</s>`, which ends every sequence.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id used to pad to the fixed length (`<pad>`, 0 in T5's vocabulary).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Number of entries in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Token ids of `text` followed by `</s>`, truncated so `</s>` stays last and padded
    /// with `<pad>` to exactly `max_len` ids.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<Vec<u32>, PipelineError> {
        if max_len == 0 {
            return Err(PipelineError::invalid(
                "max_sequence_length",
                "must be at least 1 (room for the end token)",
            ));
        }
        let mut ids = self.encode_body(text)?;
        ids.truncate(max_len - 1);
        ids.push(self.eos_id);
        ids.resize(max_len, self.pad_id);
        Ok(ids)
    }

    /// Token ids of `text` without the end token or padding.
    pub fn encode_body(&self, text: &str) -> Result<Vec<u32>, PipelineError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| PipelineError::invalid("prompt", format!("cannot be tokenized: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// The error for a folder without `tokenizer.json`, naming `spiece.model` when that is
/// what the folder has instead.
fn missing_tokenizer_json(dir: &Path) -> PipelineError {
    let file = match dir.join("spiece.model").is_file() {
        true => "tokenizer.json (spiece.model alone is not read: the T5 tokenizer needs the tokenizer.json T5TokenizerFast saves)",
        false => "tokenizer.json",
    };
    PipelineError::MissingFile {
        file: file.to_string(),
        dir: dir.to_path_buf(),
    }
}

/// The end and pad tokens `special_tokens_map.json` (else `tokenizer_config.json`) names.
fn special_tokens(dir: &Path) -> Result<(String, String), PipelineError> {
    let mut tokens = (END_OF_TEXT.to_string(), PAD.to_string());
    let Some(config) = special_tokens_file(dir)? else {
        return Ok(tokens);
    };
    if let Some(eos) = special_token_content(config.get("eos_token")) {
        tokens.0 = eos.to_string();
    }
    if let Some(pad) = special_token_content(config.get("pad_token")) {
        tokens.1 = pad.to_string();
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn fixture_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny-flux/model/tokenizer_2")
    }

    #[test]
    fn a_folder_with_only_the_sentencepiece_model_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::copy(
            fixture_dir().join("spiece.model"),
            dir.path().join("spiece.model"),
        )
        .expect("copied");
        let error = T5Tokenizer::load(dir.path())
            .expect_err("refused")
            .to_string();
        assert!(error.contains("tokenizer.json"), "{error}");
        assert!(error.contains("spiece.model"), "{error}");
    }

    #[test]
    fn short_texts_end_in_the_end_token_then_padding_and_long_ones_keep_it_last() {
        let tokenizer = T5Tokenizer::load(&fixture_dir()).expect("the fixture's tokenizer");
        assert_eq!((tokenizer.eos_id(), tokenizer.pad_id()), (1, 0));
        let short = tokenizer.encode_padded("a cat", 8).expect("ids");
        let body = tokenizer.encode_body("a cat").expect("body");
        assert_eq!(&short[..body.len()], body.as_slice());
        assert_eq!(short[body.len()], 1);
        assert!(short[body.len() + 1..].iter().all(|id| *id == 0));
        let long = tokenizer
            .encode_padded(&"word ".repeat(50), 8)
            .expect("ids");
        assert_eq!((long.len(), long[7]), (8, 1));
        assert_eq!(tokenizer.encode_padded("a cat", 1).expect("ids"), [1]);
        assert!(tokenizer.encode_padded("a cat", 0).is_err());
    }
}
