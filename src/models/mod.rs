//! Model code on libtorch: weights, tokenizers, text encoders, denoisers, VAE.

pub mod clip;
#[cfg(test)]
mod config_tests;
pub mod embeddings;
pub mod hub;
pub mod layers;
pub mod mmdit;
pub mod resnet;
pub mod t5;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

use std::path::Path;

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

/// A component's JSON file as a value (for configs read field by field).
pub fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(&read_text(path)?)
        .map_err(|e| anyhow::anyhow!("invalid JSON in {}: {e}", path.display()))
}

/// A component's JSON config deserialized; `what` names it in errors ("VAE", "T5", ...).
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> anyhow::Result<T> {
    serde_json::from_str(&read_text(path)?)
        .map_err(|e| anyhow::anyhow!("invalid {what} config {}: {e}", path.display()))
}

/// One value of a config field with a closed set of values (`hidden_act`, `qk_norm`, ...): the
/// variant `value` names, or an error naming the field and every value it accepts. Config enums
/// deserialize through this (`#[serde(try_from = "String")]`), so an unknown value fails when the
/// config is read, not when the model runs.
fn choice<T: Copy>(field: &str, value: &str, choices: &[(&str, T)]) -> Result<T, String> {
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            format!(
                "unsupported {field} \"{value}\" (expected {})",
                names.join(", ")
            )
        })
}
