//! The Vision Transformer (ViT, DeiT): images cut into patches, a class
//! token, learned positions, pre-LN blocks with bidirectional attention and
//! an exact-GELU MLP, a linear head on the pooled token. `hf` converts to and
//! from transformers' ViTForImageClassification directories.

mod config;
pub mod hf;
mod model;
mod resize;

pub use config::{IMAGENET_MEAN, IMAGENET_STD, PRESETS, VitConfig};
pub use model::CONFIG_KEY;
pub use model::{Vit, VitActs};
pub use resize::resize_bicubic;

use crate::ModelDesc;

pub(crate) fn vit_desc(c: &VitConfig) -> ModelDesc {
    // VitConfig is numbers and short strings: serializing cannot fail.
    ModelDesc { kind: "vit".into(), config: serde_json::to_value(c).unwrap_or_default() }
}
