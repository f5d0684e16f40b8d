//! Model code on libtorch: weights, tokenizers, text encoders, denoisers, VAE.

pub mod clip;
pub mod hub;
pub mod layers;
pub mod mmdit;
pub mod t5;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
