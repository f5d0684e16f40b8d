//! The run state: one JSON Lines file (`manifest.jsonl` in the run folder) appended as the run
//! goes, read back to resume. Each line is an event about one image ([`SampleKey`]):
//!
//! - `image`: the image was generated and stored (its path relative to the run folder, sha256);
//! - `judged`: a judge scored the image with that sha256 (answer, counts, tokens);
//! - `judge_failed`: a judge gave no score (its kind and message, the tokens billed anyway).
//!
//! The state is the fold of the lines in order: a later `image` replaces an earlier one (and so
//! drops its judgements, which name the old sha256), a judgement counts only for the image it
//! names, and judgements are kept per judge id ([`super::judge::judge_id`]), so another judge
//! or judge prompt judges again. A crash can leave a torn last line: it is ignored and cut off
//! when the file is opened for appending; a bad line elsewhere is an error.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::judge::{Judgement, Usage};
use super::spec::{Image, SampleKey};

/// The file name of the run state in a run folder.
pub const MANIFEST_FILE: &str = "manifest.jsonl";

/// One line of the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Entry {
    Image {
        #[serde(flatten)]
        key: SampleKey,
        prompt: String,
        /// Relative to the run folder.
        image: String,
        sha256: String,
        at: String,
    },
    Judged {
        #[serde(flatten)]
        key: SampleKey,
        sha256: String,
        judge: String,
        #[serde(flatten)]
        judgement: Judgement,
        at: String,
    },
    JudgeFailed {
        #[serde(flatten)]
        key: SampleKey,
        sha256: String,
        judge: String,
        kind: String,
        error: String,
        requests: u32,
        malformed: u32,
        usage: Usage,
        at: String,
    },
}

impl Entry {
    pub fn key(&self) -> &SampleKey {
        match self {
            Entry::Image { key, .. }
            | Entry::Judged { key, .. }
            | Entry::JudgeFailed { key, .. } => key,
        }
    }
}

/// Now, as the manifest writes times (RFC 3339, UTC, seconds).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The lowercase hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A stored image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    pub path: String,
    pub sha256: String,
}

/// What is known of one image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleState {
    pub prompt: String,
    pub image: Option<StoredImage>,
    /// Judgements of the current image, by judge id.
    pub judgements: BTreeMap<String, Judgement>,
    /// Failed judgements of the current image, by judge id (reset by a judgement).
    pub judge_failures: BTreeMap<String, u32>,
    /// Tokens billed per judge id over every line, failures and replaced images included.
    pub billed: BTreeMap<String, Usage>,
}

/// The fold of a manifest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunState {
    pub samples: BTreeMap<SampleKey, SampleState>,
    /// Lines read.
    pub lines: usize,
    /// A torn last line was ignored.
    pub torn_tail: bool,
}

impl RunState {
    /// Reads a manifest's text (see the module documentation).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut state = RunState::default();
        let complete = text.ends_with('\n');
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Entry>(line) {
                Ok(e) => {
                    state.apply(e);
                    state.lines += 1;
                }
                Err(_) if i + 1 == lines.len() && !complete => state.torn_tail = true,
                Err(e) => return Err(format!("manifest line {}: {e}", i + 1)),
            }
        }
        Ok(state)
    }

    /// Folds one more event in.
    pub fn apply(&mut self, e: Entry) {
        match e {
            Entry::Image {
                key,
                prompt,
                image,
                sha256,
                ..
            } => {
                let s = self.samples.entry(key).or_default();
                s.prompt = prompt;
                if s.image.as_ref().map(|i| &i.sha256) != Some(&sha256) {
                    s.judgements.clear();
                    s.judge_failures.clear();
                }
                s.image = Some(StoredImage {
                    path: image,
                    sha256,
                });
            }
            Entry::Judged {
                key,
                sha256,
                judge,
                judgement,
                ..
            } => {
                let s = self.samples.entry(key).or_default();
                *s.billed.entry(judge.clone()).or_default() += judgement.usage;
                if s.image.as_ref().map(|i| &i.sha256) == Some(&sha256) {
                    s.judge_failures.remove(&judge);
                    s.judgements.insert(judge, judgement);
                }
            }
            Entry::JudgeFailed {
                key,
                sha256,
                judge,
                usage,
                ..
            } => {
                let s = self.samples.entry(key).or_default();
                *s.billed.entry(judge.clone()).or_default() += usage;
                if s.image.as_ref().map(|i| &i.sha256) == Some(&sha256) {
                    *s.judge_failures.entry(judge).or_default() += 1;
                }
            }
        }
    }

    /// The image of `key` is still to be made.
    pub fn needs_image(&self, key: &SampleKey) -> bool {
        self.samples.get(key).is_none_or(|s| s.image.is_none())
    }

    /// The image of `key` is made but `judge` has not scored it.
    pub fn needs_judgement(&self, key: &SampleKey, judge: &str) -> bool {
        self.samples
            .get(key)
            .is_some_and(|s| s.image.is_some() && !s.judgements.contains_key(judge))
    }

    /// Every score `judge` gave, by key.
    pub fn scores<'a>(&'a self, judge: &'a str) -> impl Iterator<Item = (&'a SampleKey, u8)> + 'a {
        self.samples
            .iter()
            .filter_map(move |(k, s)| s.judgements.get(judge).map(|j| (k, j.score)))
    }

    /// Tokens `judge` was billed, per configuration.
    pub fn billed(&self, judge: &str) -> BTreeMap<String, Usage> {
        let mut out: BTreeMap<String, Usage> = BTreeMap::new();
        for (k, s) in &self.samples {
            if let Some(u) = s.billed.get(judge) {
                *out.entry(k.config.clone()).or_default() += *u;
            }
        }
        out
    }

    /// Stored images whose file is missing or no longer has the recorded sha256 (checked
    /// before a resume trusts them).
    pub fn damaged_images(&self, run_dir: &Path) -> Vec<SampleKey> {
        self.samples
            .iter()
            .filter_map(|(k, s)| {
                let img = s.image.as_ref()?;
                let ok = std::fs::read(run_dir.join(&img.path))
                    .map(|b| sha256_hex(&b) == img.sha256)
                    .unwrap_or(false);
                (!ok).then(|| k.clone())
            })
            .collect()
    }
}

/// The manifest of a run folder, open for appending.
pub struct Manifest {
    path: PathBuf,
    file: std::fs::File,
}

impl Manifest {
    /// Opens (or creates) `<run_dir>/manifest.jsonl` and reads its state; a torn last line is
    /// cut off so that the next line starts clean.
    pub fn open(run_dir: &Path) -> Result<(Self, RunState), String> {
        std::fs::create_dir_all(run_dir)
            .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
        let path = run_dir.join(MANIFEST_FILE);
        let text = match std::fs::read(&path) {
            Ok(b) => {
                String::from_utf8(b).map_err(|e| format!("{} is not UTF-8: {e}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let state = RunState::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        if state.torn_tail {
            let keep = text.rfind('\n').map_or(0, |i| i + 1);
            file.set_len(keep as u64)
                .map_err(|e| format!("cannot cut the torn line of {}: {e}", path.display()))?;
        }
        Ok((Self { path, file }, state))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event as one line, flushed to the disk.
    pub fn append(&mut self, e: &Entry) -> Result<(), String> {
        let mut line = serde_json::to_string(e).map_err(|e| e.to_string())?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))
    }
}

/// Stores an image in the run folder (atomically, at [`SampleKey::image_path`]) and returns its
/// manifest event.
pub fn store_image(
    run_dir: &Path,
    key: &SampleKey,
    prompt: &str,
    image: &Image,
) -> Result<Entry, String> {
    let rel = key.image_path(image.format);
    let path = run_dir.join(&rel);
    crate::image::write_atomic(&path, &image.bytes).map_err(|e| format!("{e:#}"))?;
    Ok(Entry::Image {
        key: key.clone(),
        prompt: prompt.to_string(),
        image: rel,
        sha256: sha256_hex(&image.bytes),
        at: now(),
    })
}

#[cfg(test)]
#[path = "manifest_tests.rs"]
mod tests;
