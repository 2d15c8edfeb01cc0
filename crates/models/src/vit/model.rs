use std::collections::BTreeMap;
use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use trainer_core::ops::{self, Gelu, PatchShape, Pool};
use trainer_core::{DType, Device, Tensor};
use trainer_data::Batch;
use trainer_nn::{
    Block, BlockKind, LayerNorm, LayerNormStats, Linear, Module, Param, ParamId, Recompute, StackActs, init,
    number_params,
};

use super::{VitConfig, hf};
use crate::model::{Acts, BatchEval, GradsReady, Hits, InputSpec, Model, ModelDesc};
use crate::{Error, Result};

/// The metadata key of the config in a weights file.
pub const CONFIG_KEY: &str = "vit_config";

/// A Vision Transformer (ViT, DeiT): the image cut into patches, each
/// projected to a token; a class token and learned positions added; pre-LN
/// blocks with bidirectional attention and an exact-GELU MLP; the final
/// LayerNorm and a linear head on the pooled token (the class token, or the
/// mean of the patch tokens).
///
/// Parameter names: `patch_embed.{weight,bias}` ((C, channels*P*P): the
/// stride-P convolution's kernel flattened in (channel, row, column) order),
/// `cls_token` (C), `pos_embed` (1+N, C), `blocks.{i}.*` (as GPT's blocks),
/// `ln_f.*`, `head.{weight,bias}` (classes, C).
#[derive(Debug)]
pub struct Vit {
    pub config: VitConfig,
    pub patch_embed: Linear,
    pub cls_token: Param,
    pub pos_embed: Param,
    pub blocks: Vec<Block>,
    pub ln_f: LayerNorm,
    pub head: Linear,
    pool: Pool,
    /// Which blocks recompute their forward in the backward (set before making activations).
    pub recompute: Recompute,
    /// Per channel (scale, shift): pixel * scale - shift = (pixel / 255 - mean) / std.
    pixel_norm: Vec<(f32, f32)>,
    dtype: DType,
    device: Device,
}

/// Activations of micro-batches of B images, allocated once and reused.
/// T = 1 + N tokens, C = n_embd, D = channels * P * P.
#[derive(Debug)]
pub struct VitActs {
    pub b: usize,
    /// The batch's uint8 pixels packed four to a u32, staged on the host, and
    /// on the model's device (a quarter of the bytes of floats to upload).
    host_packed: Vec<u32>,
    pub packed: Tensor,
    /// (B, N, D) normalized pixels, patch by patch: the patch projection's input.
    pub pixels: Tensor,
    /// (B) labels; (B) per-image losses.
    pub targets: Tensor,
    pub losses: Tensor,
    host_labels: Vec<u32>,
    /// (B, N, C) projected patches; (B, T, C) the first block's input.
    pub patches: Tensor,
    pub tokens: Tensor,
    /// The blocks' activations (and their shared scratch).
    pub stack: StackActs,
    /// (B, C): pooled, then normalized by the final LayerNorm.
    pub pooled: Tensor,
    pub lnf: Tensor,
    pub lnf_stats: LayerNormStats,
    /// (B, classes). After a backward this holds dL/dlogits instead.
    pub logits: Tensor,
    /// Gradients: (B, C) into the final LayerNorm's output and input; (B, T, C)
    /// the residual stream's; (B, N, C) into the patch projection's output.
    pub dlnf: Tensor,
    pub dpooled: Tensor,
    pub dresid: Tensor,
    pub dpatches: Tensor,
}

impl VitActs {
    pub fn mean_loss(&self) -> Result<f64> {
        Ok(ops::sum(&self.losses)? / self.losses.numel() as f64)
    }
}

impl Vit {
    /// A model with every parameter zero; call [`Vit::init`] or load weights.
    pub fn new(config: VitConfig, dtype: DType, device: &Device) -> Result<Self> {
        config.validate()?;
        let c = config.n_embd;
        let kind = BlockKind { causal: false, gelu: Gelu::Erf, ln_eps: config.ln_eps };
        let blocks = (0..config.n_layer)
            .map(|i| Block::new(&format!("blocks.{i}"), c, config.n_head, kind, dtype, device))
            .collect::<trainer_core::Result<_>>()?;
        let mut ln_f = LayerNorm::new("ln_f", c, dtype, device)?;
        ln_f.eps = config.ln_eps;
        let mut pos_embed = Param::zeros("pos_embed", &[config.seq_len(), c], dtype, device)?;
        // timm and DeiT exempt the position table (and the class token) from weight decay.
        pos_embed.decay = false;
        let mut vit = Vit {
            patch_embed: Linear::new("patch_embed", config.patch_dim(), c, true, dtype, device)?,
            cls_token: Param::zeros("cls_token", &[c], dtype, device)?,
            pos_embed,
            blocks,
            ln_f,
            head: Linear::new("head", c, config.num_classes, true, dtype, device)?,
            pool: config.pooling()?,
            recompute: Recompute::None,
            pixel_norm: config
                .pixel_mean
                .iter()
                .zip(&config.pixel_std)
                .map(|(m, sd)| ((1.0 / (255.0 * sd)) as f32, (m / sd) as f32))
                .collect(),
            config,
            dtype,
            device: device.clone(),
        };
        number_params(vit.params_mut());
        Ok(vit)
    }

    /// timm's and DeiT's initialization: every weight matrix and the position
    /// table truncated normal (std 0.02, cut at +-2 as timm's), the class token
    /// N(0, 1e-6), biases 0, LayerNorm gains 1, and the head zero (so the
    /// first loss is exactly ln(classes)). Deterministic in `seed`.
    pub fn init(&mut self, seed: u64) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for p in self.params_mut() {
            let name = p.name.clone();
            if name.starts_with("head.") {
                init::constant(p, 0.0)?;
            } else if name == "cls_token" {
                init::normal(p, 1e-6, None, &mut rng)?;
            } else if p.value.rank() == 2 {
                init::truncated_normal(p, 0.02, 2.0, &mut rng)?;
            } else if name.contains("ln_") && name.ends_with(".weight") {
                init::constant(p, 1.0)?;
            } else {
                init::constant(p, 0.0)?;
            }
        }
        Ok(())
    }

    pub fn new_acts(&self, b: usize) -> Result<VitActs> {
        let cfg = &self.config;
        let (n, t, c, d, k) = (cfg.num_patches(), cfg.seq_len(), cfg.n_embd, cfg.patch_dim(), cfg.num_classes);
        let (dt, dev) = (self.dtype, &self.device);
        let words = ops::packed_pixel_words(b * cfg.image_size * cfg.image_size * cfg.channels);
        Ok(VitActs {
            b,
            host_packed: vec![0; words],
            packed: Tensor::zeros([words], DType::U32, dev)?,
            pixels: Tensor::zeros([b, n, d], dt, dev)?,
            targets: Tensor::zeros([b], DType::U32, dev)?,
            losses: Tensor::zeros([b], dt.stats_dtype(), dev)?,
            host_labels: vec![0; b],
            patches: Tensor::zeros([b, n, c], dt, dev)?,
            tokens: Tensor::zeros([b, t, c], dt, dev)?,
            stack: StackActs::new(&self.blocks, (b, t), self.recompute, dt, dev)?,
            pooled: Tensor::zeros([b, c], dt, dev)?,
            lnf: Tensor::zeros([b, c], dt, dev)?,
            lnf_stats: LayerNormStats::new(b, dt, dev)?,
            logits: Tensor::zeros([b, k], dt, dev)?,
            dlnf: Tensor::zeros([b, c], dt, dev)?,
            dpooled: Tensor::zeros([b, c], dt, dev)?,
            dresid: Tensor::zeros([b, t, c], dt, dev)?,
            dpatches: Tensor::zeros([b, n, c], dt, dev)?,
        })
    }

    /// Checks a batch against the model and uploads its pixels (patchified and
    /// normalized) and labels.
    fn upload(&self, acts: &mut VitActs, batch: &Batch) -> Result<()> {
        let cfg = &self.config;
        let Batch::Images { b, height, width, channels, pixels, labels } = batch else {
            return Err(Error::Config(format!(
                "a vit model reads images, but the data gives {} (is data.train an image shard pattern?)",
                batch.kind()
            )));
        };
        if (*height, *width, *channels) != (cfg.image_size, cfg.image_size, cfg.channels) || *b != acts.b {
            return Err(Error::Config(format!(
                "the batch holds {b} images of {height}x{width}x{channels}, but the model takes {} of {s}x{s}x{}",
                acts.b,
                cfg.channels,
                s = cfg.image_size
            )));
        }
        if let Some(&l) = labels.iter().find(|&&l| l as usize >= cfg.num_classes) {
            return Err(Error::Config(format!("label {l} is not below model.num_classes = {}", cfg.num_classes)));
        }
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut acts.host_packed);
        bytes[..pixels.len()].copy_from_slice(pixels);
        acts.packed.copy_from_slice(&acts.host_packed)?;
        let shape = PatchShape { b: *b, size: cfg.image_size, patch: cfg.patch_size, channels: cfg.channels };
        ops::patchify(&mut acts.pixels, &acts.packed, shape, &self.pixel_norm)?;
        acts.host_labels.copy_from_slice(labels);
        acts.targets.copy_from_slice(labels)?;
        Ok(())
    }

    /// Pixels -> logits (B, classes), and the per-image losses.
    fn forward(&self, acts: &mut VitActs, grad_scale: Option<f64>) -> Result<()> {
        self.patch_embed.forward(&mut acts.patches, &acts.pixels)?;
        ops::image_tokens_forward(&mut acts.tokens, &acts.patches, &self.cls_token.value, &self.pos_embed.value)?;
        acts.stack.forward(&self.blocks, &acts.tokens)?;
        let last = acts.stack.output(&acts.tokens);
        // LayerNorm is per token, so normalizing the pooled token equals pooling
        // the normalized sequence for the class token (transformers' order), and
        // is timm's order (pool, then fc_norm) for the mean.
        ops::pool_tokens(&mut acts.pooled, last, self.pool)?;
        self.ln_f.forward(&mut acts.lnf, &mut acts.lnf_stats, &acts.pooled)?;
        self.head.forward(&mut acts.logits, &acts.lnf)?;
        ops::softmax_cross_entropy(
            &mut acts.logits,
            &mut acts.losses,
            &acts.targets,
            self.config.num_classes,
            grad_scale,
        )?;
        Ok(())
    }

    /// Backward from dL/dlogits (in acts.logits), telling `ready` which
    /// parameters are done: the head and final LayerNorm, the blocks from the
    /// last to the first, then the embeddings.
    fn backward(&mut self, acts: &mut VitActs, ready: &mut GradsReady<'_>) -> Result<()> {
        let ids = |params: Vec<&Param>| -> Vec<ParamId> { params.iter().map(|p| p.id).collect() };
        let mut tell = |model: &Vit, done: Vec<ParamId>| ready(&model.params(), &done).map_err(Error::Ready);
        let VitActs { tokens, stack, pooled, lnf, lnf_stats, logits, dlnf, dpooled, dresid, dpatches, .. } = acts;
        self.head.backward(dlnf, logits, lnf)?;
        // LayerNorm's backward accumulates into its input gradient.
        ops::zero(dpooled)?;
        self.ln_f.backward(dpooled, dlnf, pooled, lnf_stats)?;
        let mut done = ids(self.head.params());
        done.extend(ids(self.ln_f.params()));
        tell(self, done)?;
        ops::pool_tokens_backward(dresid, dpooled, self.pool)?;
        for i in (0..self.blocks.len()).rev() {
            stack.backward_block(i, &mut self.blocks[i], tokens, dresid)?;
            tell(self, ids(self.blocks[i].params()))?;
        }
        const OP: &str = "image tokens backward";
        let (dcls, dpos) = (self.cls_token.grad_mut(OP)?, self.pos_embed.grad_mut(OP)?);
        ops::image_tokens_backward(dpatches, dcls, dpos, dresid)?;
        self.patch_embed.backward_params(dpatches, &acts.pixels)?;
        let mut done = vec![self.cls_token.id, self.pos_embed.id];
        done.extend(ids(self.patch_embed.params()));
        tell(self, done)
    }

    /// Top-1 and top-5 hits of the logits of the last forward (intact: no gradient was taken).
    fn hits(&self, acts: &VitActs) -> Result<Hits> {
        let logits = acts.logits.to_vec_f64()?;
        let k = self.config.num_classes;
        let mut hits = Hits::default();
        for (row, &label) in logits.chunks(k).zip(&acts.host_labels) {
            let target = row[label as usize];
            // Rank of the label: classes scoring higher, ties going to the lower index (as argmax).
            let above =
                row.iter().enumerate().filter(|&(j, &v)| v > target || (v == target && j < label as usize)).count();
            hits.top1 += usize::from(above == 0);
            hits.top5 += usize::from(above < 5);
        }
        Ok(hits)
    }

    /// Every parameter (host copies) and the config (metadata) to a safetensors file, atomically.
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        crate::weights::save(&self.params(), path, CONFIG_KEY, &self.config)
    }

    /// Starts from a Hugging Face ViTForImageClassification directory, which
    /// must describe this model's architecture. Fine-tuning on a new data set
    /// or resolution is allowed: with another number of classes every weight
    /// but the head is loaded and the head starts as a fresh model's does
    /// (zero); at another image size (the same patch size) the position
    /// table's grid is resized bicubically, as transformers'
    /// `interpolate_pos_encoding` and timm do.
    pub fn load_hf(&mut self, dir: &Path) -> Result<()> {
        let mut imported = hf::import(dir)?;
        let (theirs, ours) = (&imported.config, &self.config);
        let arch = |c: &VitConfig| (c.patch_size, c.channels, c.n_layer, c.n_head, c.n_embd);
        if arch(theirs) != arch(ours) {
            return Err(Error::File {
                path: dir.join(crate::hf_dir::CONFIG_FILE).display().to_string(),
                msg: format!("describes {theirs:?}, but the model is {ours:?}"),
            });
        }
        if theirs.image_size != ours.image_size {
            let resized = resize_positions(&imported.tensors["pos_embed"], theirs, ours)?;
            imported.tensors.insert("pos_embed".into(), resized);
        }
        let source = dir.join(crate::hf_dir::WEIGHTS_FILE);
        if theirs.num_classes == ours.num_classes {
            return self.load_named(imported.tensors, &source);
        }
        imported.tensors.retain(|name, _| !name.starts_with("head."));
        let (dtype, device) = (self.dtype, self.device.clone());
        let body: Vec<&mut Param> = self.params_mut().into_iter().filter(|p| !p.name.starts_with("head.")).collect();
        crate::load_named(body, imported.tensors, &source, dtype, &device)?;
        for p in self.head.params_mut() {
            init::constant(p, 0.0)?;
        }
        Ok(())
    }

    /// A model from a Hugging Face directory as it is (its own class count and normalization).
    pub fn from_hf(dir: &Path, dtype: DType, device: &Device) -> Result<Vit> {
        let imported = hf::import(dir)?;
        let mut model = Vit::new(imported.config, dtype, device)?;
        model.load_named(imported.tensors, &dir.join(crate::hf_dir::WEIGHTS_FILE))?;
        Ok(model)
    }

    /// Loads every parameter by name; see [`crate::load_named`].
    pub fn load_named(&mut self, tensors: BTreeMap<String, Tensor>, source: &Path) -> Result<()> {
        let dtype = self.dtype;
        let device = self.device.clone();
        crate::load_named(self.params_mut(), tensors, source, dtype, &device)
    }
}

/// The position table `pos` (1 + grid^2, C) of a model of `from`'s image
/// size for one of `to`'s: the class token's row kept, the grid resized.
fn resize_positions(pos: &Tensor, from: &VitConfig, to: &VitConfig) -> Result<Tensor> {
    let c = from.n_embd;
    let v = pos.to_vec_f64()?;
    let (g0, g1) = (from.image_size / from.patch_size, to.image_size / to.patch_size);
    let mut out = v[..c].to_vec();
    out.extend(super::resize_bicubic(&v[c..], (g0, g0, c), (g1, g1)));
    Ok(Tensor::from_vec(out, [1 + g1 * g1, c], &Device::Cpu)?)
}

fn vit_acts(acts: &mut Acts) -> Result<&mut VitActs> {
    acts.get_mut::<VitActs>("vit")
}

impl Model for Vit {
    fn desc(&self) -> ModelDesc {
        super::vit_desc(&self.config)
    }

    fn summary(&self) -> String {
        let c = &self.config;
        format!(
            "image={s}x{s}x{} patch={} n_layer={} n_head={} n_embd={} classes={} pool={}",
            c.channels,
            c.patch_size,
            c.n_layer,
            c.n_head,
            c.n_embd,
            c.num_classes,
            c.pool,
            s = c.image_size
        )
    }

    fn input(&self) -> InputSpec {
        let c = &self.config;
        InputSpec::Images { size: c.image_size, channels: c.channels, classes: c.num_classes }
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn init(&mut self, seed: u64) -> Result<()> {
        Vit::init(self, seed)
    }

    fn load_pretrained(&mut self, dir: &Path) -> Result<()> {
        self.load_hf(dir)
    }

    fn set_recompute(&mut self, recompute: Recompute) -> Result<()> {
        self.recompute = recompute;
        Ok(())
    }

    fn new_acts(&self, batch: &Batch) -> Result<Acts> {
        match batch {
            Batch::Images { b, .. } => Ok(Acts::new(Vit::new_acts(self, *b)?)),
            other => Err(Error::Config(format!(
                "a vit model reads images, but the data gives {} (is data.train an image shard pattern?)",
                other.kind()
            ))),
        }
    }

    fn forward_backward(
        &mut self,
        acts: &mut Acts,
        batch: &Batch,
        loss_scale: f64,
        ready: &mut GradsReady<'_>,
    ) -> Result<f64> {
        let acts = vit_acts(acts)?;
        self.upload(acts, batch)?;
        self.forward(acts, Some(loss_scale / acts.b as f64))?;
        self.backward(acts, ready)?;
        acts.mean_loss()
    }

    fn evaluate(&self, acts: &mut Acts, batch: &Batch) -> Result<BatchEval> {
        let acts = vit_acts(acts)?;
        self.upload(acts, batch)?;
        self.forward(acts, None)?;
        Ok(BatchEval { loss: acts.mean_loss()?, hits: Some(self.hits(acts)?) })
    }

    fn flops_per_sample(&self, _batch: &Batch) -> f64 {
        self.config.flops_per_image()
    }

    fn units_per_sample(&self, _batch: &Batch) -> usize {
        1
    }

    fn save_weights(&self, path: &Path) -> Result<()> {
        Vit::save_weights(self, path)
    }
}

impl Module for Vit {
    fn params(&self) -> Vec<&Param> {
        let mut p = self.patch_embed.params();
        p.extend([&self.cls_token, &self.pos_embed]);
        for b in &self.blocks {
            p.extend(b.params());
        }
        p.extend(self.ln_f.params());
        p.extend(self.head.params());
        p
    }

    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut p = self.patch_embed.params_mut();
        p.extend([&mut self.cls_token, &mut self.pos_embed]);
        for b in &mut self.blocks {
            p.extend(b.params_mut());
        }
        p.extend(self.ln_f.params_mut());
        p.extend(self.head.params_mut());
        p
    }
}
