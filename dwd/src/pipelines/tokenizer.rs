//! The CLIP byte-level BPE tokenizer, built from the `vocab.json` and `merges.txt` that
//! Stable Diffusion checkpoints ship, producing the same ids as Hugging Face's
//! `CLIPTokenizer(text, padding="max_length", truncation=True)`.
//!
//! Steps: special tokens are split off the raw text; the rest is normalised (whitespace
//! runs become one space, lowercase), split by CLIP's pre-tokenizer pattern, mapped
//! byte by byte onto printable characters, and merged by BPE with `</w>` marking word ends.
//! Pieces missing from the vocabulary become the unknown token.

use std::collections::HashMap;
use std::path::Path;

use regex::Regex;
use serde_json::Value;

use super::{read_json_object, read_text, PipelineError};

const START_OF_TEXT: &str = "<|startoftext|>";
const END_OF_TEXT: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";
/// CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits,
/// and runs of anything else that is not whitespace.
const WORD_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP's BPE tokenizer.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    token_ids: HashMap<String, u32>,
    merge_ranks: HashMap<(String, String), usize>,
    byte_chars: [char; 256],
    word_pattern: Regex,
    whitespace_runs: Regex,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
    /// Special tokens split off the text before anything else, as transformers does with
    /// every special token it is given: the start and end tokens, and the pad and unknown
    /// tokens a config names (SDXL's `tokenizer_2` pads with `!`, so a `!` in a prompt is
    /// the pad token's id, not the word piece).
    specials: Vec<(String, u32)>,
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `vocab.json`, `merges.txt` and, when present, the pad and
    /// unknown tokens named in `special_tokens_map.json` or `tokenizer_config.json`
    /// (SD 2.x pads with `!`, SD 1.x with `<|endoftext|>`).
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        let mut tokenizer = Self::from_files(&dir.join("vocab.json"), &dir.join("merges.txt"))?;
        for file_name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let file = dir.join(file_name);
            if !file.is_file() {
                continue;
            }
            let config = read_json_object(&file)?;
            if let Some(pad) = special_token_content(config.get("pad_token")) {
                tokenizer.pad_id = tokenizer.special_id(&file, "pad_token", pad)?;
                tokenizer.add_special(pad, tokenizer.pad_id);
            }
            if let Some(unk) = special_token_content(config.get("unk_token")) {
                tokenizer.unk_id = tokenizer.special_id(&file, "unk_token", unk)?;
                tokenizer.add_special(unk, tokenizer.unk_id);
            }
            break;
        }
        Ok(tokenizer)
    }

    /// Builds the tokenizer from `vocab.json` and `merges.txt`; padding and unknown pieces
    /// use `<|endoftext|>`.
    pub fn from_files(vocab_json: &Path, merges_txt: &Path) -> Result<Self, PipelineError> {
        let vocab = read_json_object(vocab_json)?;
        let mut token_ids = HashMap::with_capacity(vocab.len());
        for (token, id) in vocab {
            let id = id
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| PipelineError::BadConfig {
                    file: vocab_json.to_path_buf(),
                    problem: format!("id of token {token:?} is not a small integer: {id}"),
                })?;
            token_ids.insert(token, id);
        }

        let merges = read_text(merges_txt)?;
        let mut merge_ranks = HashMap::new();
        for (line_index, line) in merges.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.is_empty() || (line_index == 0 && line.starts_with("#version")) {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(first), Some(second), None) => {
                    let rank = merge_ranks.len();
                    merge_ranks
                        .entry((first.to_string(), second.to_string()))
                        .or_insert(rank);
                }
                _ => {
                    return Err(PipelineError::BadConfig {
                        file: merges_txt.to_path_buf(),
                        problem: format!("line {} is not a pair: {line:?}", line_index + 1),
                    })
                }
            }
        }

        let mut tokenizer = Self {
            token_ids,
            merge_ranks,
            byte_chars: byte_to_unicode(),
            word_pattern: Regex::new(WORD_PATTERN).map_err(|error| PipelineError::BadConfig {
                file: vocab_json.to_path_buf(),
                problem: format!("pre-tokenizer pattern: {error}"),
            })?,
            whitespace_runs: Regex::new(r"\s+").map_err(|error| PipelineError::BadConfig {
                file: vocab_json.to_path_buf(),
                problem: format!("whitespace pattern: {error}"),
            })?,
            bos_id: 0,
            eos_id: 0,
            pad_id: 0,
            unk_id: 0,
            specials: Vec::new(),
        };
        tokenizer.bos_id = tokenizer.special_id(vocab_json, "bos_token", START_OF_TEXT)?;
        tokenizer.eos_id = tokenizer.special_id(vocab_json, "eos_token", END_OF_TEXT)?;
        tokenizer.pad_id = tokenizer.eos_id;
        tokenizer.unk_id = tokenizer.eos_id;
        tokenizer.add_special(START_OF_TEXT, tokenizer.bos_id);
        tokenizer.add_special(END_OF_TEXT, tokenizer.eos_id);
        Ok(tokenizer)
    }

    fn add_special(&mut self, token: &str, id: u32) {
        if !token.is_empty() && !self.specials.iter().any(|(t, _)| t == token) {
            self.specials.push((token.to_string(), id));
        }
    }

    fn special_id(&self, file: &Path, role: &str, token: &str) -> Result<u32, PipelineError> {
        self.token_ids
            .get(token)
            .copied()
            .ok_or_else(|| PipelineError::BadConfig {
                file: file.to_path_buf(),
                problem: format!("{role} {token:?} is not in the vocabulary"),
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

    /// Number of entries in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.token_ids.len()
    }

    /// Token ids of `text` between `<|startoftext|>` and `<|endoftext|>`, truncated so the
    /// end token stays last and padded to exactly `max_len` ids.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Vec<u32> {
        let body = self.encode_body(text);
        let body_len = body.len().min(max_len.saturating_sub(2));
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.bos_id);
        ids.extend_from_slice(&body[..body_len]);
        ids.push(self.eos_id);
        ids.truncate(max_len);
        ids.resize(max_len, self.pad_id);
        ids
    }

    /// Token ids of `text` without start, end or padding.
    pub fn encode_body(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        while let Some((before, special_id, after)) = self.split_at_special(rest) {
            self.encode_plain(before, &mut ids);
            ids.push(special_id);
            rest = after;
        }
        self.encode_plain(rest, &mut ids);
        ids
    }

    /// Finds the first special token written literally in the text (the longest one, where
    /// two start at the same place).
    fn split_at_special<'a>(&self, text: &'a str) -> Option<(&'a str, u32, &'a str)> {
        self.specials
            .iter()
            .filter_map(|(token, id)| text.find(token.as_str()).map(|at| (at, token, *id)))
            .min_by_key(|(at, token, _)| (*at, std::cmp::Reverse(token.len())))
            .map(|(at, token, id)| (&text[..at], id, &text[at + token.len()..]))
    }

    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) {
        let normalized = self.whitespace_runs.replace_all(text, " ").to_lowercase();
        for word in self.word_pattern.find_iter(&normalized) {
            let mapped: String = word
                .as_str()
                .bytes()
                .map(|byte| self.byte_chars[usize::from(byte)])
                .collect();
            for piece in self.bpe(&mapped) {
                ids.push(self.token_ids.get(&piece).copied().unwrap_or(self.unk_id));
            }
        }
    }

    /// Merges the characters of one word, the last one marked with `</w>`, by merge rank.
    fn bpe(&self, word: &str) -> Vec<String> {
        let mut pieces: Vec<String> = word.chars().map(String::from).collect();
        match pieces.last_mut() {
            Some(last) => last.push_str(END_OF_WORD),
            None => return pieces,
        }
        loop {
            let best = pieces
                .windows(2)
                .filter_map(|pair| {
                    self.merge_ranks
                        .get(&(pair[0].clone(), pair[1].clone()))
                        .map(|rank| (*rank, pair))
                })
                .min_by_key(|(rank, _)| *rank)
                .map(|(_, pair)| (pair[0].clone(), pair[1].clone()));
            let Some((first, second)) = best else {
                break;
            };
            let mut merged = Vec::with_capacity(pieces.len());
            let mut index = 0;
            while index < pieces.len() {
                if index + 1 < pieces.len() && pieces[index] == first && pieces[index + 1] == second
                {
                    merged.push(format!("{first}{second}"));
                    index += 2;
                } else {
                    merged.push(std::mem::take(&mut pieces[index]));
                    index += 1;
                }
            }
            pieces = merged;
            if pieces.len() == 1 {
                break;
            }
        }
        pieces
    }
}

/// The content of a special token entry, written either as a string or as an object with
/// a `content` field.
fn special_token_content(entry: Option<&Value>) -> Option<&str> {
    match entry? {
        Value::String(content) => Some(content),
        Value::Object(fields) => fields.get("content")?.as_str(),
        _ => None,
    }
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes map
/// to themselves, the others to code points from 256 upwards in byte order.
fn byte_to_unicode() -> [char; 256] {
    let keeps_itself =
        |byte: u32| (0x21..=0x7e).contains(&byte) || (0xa1..=0xac).contains(&byte) || byte >= 0xae;
    let mut chars = ['\0'; 256];
    let mut next_shifted = 256u32;
    for (byte, slot) in (0u32..).zip(chars.iter_mut()) {
        let code_point = if keeps_itself(byte) {
            byte
        } else {
            let shifted = next_shifted;
            next_shifted += 1;
            shifted
        };
        *slot = char::from_u32(code_point).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    chars
}
