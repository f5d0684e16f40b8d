//! What a RareBench run is made of: the eight categories, the configurations compared, the key
//! of one image (configuration, category, prompt, seed) and the boundary a generation runner
//! plugs into ([`ImageSource`]).

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::generate::JobMode;
use crate::image::ImageFormat;
use crate::job::JobParams;

crate::named_enum! {
    /// A RareBench category, as its files name it (`rarebench_<name>.txt`).
    pub enum Category("RareBench category") {
        Single1Property = "single_1property",
        Single2Shape = "single_2shape",
        Single3Texture = "single_3texture",
        Single4Action = "single_4action",
        Single5Complex = "single_5complex",
        Multi1And = "multi_1and",
        Multi2Relation = "multi_2relation",
        Multi3Complex = "multi_3complex",
    }
}

impl Category {
    /// The dataset name of the official files and score keys: `rarebench_<name>`.
    pub fn dataset(self) -> String {
        format!("rarebench_{}", self.name())
    }

    /// A category of prompts with several rare objects (the ones R2F+ plans exist for).
    pub fn is_multi(self) -> bool {
        self.name().starts_with("multi_")
    }
}

/// Where an R2F or R2F+ configuration gets its plans.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanSource {
    /// The official precomputed plans of the benchmark folder (`*_gpt4.txt`, `*_gpt4o.txt`);
    /// a prompt without one is skipped for this configuration (and counted).
    #[default]
    Precomputed,
    /// The configured LLM planner (through its cache), as any job without a plan.
    Llm,
}

/// One configuration of a run: what generates the images a column of the report shows.
///
/// `params` are the job parameters every image of the configuration is generated with (steps,
/// guidance, size, scheduler, the R2F+ knobs, ...); their `seed` and `num_images` are ignored:
/// each image is one job with one of `seeds`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The configuration's name: a column of the reports, a folder of the images and the first
    /// part of its score keys (`<name>/rarebench_<category>_t2i_scores_by_<judge>`).
    pub name: String,
    /// The model, as jobs name it (`sd3`, `sdxl`, a configured logical name).
    pub model: String,
    pub mode: JobMode,
    /// One image per prompt and seed (the official runs: one image per prompt).
    pub seeds: Vec<u64>,
    #[serde(default)]
    pub params: JobParams,
    /// The precision the images are made in (`fp16`, `bf16`, `fp32`), a label of the fleet
    /// that serves the model; the runner routes by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    #[serde(default)]
    pub plans: PlanSource,
}

/// A configuration name may be at most this long.
pub const MAX_CONFIG_NAME: usize = 64;

impl Config {
    /// Checks what the run relies on: a name usable as a folder and a key (ASCII letters,
    /// digits, `.`, `_`, `-`; not `.` or `..`; at most [`MAX_CONFIG_NAME`]), a model, and at
    /// least one seed, without repeats.
    pub fn validate(&self) -> Result<(), String> {
        check_config_name(&self.name)?;
        if self.model.trim().is_empty() {
            return Err(format!("configuration `{}`: model is empty", self.name));
        }
        if self.seeds.is_empty() {
            return Err(format!("configuration `{}`: no seeds", self.name));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(s) = self.seeds.iter().find(|s| !seen.insert(**s)) {
            return Err(format!(
                "configuration `{}`: seed {s} is listed twice",
                self.name
            ));
        }
        Ok(())
    }
}

/// The rule of [`Config::validate`] on names.
pub fn check_config_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > MAX_CONFIG_NAME {
        return Err(format!(
            "configuration name `{}` must have 1 to {MAX_CONFIG_NAME} characters",
            name.chars().take(80).collect::<String>()
        ));
    }
    if name == "." || name == ".." || !name.chars().all(ok_char) {
        return Err(format!(
            "configuration name `{name}` may hold only ASCII letters, digits, `.`, `_` and `-` (and is not `.` or `..`)"
        ));
    }
    Ok(())
}

/// One image of a run: a configuration's image of prompt `index` (0-based line of the category's
/// prompt file) with `seed`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SampleKey {
    pub config: String,
    pub category: Category,
    pub index: usize,
    pub seed: u64,
}

impl SampleKey {
    /// Where the image lies, relative to the run folder: `images/<config>/<category>/<index>_s<seed>.<ext>`
    /// (`index` in three digits, the extension the format's). Names are made of the key alone: prompts hold characters no
    /// file name should (the official runs name files `<index>_<prompt>.png`).
    pub fn image_path(&self, format: ImageFormat) -> String {
        format!(
            "images/{}/{}/{:03}_s{}.{}",
            self.config,
            self.category.name(),
            self.index,
            self.seed,
            format.extension()
        )
    }
}

impl std::fmt::Display for SampleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} #{} seed {}",
            self.config,
            self.category.name(),
            self.index,
            self.seed
        )
    }
}

/// What one image is made from: the configuration, the prompt as the judge reads it, and the
/// plan the configuration's mode takes (None for plain runs and for plans the LLM makes).
#[derive(Debug, Clone)]
pub struct ImageRequest<'a> {
    pub key: &'a SampleKey,
    pub config: &'a Config,
    pub prompt: &'a str,
    pub plan: Option<&'a crate::plan::Plan>,
}

/// An encoded image (PNG, JPEG or WebP).
#[derive(Debug, Clone)]
pub struct Image {
    pub bytes: Vec<u8>,
    pub format: ImageFormat,
}

/// The format of encoded image bytes, from their magic numbers.
pub fn sniff_format(bytes: &[u8]) -> Option<ImageFormat> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(ImageFormat::Png)
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some(ImageFormat::Jpeg)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(ImageFormat::Webp)
    } else {
        None
    }
}

pub type ImageFuture<'a> = Pin<Box<dyn Future<Output = Result<Image, String>> + Send + 'a>>;

/// The generation boundary of a run: one image for a configuration, prompt and seed (the
/// runner: a job through the broker and the fleet, or `r2f generate`'s in-process path).
pub trait ImageSource: Send + Sync {
    fn generate<'a>(&'a self, request: ImageRequest<'a>) -> ImageFuture<'a>;
}
