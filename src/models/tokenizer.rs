//! Tokenizers from the files model repositories ship, with the padding and truncation the
//! diffusers pipelines use (`padding="max_length", truncation=True`).
//!
//! CLIP: SD3/SDXL repositories ship `vocab.json` + `merges.txt` (no `tokenizer.json`); the
//! tokenizer is assembled the way transformers builds `CLIPTokenizer` from them: NFC, whitespace
//! collapse and lowercasing; CLIP's split regex then byte-level; BPE with a `</w>` end-of-word
//! suffix; `<|startoftext|>` ... `<|endoftext|>` around the text. T5: `tokenizer.json`.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer file {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("tokenizer in {dir}: {message}")]
    Invalid { dir: PathBuf, message: String },
    #[error("cannot tokenize prompt: {0}")]
    Encode(String),
}

const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

fn read_json(path: &Path) -> Result<Value, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|e| TokenizerError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| TokenizerError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A token setting in `tokenizer_config.json` / `special_tokens_map.json`: a string or an
/// `{"content": ...}` object.
fn token_setting(dir: &Path, key: &str) -> Option<String> {
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(file);
        if !path.exists() {
            continue;
        }
        if let Ok(v) = read_json(&path) {
            match v.get(key) {
                Some(Value::String(s)) => return Some(s.clone()),
                Some(Value::Object(o)) => {
                    if let Some(Value::String(s)) = o.get("content") {
                        return Some(s.clone());
                    }
                }
                _ => {}
            }
        }
    }
    None
}

fn model_max_length(dir: &Path) -> Option<usize> {
    let path = dir.join("tokenizer_config.json");
    let v = read_json(&path).ok()?;
    v.get("model_max_length")
        .and_then(|m| m.as_f64())
        .filter(|m| *m < 1e9)
        .map(|m| m as usize)
}

/// A tokenizer that always yields exactly `length` ids (truncated, then padded on the right).
pub struct PromptTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    pad_token: String,
    length: usize,
}

impl PromptTokenizer {
    /// A CLIP tokenizer folder (`tokenizer/`, `tokenizer_2/`).
    pub fn clip(dir: &Path) -> Result<Self, TokenizerError> {
        let invalid = |message: String| TokenizerError::Invalid {
            dir: dir.to_path_buf(),
            message,
        };
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let inner = if vocab_path.exists() && merges_path.exists() {
            let vocab = read_json(&vocab_path)?;
            let merges_text =
                std::fs::read_to_string(&merges_path).map_err(|e| TokenizerError::Read {
                    path: merges_path.clone(),
                    message: e.to_string(),
                })?;
            let merges: Vec<Value> = merges_text
                .lines()
                .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
                .map(|l| {
                    let mut parts = l.splitn(2, ' ');
                    json!([parts.next().unwrap_or(""), parts.next().unwrap_or("")])
                })
                .collect();
            let bos = token_setting(dir, "bos_token").unwrap_or("<|startoftext|>".into());
            let eos = token_setting(dir, "eos_token").unwrap_or("<|endoftext|>".into());
            let unk = token_setting(dir, "unk_token").unwrap_or(eos.clone());
            let id = |t: &str| {
                vocab
                    .get(t)
                    .and_then(|v| v.as_u64())
                    .ok_or_else(|| invalid(format!("special token `{t}` is not in vocab.json")))
            };
            let (bos_id, eos_id) = (id(&bos)?, id(&eos)?);
            let special = |id: u64, content: &str| {
                json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            };
            let mut added = vec![special(bos_id, &bos), special(eos_id, &eos)];
            // transformers registers the pad token as a special added token too: with CLIP-G's
            // pad token "!", every "!" in a prompt becomes that single token.
            let pad = token_setting(dir, "pad_token").unwrap_or(eos.clone());
            if pad != bos && pad != eos {
                added.push(special(id(&pad)?, &pad));
            }
            let doc = json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "NFC"},
                    {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                    {"type": "Lowercase"}
                ]},
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
                ]},
                "post_processor": {"type": "RobertaProcessing", "sep": [eos, eos_id], "cls": [bos, bos_id],
                                   "trim_offsets": false, "add_prefix_space": false},
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
                          "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": false, "vocab": vocab, "merges": merges}
            });
            doc.to_string()
                .parse::<Tokenizer>()
                .map_err(|e| invalid(format!("cannot build CLIP BPE tokenizer: {e}")))?
        } else {
            let path = dir.join("tokenizer.json");
            Tokenizer::from_file(&path).map_err(|e| TokenizerError::Read {
                path,
                message: e.to_string(),
            })?
        };
        let length = model_max_length(dir).unwrap_or(77);
        let pad_token = token_setting(dir, "pad_token").unwrap_or("<|endoftext|>".into());
        Self::finish(dir, inner, pad_token, length)
    }

    /// A T5 tokenizer folder (`tokenizer_3/` with `tokenizer.json`), producing `length` ids.
    pub fn t5(dir: &Path, length: usize) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(TokenizerError::Invalid {
                dir: dir.to_path_buf(),
                message: "no tokenizer.json (a SentencePiece-only T5 tokenizer is not supported)"
                    .into(),
            });
        }
        let inner = Tokenizer::from_file(&path).map_err(|e| TokenizerError::Read {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let pad_token = token_setting(dir, "pad_token").unwrap_or("<pad>".into());
        Self::finish(dir, inner, pad_token, length)
    }

    fn finish(
        dir: &Path,
        inner: Tokenizer,
        pad_token: String,
        length: usize,
    ) -> Result<Self, TokenizerError> {
        let pad_id = inner
            .token_to_id(&pad_token)
            .ok_or_else(|| TokenizerError::Invalid {
                dir: dir.to_path_buf(),
                message: format!("pad token `{pad_token}` is not in the vocabulary"),
            })?;
        Self::configured(inner, pad_id, pad_token, length)
    }

    /// Sets truncation to `length` (special tokens kept) and right padding to `length`.
    fn configured(
        mut inner: Tokenizer,
        pad_id: u32,
        pad_token: String,
        length: usize,
    ) -> Result<Self, TokenizerError> {
        inner
            .with_truncation(Some(TruncationParams {
                max_length: length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad_token.clone(),
        }));
        Ok(Self {
            inner,
            pad_id,
            pad_token,
            length,
        })
    }

    pub fn length(&self) -> usize {
        self.length
    }

    /// The same tokenizer producing `length` ids.
    pub fn with_length(&self, length: usize) -> Result<Self, TokenizerError> {
        Self::configured(
            self.inner.clone(),
            self.pad_id,
            self.pad_token.clone(),
            length,
        )
    }

    /// Exactly `length` ids: special tokens added, truncated keeping them, padded on the right.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// The ids without padding (transformers' `padding="do_not_pad", truncation=True`): special
    /// tokens added, at most `length` ids. What the official R2F+ code diffs to find an
    /// object's tokens.
    pub fn encode_unpadded(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc
            .get_ids()
            .iter()
            .zip(enc.get_attention_mask())
            .filter(|(_, &m)| m == 1)
            .map(|(&i, _)| i as i64)
            .collect())
    }
}
