//! Weights: memory-mapped safetensors (single files or sharded with an index), scoped by name
//! prefix the way the diffusers/transformers state dicts are laid out, converted to the wanted
//! dtype and device tensor by tensor. A `Random` source serves benchmarks at full size without
//! any download. The store records which tensors were read, so a test can check that a model
//! loads every tensor of its checkpoint (`Weights::unused_keys`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("cannot read weights {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid safetensors file {path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("tensor `{name}` is missing from {location}")]
    Missing { name: String, location: String },
    #[error("tensor `{name}` in {file} has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        file: PathBuf,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("tensor `{name}` in {file} has unsupported dtype {dtype}")]
    Dtype {
        name: String,
        file: PathBuf,
        dtype: String,
    },
    #[error("no safetensors weights found in {0}")]
    NoWeights(PathBuf),
    #[error("torch error on tensor `{name}`: {source}")]
    Torch { name: String, source: tch::TchError },
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<i64>,
    offsets: (usize, usize),
}

/// Where tensors come from.
enum Source {
    Files {
        files: Vec<MappedFile>,
        index: HashMap<String, Entry>,
        origin: PathBuf,
    },
    /// Random normal values (std 0.02, norm weights 1): for speed measurements only.
    Random,
}

pub struct Weights {
    source: Source,
    device: Device,
    kind: Kind,
    /// Names of the tensors read so far (files only).
    read: Mutex<BTreeSet<String>>,
    /// Random source only: every tensor handed out, by name, when asked to keep them (to
    /// write a random-weight model folder).
    kept: Option<Mutex<Vec<(String, Tensor)>>>,
}

crate::named_enum! {
    /// Which weight files of a component a model loads (`[models.NAME] variant`), where a
    /// component folder holds both the full-precision files and the `.fp16.` variant: `auto`
    /// takes the variant when the model runs in fp16 or bf16 and the full-precision files
    /// otherwise; `fp16` and `full` always prefer one. A component holding one kind only loads
    /// that kind whatever the setting.
    #[derive(Default)]
    pub enum WeightsVariant("weights variant") {
        #[default]
        Auto = "auto",
        Fp16 = "fp16",
        Full = "full",
    }
}

impl WeightsVariant {
    /// The files preferred by a model that runs in `kind`.
    pub fn resolve(self, kind: Kind) -> Variant {
        match self {
            WeightsVariant::Fp16 => Variant::Fp16,
            WeightsVariant::Full => Variant::Full,
            WeightsVariant::Auto if matches!(kind, Kind::Half | Kind::BFloat16) => Variant::Fp16,
            WeightsVariant::Auto => Variant::Full,
        }
    }
}

/// The weight files a component loads when its folder holds both kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Variant {
    /// The full-precision files (`model.safetensors`, `model-00001-of-00002.safetensors`).
    #[default]
    Full,
    /// The `.fp16.` variant files (`model.fp16.safetensors`,
    /// `model.fp16-00001-of-00002.safetensors`, their index `model.safetensors.index.fp16.json`
    /// or `model.fp16.safetensors.index.json`).
    Fp16,
}

/// Whether a file name (no folder) belongs to the `.fp16.` variant: `fp16` is one of its
/// dot- or dash-separated parts.
pub fn is_fp16_variant(file_name: &str) -> bool {
    file_name.split(['.', '-']).any(|part| part == "fp16")
}

/// Whether a file name (no folder) is a safetensors shard index (`*.safetensors.index.json`,
/// `*.safetensors.index.fp16.json`, ...).
pub fn is_shard_index(file_name: &str) -> bool {
    file_name.ends_with(".json")
        && file_name.contains(".safetensors.")
        && file_name.split('.').any(|part| part == "index")
}

/// The weight files of one component folder to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChosenFiles<'a> {
    /// The `.safetensors` files of the chosen kind.
    pub weights: Vec<&'a str>,
    /// Its shard index, if any: the shards to load are the ones it names.
    pub index: Option<&'a str>,
}

/// From the file names of one component folder (no folder part), the weight files to load:
/// those of the `prefer`red kind when it has any `.safetensors` file, else the other kind's.
/// `None` when the folder holds no `.safetensors` file.
pub fn choose_weight_files<'a>(names: &[&'a str], prefer: Variant) -> Option<ChosenFiles<'a>> {
    let of_kind = |fp16: bool| {
        let weights: Vec<&'a str> = names
            .iter()
            .copied()
            .filter(|n| n.ends_with(".safetensors") && is_fp16_variant(n) == fp16)
            .collect();
        let index = names
            .iter()
            .copied()
            .filter(|n| is_shard_index(n) && is_fp16_variant(n) == fp16)
            .min();
        (!weights.is_empty()).then_some(ChosenFiles { weights, index })
    };
    let fp16_first = prefer == Variant::Fp16;
    of_kind(fp16_first).or_else(|| of_kind(!fp16_first))
}

impl Weights {
    /// Memory-maps the safetensors weights of one component folder (`transformer/`, `vae/`, ...):
    /// `*.safetensors`, preferring a `*.safetensors.index.json` shard index when present, and
    /// the full-precision files over the `.fp16.` variant when both exist.
    pub fn from_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self, WeightError> {
        Self::from_dir_preferring(dir, Variant::Full, device, kind)
    }

    /// Like [`Weights::from_dir`], taking the `prefer`red kind of files when the folder holds
    /// both the full-precision files and the `.fp16.` variant (else whichever it holds).
    pub fn from_dir_preferring(
        dir: &Path,
        prefer: Variant,
        device: Device,
        kind: Kind,
    ) -> Result<Self, WeightError> {
        let files = Self::weight_files(dir, prefer)?;
        Self::from_files(&files, dir, device, kind)
    }

    /// The files [`Weights::from_dir_preferring`] maps from `dir`: the chosen kind's shards as
    /// its index names them, else its `.safetensors` files.
    pub fn weight_files(dir: &Path, prefer: Variant) -> Result<Vec<PathBuf>, WeightError> {
        let io = |source| WeightError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let chosen = choose_weight_files(&refs, prefer)
            .ok_or_else(|| WeightError::NoWeights(dir.to_path_buf()))?;
        // A sharded checkpoint: the index names the shards.
        if let Some(index) = chosen.index {
            let index = dir.join(index);
            let text = std::fs::read_to_string(&index).map_err(|source| WeightError::Io {
                path: index.clone(),
                source,
            })?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| WeightError::Format {
                    path: index.clone(),
                    message: e.to_string(),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| WeightError::Format {
                    path: index.clone(),
                    message: "no `weight_map` object".into(),
                })?;
            let mut shards: Vec<PathBuf> = map
                .values()
                .filter_map(|v| v.as_str())
                .map(|f| dir.join(f))
                .collect();
            shards.sort();
            shards.dedup();
            return Ok(shards);
        }
        Ok(chosen.weights.iter().map(|n| dir.join(n)).collect())
    }

    pub fn from_files(
        paths: &[PathBuf],
        origin: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<Self, WeightError> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let file = std::fs::File::open(path).map_err(|source| WeightError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the file is opened read-only; weights are not modified while mapped.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| WeightError::Io {
                path: path.clone(),
                source,
            })?;
            let (header, meta): (usize, Metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| WeightError::Format {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            let file_idx = files.len();
            for (name, info) in meta.tensors() {
                index.insert(
                    name,
                    Entry {
                        file: file_idx,
                        dtype: info.dtype,
                        shape: info.shape.iter().map(|&d| d as i64).collect(),
                        offsets: info.data_offsets,
                    },
                );
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                data_start: 8 + header,
            });
        }
        Ok(Self {
            source: Source::Files {
                files,
                index,
                origin: origin.to_path_buf(),
            },
            device,
            kind,
            read: Mutex::default(),
            kept: None,
        })
    }

    /// Random weights (norm weights 1, the rest N(0, 0.02²)) drawn from libtorch's global
    /// generator as each tensor is read: seed it with `tch::manual_seed` for repeatable values.
    pub fn random(device: Device, kind: Kind) -> Self {
        Self {
            source: Source::Random,
            device,
            kind,
            read: Mutex::default(),
            kept: None,
        }
    }

    /// A random source that keeps every tensor it hands out ([`Weights::take_kept`]).
    pub fn random_kept(device: Device, kind: Kind) -> Self {
        Self {
            kept: Some(Mutex::default()),
            ..Self::random(device, kind)
        }
    }

    /// The tensors a [`Weights::random_kept`] source handed out so far, by name.
    pub fn take_kept(&self) -> Vec<(String, Tensor)> {
        match &self.kept {
            Some(kept) => std::mem::take(&mut *kept.lock().unwrap_or_else(|e| e.into_inner())),
            None => Vec::new(),
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn is_random(&self) -> bool {
        matches!(self.source, Source::Random)
    }

    /// Where the tensors come from, for error messages.
    fn location(&self) -> String {
        match &self.source {
            Source::Files { origin, .. } => origin.display().to_string(),
            Source::Random => "random weights".into(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Files { index, .. } => index.contains_key(name),
            Source::Random => true,
        }
    }

    /// Names of all tensors (empty for the random source).
    pub fn names(&self) -> Vec<String> {
        match &self.source {
            Source::Files { index, .. } => index.keys().cloned().collect(),
            Source::Random => Vec::new(),
        }
    }

    /// Names of the tensors read so far by `get` / `get_kind`, sorted (empty for the random
    /// source). `contains` does not count as a read.
    pub fn read_keys(&self) -> Vec<String> {
        self.read_set().iter().cloned().collect()
    }

    /// Names of the tensors never read so far, sorted: after a model is built, what its
    /// checkpoint holds that the model does not use.
    pub fn unused_keys(&self) -> Vec<String> {
        let read = self.read_set();
        let mut unused: Vec<String> = self
            .names()
            .into_iter()
            .filter(|n| !read.contains(n))
            .collect();
        unused.sort();
        unused
    }

    fn read_set(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        // The set only ever grows by one name at a time: a poisoned lock still holds a valid set.
        self.read.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tensor `name`, checked against `shape`, on the store's device in the store's dtype.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor, WeightError> {
        self.get_kind(name, shape, self.kind)
    }

    /// Like `get` with an explicit dtype (some tensors stay float32 whatever the model dtype).
    pub fn get_kind(&self, name: &str, shape: &[i64], kind: Kind) -> Result<Tensor, WeightError> {
        match &self.source {
            Source::Random => {
                let t = if name.ends_with("norm.weight")
                    || name.contains("norm") && name.ends_with(".weight") && shape.len() == 1
                {
                    Tensor::ones(shape, (kind, self.device))
                } else {
                    Tensor::randn(shape, (kind, self.device)) * 0.02
                };
                if let Some(kept) = &self.kept {
                    kept.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((name.to_string(), t.shallow_clone()));
                }
                Ok(t)
            }
            Source::Files {
                files,
                index,
                origin,
            } => {
                let entry = index.get(name).ok_or_else(|| WeightError::Missing {
                    name: name.to_string(),
                    location: origin.display().to_string(),
                })?;
                let file = &files[entry.file];
                if entry.shape != shape {
                    return Err(WeightError::Shape {
                        name: name.to_string(),
                        file: file.path.clone(),
                        expected: shape.to_vec(),
                        found: entry.shape.clone(),
                    });
                }
                let src_kind = match entry.dtype {
                    Dtype::F32 => Kind::Float,
                    Dtype::F16 => Kind::Half,
                    Dtype::BF16 => Kind::BFloat16,
                    Dtype::F64 => Kind::Double,
                    Dtype::I64 => Kind::Int64,
                    Dtype::I32 => Kind::Int,
                    other => {
                        return Err(WeightError::Dtype {
                            name: name.to_string(),
                            file: file.path.clone(),
                            dtype: format!("{other:?}"),
                        })
                    }
                };
                let (start, end) = entry.offsets;
                let bytes = &file.mmap[file.data_start + start..file.data_start + end];
                let torch_err = |source| WeightError::Torch {
                    name: name.to_string(),
                    source,
                };
                let t = Tensor::f_from_data_size(bytes, shape, src_kind).map_err(torch_err)?;
                self.read_set().insert(name.to_string());
                // Move first, then convert: the conversion then runs on the device.
                let t = t.f_to_device(self.device).map_err(torch_err)?;
                Ok(if src_kind == kind {
                    t
                } else {
                    t.f_to_kind(kind).map_err(torch_err)?
                })
            }
        }
    }
}

/// A view of the weights under a name prefix, mirroring the module tree of the checkpoint.
#[derive(Clone)]
pub struct Vb {
    weights: Arc<Weights>,
    prefix: String,
}

impl Vb {
    pub fn new(weights: Weights) -> Self {
        Self {
            weights: Arc::new(weights),
            prefix: String::new(),
        }
    }

    /// The weights of one component folder, memory-mapped.
    pub fn from_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self, WeightError> {
        Ok(Self::new(Weights::from_dir(dir, device, kind)?))
    }

    /// [`Weights::from_dir_preferring`], as a view.
    pub fn from_dir_preferring(
        dir: &Path,
        prefer: Variant,
        device: Device,
        kind: Kind,
    ) -> Result<Self, WeightError> {
        Ok(Self::new(Weights::from_dir_preferring(
            dir, prefer, device, kind,
        )?))
    }

    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self {
            weights: self.weights.clone(),
            prefix,
        }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The view under the first of `prefixes` that holds `probe` (a name relative to the
    /// prefix; `""` is this view itself), for checkpoints written in several layouts (a CLIP
    /// tower under `text_model.` or at the root). Fails naming every place it looked.
    pub fn pp_first_containing(&self, prefixes: &[&str], probe: &str) -> Result<Self, WeightError> {
        let at = |prefix: &str| {
            if prefix.is_empty() {
                self.clone()
            } else {
                self.pp(prefix)
            }
        };
        prefixes
            .iter()
            .map(|p| at(p))
            .find(|vb| vb.contains(probe))
            .ok_or_else(|| WeightError::Missing {
                name: prefixes
                    .iter()
                    .map(|p| at(p).full(probe))
                    .collect::<Vec<_>>()
                    .join("` or `"),
                location: self.weights.location(),
            })
    }

    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor, WeightError> {
        self.weights.get(&self.full(name), shape)
    }

    pub fn get_kind(&self, name: &str, shape: &[i64], kind: Kind) -> Result<Tensor, WeightError> {
        self.weights.get_kind(&self.full(name), shape, kind)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.full(name))
    }

    pub fn device(&self) -> Device {
        self.weights.device()
    }

    pub fn kind(&self) -> Kind {
        self.weights.kind()
    }

    pub fn is_random(&self) -> bool {
        self.weights.is_random()
    }

    /// The whole store (for `read_keys` / `unused_keys` after loading a model).
    pub fn weights(&self) -> &Weights {
        &self.weights
    }
}
