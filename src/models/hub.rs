//! Where a model comes from: a local folder in the diffusers layout, or a Hugging Face Hub model
//! id downloaded into the standard cache (token from `HF_TOKEN`, `HF_TOKEN_PATH` or the cache's
//! token file; `HF_HUB_OFFLINE=1` resolves from the cache alone).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::Value;

/// The pipeline a model folder holds, from `model_index.json`'s `_class_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Sd3,
    Sdxl,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd3 => "sd3",
            Family::Sdxl => "sdxl",
        }
    }
}

/// A model folder in the diffusers layout.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    pub root: PathBuf,
    pub family: Family,
    index: Value,
}

impl ModelFolder {
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        let index_path = root.join("model_index.json");
        if !root.is_dir() {
            bail!("model folder {} does not exist", root.display());
        }
        let text = std::fs::read_to_string(&index_path).with_context(|| {
            format!(
                "{} is not a diffusers model folder (no readable model_index.json)",
                root.display()
            )
        })?;
        let index: Value = serde_json::from_str(&text)
            .with_context(|| format!("invalid JSON in {}", index_path.display()))?;
        let class = index
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let family = if class.starts_with("StableDiffusion3") {
            Family::Sd3
        } else if class.starts_with("StableDiffusionXL") {
            Family::Sdxl
        } else {
            bail!(
                "{}: unsupported pipeline class `{class}` (expected StableDiffusion3Pipeline or StableDiffusionXLPipeline)",
                index_path.display()
            );
        };
        Ok(Self {
            root: root.to_path_buf(),
            family,
            index,
        })
    }

    /// The folder of a component the index declares (not `null`), if it exists.
    pub fn component(&self, name: &str) -> Option<PathBuf> {
        let declared = match self.index.get(name) {
            Some(Value::Array(a)) => a.iter().any(|v| !v.is_null()),
            _ => false,
        };
        let dir = self.root.join(name);
        (declared && dir.is_dir()).then_some(dir)
    }

    /// Like `component`, but missing is an error naming the folder.
    pub fn require(&self, name: &str) -> anyhow::Result<PathBuf> {
        self.component(name).ok_or_else(|| {
            anyhow::anyhow!(
                "model folder {} has no `{name}` component",
                self.root.display()
            )
        })
    }
}

/// Resolves a model argument: an existing local folder, or a Hub model id (`org/name`, with an
/// optional `@revision`).
pub fn resolve(spec: &str) -> anyhow::Result<ModelFolder> {
    let path = Path::new(spec);
    if path.exists() {
        return ModelFolder::open(path);
    }
    let looks_like_id = spec.split('/').count() == 2
        && !spec.starts_with('.')
        && !spec.starts_with('/')
        && !spec.contains('\\');
    if !looks_like_id {
        bail!("model folder `{spec}` does not exist");
    }
    let dir = download(spec)?;
    ModelFolder::open(&dir)
}

fn token_from_env() -> Option<String> {
    if let Ok(t) = std::env::var("HF_TOKEN") {
        if !t.trim().is_empty() {
            return Some(t.trim().to_string());
        }
    }
    let path = std::env::var("HF_TOKEN_PATH").map(PathBuf::from).ok();
    let path = path.or_else(|| {
        std::env::var("HF_HOME")
            .map(|h| PathBuf::from(h).join("token"))
            .ok()
    });
    let path = path.or_else(|| {
        std::env::var("HOME")
            .map(|h| PathBuf::from(h).join(".cache/huggingface/token"))
            .ok()
    })?;
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Files of a diffusers repository worth downloading: configs, tokenizer files, and the
/// full-precision safetensors weights (the `.fp16.` variants only where no other exists).
pub fn wanted_files(all: &[String]) -> Vec<String> {
    let keep_meta = |f: &str| {
        f == "model_index.json"
            || (f.contains('/')
                && (f.ends_with(".json")
                    || f.ends_with(".txt")
                    || f.ends_with(".model")
                    || f.ends_with("spiece.model")))
    };
    let mut out: Vec<String> = all.iter().filter(|f| keep_meta(f)).cloned().collect();
    let weights: Vec<&String> = all
        .iter()
        .filter(|f| f.contains('/') && f.ends_with(".safetensors"))
        .collect();
    let mut by_dir: std::collections::BTreeMap<&str, Vec<&String>> = Default::default();
    for w in weights {
        let dir = w.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        by_dir.entry(dir).or_default().push(w);
    }
    for (_, files) in by_dir {
        let full: Vec<&&String> = files.iter().filter(|f| !f.contains(".fp16.")).collect();
        if full.is_empty() {
            out.extend(files.iter().map(|f| (*f).clone()));
        } else {
            out.extend(full.into_iter().map(|f| (*f).clone()));
        }
    }
    // Drop shard indexes of the variant we do not fetch.
    out.retain(|f| !(f.ends_with(".fp16.safetensors.index.json")));
    out.sort();
    out.dedup();
    out
}

fn download(spec: &str) -> anyhow::Result<PathBuf> {
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id.to_string(), rev.to_string()),
        None => (spec.to_string(), "main".to_string()),
    };
    let repo = hf_hub::Repo::with_revision(id.clone(), hf_hub::RepoType::Model, revision);
    let offline = std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    if offline {
        let cache = hf_hub::Cache::from_env();
        let cached = cache.repo(repo.clone());
        let index = cached.get("model_index.json").ok_or_else(|| {
            anyhow::anyhow!("HF_HUB_OFFLINE is set and `{id}` is not in the Hugging Face cache")
        })?;
        return Ok(index.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let api = hf_hub::api::tokio::ApiBuilder::from_env()
            .with_token(token_from_env())
            .with_progress(true)
            .build()
            .context("cannot set up the Hugging Face Hub client")?;
        let api_repo = api.repo(repo);
        let info = api_repo.info().await.with_context(|| {
            format!("cannot list `{id}` on the Hugging Face Hub (gated models need HF_TOKEN)")
        })?;
        let all: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        let mut root = None;
        for file in wanted_files(&all) {
            tracing::info!(model = %id, file = %file, "fetching from the Hugging Face Hub");
            let local = api_repo
                .get(&file)
                .await
                .with_context(|| format!("cannot download `{file}` of `{id}`"))?;
            if file == "model_index.json" {
                root = local.parent().map(Path::to_path_buf);
            }
        }
        root.ok_or_else(|| {
            anyhow::anyhow!("`{id}` has no model_index.json: not a diffusers repository")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_files_prefers_full_precision_and_keeps_tokenizers() {
        let all: Vec<String> = [
            "model_index.json",
            "README.md",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors",
            "transformer/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder_3/model-00001-of-00002.safetensors",
            "text_encoder_3/model-00002-of-00002.safetensors",
            "text_encoder_3/model.safetensors.index.json",
            "text_encoder_3/model.fp16-00001-of-00002.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer_3/spiece.model",
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let got = wanted_files(&all);
        assert!(got.contains(&"transformer/diffusion_pytorch_model.safetensors".to_string()));
        assert!(!got.contains(&"transformer/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(got.contains(&"text_encoder_3/model.safetensors.index.json".to_string()));
        assert!(got.contains(&"tokenizer/merges.txt".to_string()));
        assert!(got.contains(&"vae/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(!got.contains(&"README.md".to_string()));
    }
}
