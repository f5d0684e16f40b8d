//! Settings: the built-in `config/default.toml`, then an optional file, then `R2F__...`
//! environment variables.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct ModelSettings {
    /// A local diffusers-layout folder or a Hub model id.
    pub source: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Limits {
    pub max_prompt_chars: usize,
    pub max_steps: usize,
    pub max_pixels: i64,
    pub max_images_per_job: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    #[serde(default)]
    pub models: BTreeMap<String, ModelSettings>,
    pub limits: Limits,
}

impl Settings {
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(file) = file {
            if !file.exists() {
                anyhow::bail!("config file {} does not exist", file.display());
            }
            builder = builder.add_source(config::File::from(file));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("R2F")
                .prefix_separator("__")
                .separator("__"),
        );
        let settings: Settings = builder
            .build()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?
            .try_deserialize()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let l = &self.limits;
        if l.max_steps == 0
            || l.max_pixels < 256
            || l.max_images_per_job == 0
            || l.max_prompt_chars == 0
        {
            anyhow::bail!("invalid configuration: limits must be positive ({l:?})");
        }
        Ok(())
    }

    /// A model argument: a logical name from `[models]`, else taken as a folder or Hub id.
    pub fn model_source(&self, name: &str) -> String {
        self.models
            .get(name)
            .map(|m| m.source.clone())
            .unwrap_or_else(|| name.to_string())
    }
}
