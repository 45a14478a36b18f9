//! The CLIP tokenizer, on Hugging Face's `tokenizers` library, giving the ids transformers'
//! `CLIPTokenizer(text, padding="max_length", truncation=True)` gives.
//!
//! A folder with a `tokenizer.json` is loaded from it. A folder with `vocab.json` and
//! `merges.txt` (what Stable Diffusion repositories ship) is assembled as transformers
//! converts it: special tokens split off the raw text first (the start and end tokens, and
//! the pad and unknown tokens the folder names: SDXL's `tokenizer_2` pads with `!`, so a
//! `!` in a prompt is that token); then NFC, whitespace runs to one space, lowercase; CLIP's
//! word pattern, byte-level mapping, and BPE with `</w>` ending each word. The ids are then
//! framed as `<|startoftext|> ... <|endoftext|>`, truncated and padded to a fixed length.

use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as Normalizers, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizers;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::{read_json_object, PipelineError};

const START_OF_TEXT: &str = "<|startoftext|>";
const END_OF_TEXT: &str = "<|endoftext|>";
/// CLIP's pre-tokenizer: English contractions, letter runs, single digits, and runs of
/// anything else that is not whitespace.
const WORD_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP's BPE tokenizer.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

/// The special tokens a folder names, with CLIP's defaults.
struct SpecialTokens {
    pad: String,
    unk: String,
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json`, else `vocab.json` and `merges.txt`;
    /// with the pad and unknown tokens `special_tokens_map.json` or `tokenizer_config.json`
    /// names (SD 2.x and SDXL's `tokenizer_2` pad with `!`, SD 1.x with `<|endoftext|>`).
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        let specials = special_tokens(dir)?;
        let file = dir.join("tokenizer.json");
        let mut tokenizer = match file.is_file() {
            true => Tokenizer::from_file(&file).map_err(|e| bad_file(&file, e))?,
            false => assemble(dir, &specials.unk)?,
        };
        let added = [START_OF_TEXT, END_OF_TEXT, &specials.pad, &specials.unk]
            .map(|token| AddedToken::from(token.to_string(), true));
        tokenizer
            .add_special_tokens(added)
            .map_err(|e| bad_file(dir, e))?;
        let id = |role: &str, token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| PipelineError::BadConfig {
                    file: dir.to_path_buf(),
                    problem: format!("{role} {token:?} is not in the vocabulary"),
                })
        };
        Ok(ClipTokenizer {
            bos_id: id("bos_token", START_OF_TEXT)?,
            eos_id: id("eos_token", END_OF_TEXT)?,
            pad_id: id("pad_token", &specials.pad)?,
            tokenizer,
        })
    }

    /// Id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id used to pad to the fixed length.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Number of entries in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Token ids of `text` between `<|startoftext|>` and `<|endoftext|>`, truncated so the
    /// end token stays last and padded to exactly `max_len` ids.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<Vec<u32>, PipelineError> {
        let body = self.encode_body(text)?;
        let body_len = body.len().min(max_len.saturating_sub(2));
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.bos_id);
        ids.extend_from_slice(&body[..body_len]);
        ids.push(self.eos_id);
        ids.truncate(max_len);
        ids.resize(max_len, self.pad_id);
        Ok(ids)
    }

    /// Token ids of `text` without start, end or padding.
    pub fn encode_body(&self, text: &str) -> Result<Vec<u32>, PipelineError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| PipelineError::invalid("prompt", format!("cannot be tokenized: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// The pipeline transformers builds for a CLIP `vocab.json` + `merges.txt`.
fn assemble(dir: &Path, unk: &str) -> Result<Tokenizer, PipelineError> {
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if let Some(missing) = [&vocab, &merges].into_iter().find(|file| !file.is_file()) {
        return Err(PipelineError::MissingFile {
            file: format!("tokenizer.json or {}", missing.display()),
            dir: dir.to_path_buf(),
        });
    }
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let model = BPE::from_file(&path(&vocab), &path(&merges))
        .end_of_word_suffix("</w>".to_string())
        .unk_token(unk.to_string())
        .build()
        .map_err(|e| bad_file(&vocab, e))?;
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ")
        .map_err(|e| bad_file(&vocab, e))?;
    let words = Split::new(
        SplitPattern::Regex(WORD_PATTERN.to_string()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| bad_file(&vocab, e))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(Normalizers::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| bad_file(&vocab, e))?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizers::new(vec![
        words.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    Ok(tokenizer)
}

/// The pad and unknown tokens `special_tokens_map.json` (else `tokenizer_config.json`)
/// names; `<|endoftext|>` where neither does.
fn special_tokens(dir: &Path) -> Result<SpecialTokens, PipelineError> {
    let mut tokens = SpecialTokens {
        pad: END_OF_TEXT.to_string(),
        unk: END_OF_TEXT.to_string(),
    };
    let Some(config) = special_tokens_file(dir)? else {
        return Ok(tokens);
    };
    if let Some(pad) = special_token_content(config.get("pad_token")) {
        tokens.pad = pad.to_string();
    }
    if let Some(unk) = special_token_content(config.get("unk_token")) {
        tokens.unk = unk.to_string();
    }
    Ok(tokens)
}

/// The folder's `special_tokens_map.json`, else its `tokenizer_config.json`: where
/// transformers reads a tokenizer's special tokens from. `None` when it has neither.
pub(super) fn special_tokens_file(
    dir: &Path,
) -> Result<Option<serde_json::Map<String, Value>>, PipelineError> {
    let file = ["special_tokens_map.json", "tokenizer_config.json"]
        .map(|name| dir.join(name))
        .into_iter()
        .find(|file| file.is_file());
    file.map(|file| read_json_object(&file)).transpose()
}

/// The content of a special token entry, written either as a string or as an object with
/// a `content` field.
pub(super) fn special_token_content(entry: Option<&Value>) -> Option<&str> {
    match entry? {
        Value::String(content) => Some(content),
        Value::Object(fields) => fields.get("content")?.as_str(),
        _ => None,
    }
}

pub(super) fn bad_file(file: &Path, error: impl std::fmt::Display) -> PipelineError {
    PipelineError::BadConfig {
        file: file.to_path_buf(),
        problem: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn fixture(path: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(path)
    }

    fn sd15() -> ClipTokenizer {
        ClipTokenizer::load(&fixture("tiny-sd15/model/tokenizer")).unwrap()
    }

    /// transformers normalises with NFC first: "é" typed as e + a combining accent (NFD)
    /// is the same text as the precomposed "é".
    #[test]
    fn decomposed_accents_tokenize_as_composed_ones() {
        let tokenizer = sd15();
        let composed = tokenizer.encode_body("caf\u{e9} cr\u{e8}me").unwrap();
        let decomposed = tokenizer.encode_body("cafe\u{301} cre\u{300}me").unwrap();
        assert_eq!(composed, decomposed);
    }

    /// Whitespace runs (tabs, newlines, non-breaking spaces) are one space, and case is
    /// folded, before the words are split.
    #[test]
    fn whitespace_runs_and_case_do_not_change_the_ids() {
        let tokenizer = sd15();
        assert_eq!(
            tokenizer.encode_body("A  Red\tFOX\n\u{a0}sits").unwrap(),
            tokenizer.encode_body("a red fox sits").unwrap()
        );
    }

    /// A special token written in the prompt is that token, not its spelling: the end
    /// token everywhere, and `!` where the folder pads with it (SDXL's `tokenizer_2`).
    #[test]
    fn special_tokens_in_the_text_are_split_off_first() {
        let tokenizer = sd15();
        let ids = tokenizer.encode_body("a<|endoftext|>b").unwrap();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[1], tokenizer.eos_id());
        let bang = ClipTokenizer::load(&fixture("tiny-sdxl/model/tokenizer_2")).unwrap();
        assert_eq!(bang.pad_id(), 0);
        assert_eq!(bang.encode_body("!").unwrap(), [0]);
        assert_ne!(sd15().encode_body("!").unwrap(), [0]);
    }

    #[test]
    fn long_prompts_keep_the_end_token_last_and_short_ones_are_padded() {
        let tokenizer = sd15();
        let long = tokenizer.encode_padded(&"word ".repeat(100), 77).unwrap();
        assert_eq!(long.len(), 77);
        assert_eq!(
            (long[0], long[76]),
            (tokenizer.bos_id(), tokenizer.eos_id())
        );
        let short = tokenizer.encode_padded("a fox", 77).unwrap();
        assert_eq!(short.len(), 77);
        assert_eq!(short[76], tokenizer.pad_id());
    }

    /// A folder with a `tokenizer.json` is read from it: saved from the assembled
    /// tokenizer, it gives the same ids.
    #[test]
    fn a_tokenizer_json_gives_the_same_ids_as_vocab_and_merges() {
        let dir = tempfile::tempdir().unwrap();
        let assembled = sd15();
        assembled
            .tokenizer
            .save(dir.path().join("tokenizer.json"), false)
            .unwrap();
        let loaded = ClipTokenizer::load(dir.path()).unwrap();
        for text in [
            "A photo of a cat, rusty robot!",
            "emoji 🚀 and café",
            "3.14",
        ] {
            assert_eq!(
                loaded.encode_padded(text, 77).unwrap(),
                assembled.encode_padded(text, 77).unwrap(),
                "{text}"
            );
        }
    }

    #[test]
    fn a_folder_without_its_files_names_what_it_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        let error = ClipTokenizer::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("tokenizer.json or"), "{error}");
        assert!(error.contains("vocab.json"), "{error}");
    }
}
