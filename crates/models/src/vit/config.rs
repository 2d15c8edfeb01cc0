use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The shape of a Vision Transformer and how it reads pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// Square input images of this side, in pixels.
    pub image_size: usize,
    /// Square patches of this side; must divide `image_size`.
    pub patch_size: usize,
    /// Colour channels of the input (3 for RGB, 1 for grayscale).
    pub channels: usize,
    pub num_classes: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// "class" (the class token, as ViT and DeiT) or "mean" (of the patch tokens).
    pub pool: String,
    /// LayerNorm epsilon: 1e-12 in transformers' ViT, 1e-6 in timm's.
    pub ln_eps: f64,
    /// Per channel: pixels (0-255 scaled to 0-1) are normalized to (x - mean) / std.
    pub pixel_mean: Vec<f64>,
    pub pixel_std: Vec<f64>,
}

/// ImageNet's channel statistics, the usual normalization of RGB inputs (torchvision, timm, DeiT).
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// Named sizes: (name, image_size, patch_size, n_layer, n_head, n_embd).
/// The /16 family is the ViT and DeiT papers' (224x224 RGB, 1000 classes);
/// `vit-fashion` is a small one for 28x28 grayscale images (Fashion-MNIST).
pub const PRESETS: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("vit-ti16", 224, 16, 12, 3, 192),
    ("vit-s16", 224, 16, 12, 6, 384),
    ("vit-b16", 224, 16, 12, 12, 768),
    ("vit-l16", 224, 16, 24, 16, 1024),
    // About 0.2M parameters: 7x7 patches of 4x4 pixels, 50 tokens.
    ("vit-fashion", 28, 4, 4, 4, 64),
];

impl VitConfig {
    /// A preset: RGB, 1000 classes and ImageNet's normalization for the /16
    /// family; grayscale, 10 classes and Fashion-MNIST's statistics for `vit-fashion`.
    pub fn preset(name: &str) -> Option<Self> {
        let &(_, image_size, patch_size, n_layer, n_head, n_embd) = PRESETS.iter().find(|p| p.0 == name)?;
        let small = image_size < 64;
        Some(VitConfig {
            image_size,
            patch_size,
            channels: if small { 1 } else { 3 },
            num_classes: if small { 10 } else { 1000 },
            n_layer,
            n_head,
            n_embd,
            pool: "class".into(),
            ln_eps: 1e-6,
            // Fashion-MNIST's training set: mean 0.2860, std 0.3530.
            pixel_mean: if small { vec![0.2860] } else { IMAGENET_MEAN.to_vec() },
            pixel_std: if small { vec![0.3530] } else { IMAGENET_STD.to_vec() },
        })
    }

    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Tokens per image: the patches and the class token.
    pub fn seq_len(&self) -> usize {
        self.num_patches() + 1
    }

    /// Values in one flattened patch: channels x patch x patch.
    pub fn patch_dim(&self) -> usize {
        self.channels * self.patch_size * self.patch_size
    }

    pub fn pooling(&self) -> Result<trainer_core::ops::Pool> {
        match self.pool.as_str() {
            "class" => Ok(trainer_core::ops::Pool::Class),
            "mean" => Ok(trainer_core::ops::Pool::Mean),
            other => Err(Error::Config(format!("model.pool = \"{other}\" is not known; allowed: class, mean"))),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(Error::Config(m));
        for (k, v) in [
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("channels", self.channels),
            ("num_classes", self.num_classes),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
        ] {
            if v == 0 {
                return err(format!("model.{k} must be at least 1"));
            }
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return err(format!(
                "model.patch_size = {} must divide model.image_size = {}",
                self.patch_size, self.image_size
            ));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return err(format!("model.n_embd = {} must be divisible by model.n_head = {}", self.n_embd, self.n_head));
        }
        if self.channels > trainer_core::ops::MAX_CHANNELS {
            return err(format!(
                "model.channels = {}: images have 1 to {} channels (gray, RGB, RGBA)",
                self.channels,
                trainer_core::ops::MAX_CHANNELS
            ));
        }
        if self.num_classes > u32::MAX as usize {
            return err(format!("model.num_classes = {} exceeds the u32 label range", self.num_classes));
        }
        self.pooling()?;
        if !(self.ln_eps > 0.0 && self.ln_eps.is_finite()) {
            return err(format!("model.ln_eps = {} must be a positive number", self.ln_eps));
        }
        for (k, v) in [("pixel_mean", &self.pixel_mean), ("pixel_std", &self.pixel_std)] {
            if v.len() != self.channels {
                return err(format!(
                    "model.{k} has {} values but model.channels = {}: give one per channel",
                    v.len(),
                    self.channels
                ));
            }
        }
        if let Some(s) = self.pixel_std.iter().find(|s| !(**s > 0.0 && s.is_finite())) {
            return err(format!("model.pixel_std holds {s}: every value must be positive"));
        }
        Ok(())
    }

    /// Parameter count.
    pub fn num_params(&self) -> usize {
        let c = self.n_embd;
        let per_block = 2 * 2 * c + (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c);
        let embed = self.patch_dim() * c + c + c + self.seq_len() * c;
        embed + self.n_layer * per_block + 2 * c + self.num_classes * c + self.num_classes
    }

    /// Training FLOPs per image, counted exactly as the peer benchmark
    /// (../shared/bench/torch_vit_bench.py) counts them for MFU, so the two
    /// MFUs compare: 6 N T + 12 L C T^2, with N every parameter of two or more
    /// dimensions but the position table (the GEMM weights, and the class
    /// token) and T the tokens per image, class token included. (It counts the
    /// patch projection and the head at all T tokens; they run at N and 1.)
    pub fn flops_per_image(&self) -> f64 {
        let c = self.n_embd;
        let n = self.patch_dim() * c + c + self.n_layer * 12 * c * c + self.num_classes * c;
        let (t, l) = (self.seq_len() as f64, self.n_layer as f64);
        6.0 * n as f64 * t + 12.0 * l * c as f64 * t * t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_b16_has_the_known_parameter_count() {
        let c = VitConfig::preset("vit-b16").unwrap();
        c.validate().unwrap();
        // timm's vit_base_patch16_224: 86,567,656 parameters.
        assert_eq!(c.num_params(), 86_567_656);
        assert_eq!(c.seq_len(), 197);
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = VitConfig::preset("vit-fashion").unwrap();
        c.validate().unwrap();
        c.patch_size = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("model.patch_size = 5") && e.contains("model.image_size = 28"), "{e}");
        let mut c = VitConfig::preset("vit-fashion").unwrap();
        c.pixel_mean = vec![0.5, 0.5, 0.5];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("model.pixel_mean has 3 values") && e.contains("model.channels = 1"), "{e}");
        c.pixel_mean = vec![0.5];
        c.pool = "max".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("model.pool = \"max\"") && e.contains("class, mean"), "{e}");
    }
}
