//! Where a model comes from: a local folder in the diffusers layout, or a Hugging Face Hub model
//! id downloaded into the standard cache (token from `HF_TOKEN`, `HF_TOKEN_PATH` or the cache's
//! token file; `HF_HUB_OFFLINE=1` resolves from the cache alone; a Hub that cannot be reached
//! falls back to a complete snapshot in the cache). Of each component, the full-precision
//! weights or the `.fp16.` variant are fetched and loaded, as the model's [`Variant`] prefers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::Value;
use tch::{Device, Kind};

use super::weights::{choose_weight_files, is_shard_index, Variant, Vb, WeightError, Weights};

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
    /// The weight files loaded where a component holds both kinds.
    variant: Variant,
}

impl ModelFolder {
    /// Opens a model folder; its components load their full-precision weights where they also
    /// hold the `.fp16.` variant (see [`ModelFolder::preferring`]).
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
            variant: Variant::Full,
        })
    }

    /// The same folder, loading the `variant` files where a component holds both kinds.
    pub fn preferring(self, variant: Variant) -> Self {
        Self { variant, ..self }
    }

    /// The weight files preferred where a component holds both kinds.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// The weights of the component folder `dir` (from [`ModelFolder::require`]), memory-mapped:
    /// the preferred kind of files, else the kind it holds.
    pub fn weights(&self, dir: &Path, device: Device, kind: Kind) -> Result<Vb, WeightError> {
        Vb::from_dir_preferring(dir, self.variant, device, kind)
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

    /// The Hub revision (commit) the folder is a snapshot of, when it lies in a Hugging Face
    /// cache (`…/snapshots/<commit>/`).
    pub fn revision(&self) -> Option<String> {
        let root = self
            .root
            .canonicalize()
            .unwrap_or_else(|_| self.root.clone());
        let parent = root.parent()?;
        let name = root.file_name()?.to_str()?;
        (parent.file_name()? == "snapshots"
            && name.len() >= 7
            && name.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| name.to_string())
    }

    /// A short fingerprint of what this folder loads (12 hex digits): SHA-256 over
    /// `model_index.json`, and for each declared component (in name order) its JSON files
    /// (configs, tokenizer files) whole and the weight files it loads by name, length,
    /// safetensors header (every tensor's name, dtype, shape and offsets) and 16 blocks of 4 KiB
    /// sampled evenly through the data. It reads a few megabytes whatever the model's size (not
    /// the gigabytes of weights), and changes with any re-trained, fine-tuned, converted or
    /// truncated weights; it is a fingerprint, not a hash of every byte.
    pub fn weights_fingerprint(&self) -> anyhow::Result<String> {
        use sha2::{Digest, Sha256};
        use std::io::{Read, Seek, SeekFrom};
        let mut h = Sha256::new();
        let add_file = |h: &mut Sha256, path: &Path, rel: &str| -> anyhow::Result<()> {
            let mut f = std::fs::File::open(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let len = f.metadata()?.len();
            h.update(rel.as_bytes());
            h.update([0]);
            h.update(len.to_le_bytes());
            if !rel.ends_with(".safetensors") {
                let mut text = Vec::new();
                f.read_to_end(&mut text)?;
                h.update(&text);
                return Ok(());
            }
            let mut n = [0u8; 8];
            f.read_exact(&mut n)
                .with_context(|| format!("{} is not a safetensors file", path.display()))?;
            let header_len = u64::from_le_bytes(n).min(len.saturating_sub(8));
            let mut header = vec![0u8; header_len as usize];
            f.read_exact(&mut header)?;
            h.update(&header);
            let data_start = 8 + header_len;
            let data_len = len - data_start;
            const BLOCKS: u64 = 16;
            const BLOCK: u64 = 4096;
            let mut buf = vec![0u8; BLOCK as usize];
            for i in 0..BLOCKS {
                let at = data_start + data_len.saturating_sub(BLOCK) * i / (BLOCKS - 1);
                f.seek(SeekFrom::Start(at))?;
                let take = BLOCK.min(len - at) as usize;
                f.read_exact(&mut buf[..take])?;
                h.update(&buf[..take]);
            }
            Ok(())
        };
        add_file(
            &mut h,
            &self.root.join("model_index.json"),
            "model_index.json",
        )?;
        let mut names: Vec<&String> = self
            .index
            .as_object()
            .map(|o| o.keys().filter(|k| !k.starts_with('_')).collect())
            .unwrap_or_default();
        names.sort();
        for name in names {
            let Some(dir) = self.component(name) else {
                continue;
            };
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect();
            if let Ok(weights) = super::weights::Weights::weight_files(&dir, self.variant) {
                files.extend(weights);
            }
            files.sort();
            files.dedup();
            for path in files {
                let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                add_file(&mut h, &path, &format!("{name}/{file}"))?;
            }
        }
        Ok(hex::encode(&h.finalize()[..6]))
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
/// optional `@revision`). Components load the `prefer`red kind of weight files (and only those
/// are downloaded) where both exist.
///
/// An argument that is no existing path but reads as one (`./x`, `../x`, an absolute path, more
/// than one `/`, or a first segment that is a local folder, like `models/nope`) is a missing
/// folder, never looked up on the Hub.
pub fn resolve(spec: &str, prefer: Variant) -> anyhow::Result<ModelFolder> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(ModelFolder::open(path)?.preferring(prefer));
    }
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|_| "the current directory".into());
    if !is_hub_id(spec) {
        if path.is_absolute() {
            bail!("model folder `{spec}` does not exist");
        }
        bail!("model folder `{spec}` does not exist (relative to {cwd})");
    }
    let dir = download(spec, prefer).with_context(|| {
        format!(
            "`{spec}` is not a local folder (relative to {cwd}) and the Hugging Face Hub cannot resolve it"
        )
    })?;
    Ok(ModelFolder::open(&dir)?.preferring(prefer))
}

/// Whether a model argument that is no existing path reads as a Hub model id: `org/name` or
/// `org/name@revision`, whose `org` is no local folder.
pub fn is_hub_id(spec: &str) -> bool {
    let id = spec.split_once('@').map_or(spec, |(id, _)| id);
    let Some((org, name)) = id.split_once('/') else {
        return false;
    };
    !org.is_empty()
        && !name.is_empty()
        && !name.contains('/')
        && !spec.starts_with('.')
        && !spec.starts_with('/')
        && !spec.contains('\\')
        && !Path::new(id).is_absolute()
        && !Path::new(org).is_dir()
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

/// The file name of a repository path (`vae/diffusion_pytorch_model.safetensors` ->
/// `diffusion_pytorch_model.safetensors`).
fn file_name(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, name)| name)
}

/// Files of a diffusers repository worth downloading: configs, tokenizer files, and per
/// component folder the safetensors weights of the `prefer`red kind (the full-precision files,
/// or the `.fp16.` variant) with their shard index, the other kind only where a component has
/// no file of the preferred one.
pub fn wanted_files(all: &[String], prefer: Variant) -> Vec<String> {
    let keep_meta = |f: &str| {
        f == "model_index.json"
            || (f.contains('/')
                && !is_shard_index(file_name(f))
                && (f.ends_with(".json") || f.ends_with(".txt") || f.ends_with(".model")))
    };
    let mut out: Vec<String> = all.iter().filter(|f| keep_meta(f)).cloned().collect();
    let mut by_dir: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for f in all {
        if let Some((dir, name)) = f.rsplit_once('/') {
            if name.ends_with(".safetensors") || is_shard_index(name) {
                by_dir.entry(dir).or_default().push(name);
            }
        }
    }
    for (dir, names) in by_dir {
        if let Some(chosen) = choose_weight_files(&names, prefer) {
            out.extend(
                chosen
                    .weights
                    .iter()
                    .chain(chosen.index.iter())
                    .map(|name| format!("{dir}/{name}")),
            );
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Why a download failed: the Hub could not be reached (a connection or time-out error, a
/// 5xx, 408 or 429 answer), or anything else (401, 403, 404, a broken answer, the disk).
enum FetchError {
    Unreachable(anyhow::Error),
    Other(anyhow::Error),
}

/// Whether a Hub client error means the Hub could not be reached, rather than that it refused
/// (401, 403), does not know the model (404) or answered nonsense.
fn is_unreachable(e: &hf_hub::api::tokio::ApiError) -> bool {
    use hf_hub::api::tokio::ApiError;
    match e {
        ApiError::RequestError(r) => match r.status() {
            Some(status) => status.is_server_error() || matches!(status.as_u16(), 408 | 429),
            None => !r.is_decode() && !r.is_builder(),
        },
        ApiError::TooManyRetries(inner) => is_unreachable(inner),
        _ => false,
    }
}

fn download(spec: &str, prefer: Variant) -> anyhow::Result<PathBuf> {
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id.to_string(), rev.to_string()),
        None => (spec.to_string(), "main".to_string()),
    };
    let repo = hf_hub::Repo::with_revision(id.clone(), hf_hub::RepoType::Model, revision.clone());
    let offline = std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    let cache = hf_hub::Cache::from_env();
    if offline {
        let cached = cache.repo(repo.clone());
        let index = cached.get("model_index.json").ok_or_else(|| {
            anyhow::anyhow!("HF_HUB_OFFLINE is set and `{id}` is not in the Hugging Face cache")
        })?;
        return Ok(index.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(fetch(&id, repo.clone(), prefer)) {
        Ok(dir) => Ok(dir),
        Err(FetchError::Other(e)) => Err(e),
        Err(FetchError::Unreachable(e)) => match cached_snapshot(&cache, &repo) {
            Some(dir) => {
                tracing::warn!(
                    model = %id,
                    revision = %revision,
                    snapshot = %dir.display(),
                    error = %format!("{e:#}"),
                    "the Hugging Face Hub is unreachable: starting from the local cache"
                );
                Ok(dir)
            }
            None => Err(e.context(format!(
                "the Hugging Face Hub is unreachable and the local cache ({}) holds no complete snapshot of `{id}` at `{revision}`",
                cache.path().display()
            ))),
        },
    }
}

/// Lists the repository and downloads the wanted files (those already in the cache are not
/// fetched again); the snapshot folder.
async fn fetch(id: &str, repo: hf_hub::Repo, prefer: Variant) -> Result<PathBuf, FetchError> {
    let api = hf_hub::api::tokio::ApiBuilder::from_env()
        .with_token(token_from_env())
        .with_progress(true)
        .build()
        .context("cannot set up the Hugging Face Hub client")
        .map_err(FetchError::Other)?;
    let classify = |e: hf_hub::api::tokio::ApiError, what: String| {
        if is_unreachable(&e) {
            FetchError::Unreachable(anyhow::Error::new(e).context(what))
        } else {
            FetchError::Other(anyhow::Error::new(e).context(what))
        }
    };
    let api_repo = api.repo(repo);
    let info = api_repo.info().await.map_err(|e| {
        classify(
            e,
            format!("cannot list `{id}` on the Hugging Face Hub (gated models need HF_TOKEN)"),
        )
    })?;
    let all: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let mut root = None;
    for file in wanted_files(&all, prefer) {
        tracing::info!(model = %id, file = %file, "fetching from the Hugging Face Hub");
        let local = api_repo
            .get(&file)
            .await
            .map_err(|e| classify(e, format!("cannot download `{file}` of `{id}`")))?;
        if file == "model_index.json" {
            root = local.parent().map(Path::to_path_buf);
        }
    }
    root.ok_or_else(|| {
        FetchError::Other(anyhow::anyhow!(
            "`{id}` has no model_index.json: not a diffusers repository"
        ))
    })
}

/// The cached snapshot of `repo` at its revision, when it is complete enough to start from
/// (see [`is_complete_snapshot`]).
fn cached_snapshot(cache: &hf_hub::Cache, repo: &hf_hub::Repo) -> Option<PathBuf> {
    let index = cache.repo(repo.clone()).get("model_index.json")?;
    let root = index.parent()?.to_path_buf();
    is_complete_snapshot(&root).then_some(root)
}

/// Whether a model folder holds what loading needs, judged without the Hub's listing: a
/// readable `model_index.json`, and for each component it declares, its folder with at least
/// one file, and for a model component (anything but a tokenizer, scheduler or image
/// processor) its `config.json` and every weights file it would load.
pub fn is_complete_snapshot(root: &Path) -> bool {
    let Some(index) = std::fs::read_to_string(root.join("model_index.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    else {
        return false;
    };
    let Some(entries) = index.as_object() else {
        return false;
    };
    entries
        .iter()
        .filter(|(name, _)| !name.starts_with('_'))
        .filter_map(|(name, v)| {
            let parts = v.as_array()?;
            parts.iter().any(|p| !p.is_null()).then(|| {
                let class = parts.get(1).and_then(Value::as_str).unwrap_or("");
                (name, class)
            })
        })
        .all(|(name, class)| {
            let dir = root.join(name);
            let has_any_file = std::fs::read_dir(&dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false);
            if !has_any_file {
                return false;
            }
            let no_weights = [
                "Tokenizer",
                "Scheduler",
                "FeatureExtractor",
                "ImageProcessor",
            ];
            if no_weights.iter().any(|w| class.contains(w)) {
                return true;
            }
            dir.join("config.json").is_file()
                && Weights::weight_files(&dir, Variant::Full)
                    .is_ok_and(|files| files.iter().all(|f| f.is_file()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing() -> Vec<String> {
        [
            "model_index.json",
            "README.md",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors",
            "transformer/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder_3/config.json",
            "text_encoder_3/model-00001-of-00002.safetensors",
            "text_encoder_3/model-00002-of-00002.safetensors",
            "text_encoder_3/model.safetensors.index.json",
            "text_encoder_3/model.fp16-00001-of-00002.safetensors",
            "text_encoder_3/model.fp16-00002-of-00002.safetensors",
            "text_encoder_3/model.safetensors.index.fp16.json",
            "unet/diffusion_pytorch_model.safetensors.index.json",
            "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors.index.json",
            "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer_3/spiece.model",
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/model.safetensors",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Checks that `got` holds every file of `kept` and none of `dropped`.
    fn check(got: &[String], kept: &[&str], dropped: &[&str]) {
        for f in kept {
            assert!(got.iter().any(|g| g == f), "{f} should be fetched: {got:?}");
        }
        for f in dropped {
            assert!(!got.iter().any(|g| g == f), "{f} should not be fetched");
        }
    }

    #[test]
    fn wanted_files_prefers_full_precision_and_keeps_tokenizers() {
        let kept = [
            "model_index.json",
            "transformer/diffusion_pytorch_model.safetensors",
            "text_encoder_3/model.safetensors.index.json",
            "text_encoder_3/model-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model.safetensors.index.json",
            "tokenizer/merges.txt",
            "tokenizer_3/spiece.model",
            "vae/config.json",
            // A component with the variant only: the variant.
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/model.safetensors",
        ];
        let dropped = [
            "README.md",
            "transformer/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder_3/model.fp16-00001-of-00002.safetensors",
            "text_encoder_3/model.safetensors.index.fp16.json",
            "unet/diffusion_pytorch_model.fp16.safetensors.index.json",
            "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        ];
        check(&wanted_files(&listing(), Variant::Full), &kept, &dropped);
    }

    #[test]
    fn wanted_files_prefers_the_fp16_variant_when_asked() {
        let kept = [
            "model_index.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder_3/model.fp16-00001-of-00002.safetensors",
            "text_encoder_3/model.fp16-00002-of-00002.safetensors",
            "text_encoder_3/model.safetensors.index.fp16.json",
            "unet/diffusion_pytorch_model.fp16.safetensors.index.json",
            "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            // A component without the variant: its full-precision files.
            "text_encoder/model.safetensors",
            "tokenizer/vocab.json",
        ];
        let dropped = [
            "README.md",
            "transformer/diffusion_pytorch_model.safetensors",
            "text_encoder_3/model-00001-of-00002.safetensors",
            "text_encoder_3/model.safetensors.index.json",
            "unet/diffusion_pytorch_model.safetensors.index.json",
            "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        ];
        check(&wanted_files(&listing(), Variant::Fp16), &kept, &dropped);
    }

    #[test]
    fn the_variant_setting_follows_the_dtype_when_auto() {
        use super::super::weights::WeightsVariant;
        assert_eq!(WeightsVariant::default(), WeightsVariant::Auto);
        assert_eq!(WeightsVariant::Auto.resolve(Kind::Half), Variant::Fp16);
        assert_eq!(WeightsVariant::Auto.resolve(Kind::BFloat16), Variant::Fp16);
        assert_eq!(WeightsVariant::Auto.resolve(Kind::Float), Variant::Full);
        assert_eq!(WeightsVariant::Full.resolve(Kind::Half), Variant::Full);
        assert_eq!(WeightsVariant::Fp16.resolve(Kind::Float), Variant::Fp16);
        assert_eq!("full".parse::<WeightsVariant>(), Ok(WeightsVariant::Full));
        assert!("half".parse::<WeightsVariant>().is_err());
    }

    #[test]
    fn hub_ids_and_paths_are_told_apart() {
        assert!(is_hub_id("stabilityai/stable-diffusion-3-medium-diffusers"));
        assert!(is_hub_id("org/name@refs/pr/1"));
        for path in [
            "./nope", "../nope", "nope", "a/b/c", "/abs/x", "org/", "/x", r"a\b",
        ] {
            assert!(!is_hub_id(path), "{path}");
        }
        // `src` is a folder of this crate (tests run in its root): `src/nope` is a path.
        assert!(!is_hub_id("src/nope"));
    }

    #[test]
    fn a_missing_relative_folder_is_not_looked_up_on_the_hub() {
        for spec in ["./nope-r2f", "src/nope-r2f", "a/b/nope-r2f"] {
            let e = format!("{:#}", resolve(spec, Variant::Full).unwrap_err());
            assert!(
                e.contains(&format!(
                    "model folder `{spec}` does not exist (relative to"
                )),
                "{e}"
            );
            assert!(!e.contains("Hub"), "{e}");
        }
    }
}
