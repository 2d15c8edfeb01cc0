use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use trainer_core::ops::TokenIndex;
use trainer_core::{DType, Device, Tensor, io, ops};
use trainer_data::Batch;
use trainer_nn::{
    Block, BlockKind, LayerNorm, LayerNormStats, Module, Param, ParamId, Recompute, StackActs, init, number_params,
};

use super::{GptConfig, hf};
use crate::model::{Acts, BatchEval, GradsReady, InputSpec, Model, ModelDesc, ignore_ready};
use crate::section::gpt_desc;
use crate::{Error, Result};

/// GPT-2. Parameter names follow nanoGPT (`transformer.h.0.attn.c_attn.weight`),
/// with nn.Linear's (out, in) weight layout.
#[derive(Debug)]
pub struct Gpt {
    pub config: GptConfig,
    /// (Vp, C): token embedding, also the LM head (tied).
    pub wte: Param,
    /// (block_size, C)
    pub wpe: Param,
    pub blocks: Vec<Block>,
    pub ln_f: LayerNorm,
    /// Which blocks recompute their forward in the backward (set before making activations).
    pub recompute: Recompute,
    dtype: DType,
    device: Device,
}

/// Activations of one micro-batch of shape (B, T), allocated once and reused.
#[derive(Debug)]
pub struct GptActs {
    pub b: usize,
    pub t: usize,
    /// (B, T) token ids, and (B*T) next-token targets.
    pub tokens: Tensor,
    pub targets: Tensor,
    /// (B, T, C): token + position embedding, the first block's input.
    pub encoded: Tensor,
    /// The blocks' activations (and their shared scratch).
    pub stack: StackActs,
    /// (B, T, C) and its stats: the final LayerNorm.
    pub lnf: Tensor,
    pub lnf_stats: LayerNormStats,
    /// (B*T, Vp). After a backward this holds dL/dlogits instead.
    pub logits: Tensor,
    /// (B*T) per-position losses (f32 beside bf16 activations).
    pub losses: Tensor,
    /// Positions of each distinct token, for the deterministic embedding backward.
    pub token_index: TokenIndex,
    /// (B, T, C): the residual stream's gradient, flowing down through the blocks.
    pub dresid: Tensor,
    /// (B, T, C): gradient into the final LayerNorm's output.
    pub dlnf: Tensor,
}

impl GptActs {
    /// Mean of the per-position losses of the last forward with targets.
    pub fn mean_loss(&self) -> Result<f64> {
        Ok(ops::sum(&self.losses)? / self.losses.numel() as f64)
    }
}

impl Gpt {
    /// A model with every parameter zero; call [`Gpt::init`] or load weights.
    pub fn new(config: GptConfig, dtype: DType, device: &Device) -> Result<Self> {
        config.validate()?;
        let (c, vp) = (config.n_embd, config.padded_vocab_size());
        let blocks = (0..config.n_layer)
            .map(|i| Block::new(&format!("transformer.h.{i}"), c, config.n_head, BlockKind::GPT2, dtype, device))
            .collect::<trainer_core::Result<_>>()?;
        let mut gpt = Gpt {
            wte: Param::zeros("transformer.wte.weight", &[vp, c], dtype, device)?,
            wpe: Param::zeros("transformer.wpe.weight", &[config.block_size, c], dtype, device)?,
            blocks,
            ln_f: LayerNorm::new("transformer.ln_f", c, dtype, device)?,
            recompute: Recompute::None,
            config,
            dtype,
            device: device.clone(),
        };
        number_params(gpt.params_mut());
        Ok(gpt)
    }

    /// GPT-2 initialization: weights N(0, 0.02); the residual output projections
    /// (attn.c_proj, mlp.c_proj) N(0, 0.02 / sqrt(2 n_layer)) so the residual
    /// stream's variance does not grow with depth; biases 0; LayerNorm gains 1.
    /// Padded embedding rows stay 0. Deterministic in `seed`, drawn in parameter order.
    pub fn init(&mut self, seed: u64) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let std = 0.02;
        let proj_std = std / (2.0 * self.config.n_layer as f64).sqrt();
        let vocab = self.config.vocab_size;
        for p in self.params_mut() {
            let name = p.name.clone();
            if name == "transformer.wte.weight" {
                init::normal(p, std, Some(vocab), &mut rng)?;
            } else if name.ends_with("c_proj.weight") {
                init::normal(p, proj_std, None, &mut rng)?;
            } else if p.value.rank() == 2 {
                init::normal(p, std, None, &mut rng)?;
            } else if name.contains(".ln_") && name.ends_with(".weight") {
                init::constant(p, 1.0)?;
            } else {
                init::constant(p, 0.0)?;
            }
        }
        Ok(())
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Activation buffers for micro-batches of (b, t).
    pub fn new_acts(&self, b: usize, t: usize) -> Result<GptActs> {
        if t == 0 || t > self.config.block_size {
            return Err(Error::Config(format!(
                "sequence length {t} must be between 1 and model.block_size = {}",
                self.config.block_size
            )));
        }
        let (c, vp, dt, dev) = (self.config.n_embd, self.config.padded_vocab_size(), self.dtype, &self.device);
        Ok(GptActs {
            b,
            t,
            tokens: Tensor::zeros([b, t], DType::U32, dev)?,
            targets: Tensor::zeros([b * t], DType::U32, dev)?,
            encoded: Tensor::zeros([b, t, c], dt, dev)?,
            stack: StackActs::new(&self.blocks, (b, t), self.recompute, dt, dev)?,
            lnf: Tensor::zeros([b, t, c], dt, dev)?,
            lnf_stats: LayerNormStats::new(b * t, dt, dev)?,
            logits: Tensor::zeros([b * t, vp], dt, dev)?,
            losses: Tensor::zeros([b * t], dt.stats_dtype(), dev)?,
            token_index: TokenIndex::new(b * t, dev)?,
            dresid: Tensor::zeros([b, t, c], dt, dev)?,
            dlnf: Tensor::zeros([b, t, c], dt, dev)?,
        })
    }

    /// Forward pass: tokens (B*T ids) -> acts.logits. With targets, also the
    /// per-position losses (acts.losses) and their mean, returned.
    pub fn forward(&self, acts: &mut GptActs, tokens: &[u32], targets: Option<&[u32]>) -> Result<Option<f64>> {
        self.forward_to_logits(acts, tokens)?;
        match targets {
            None => Ok(None),
            Some(targets) => {
                acts.targets.copy_from_slice(targets)?;
                // Without a gradient scale the logits are left intact.
                ops::softmax_cross_entropy(
                    &mut acts.logits,
                    &mut acts.losses,
                    &acts.targets,
                    self.config.vocab_size,
                    None,
                )?;
                Ok(Some(acts.mean_loss()?))
            }
        }
    }

    /// Forward and backward of one micro-batch. The loss is the mean over its B*T
    /// positions, multiplied by `loss_scale` (1 / grad_accum_steps under gradient
    /// accumulation). Parameter gradients accumulate; acts.losses holds the
    /// unscaled per-position losses.
    pub fn forward_backward(
        &mut self,
        acts: &mut GptActs,
        tokens: &[u32],
        targets: &[u32],
        loss_scale: f64,
    ) -> Result<()> {
        self.forward_backward_with(acts, tokens, targets, loss_scale, &mut ignore_ready)
    }

    /// [`Gpt::forward_backward`], telling `ready` the ids of the parameters
    /// whose gradients are final for this micro-batch as soon as they are, in
    /// the order the backward pass finishes them: the final LayerNorm, the
    /// blocks from the last to the first, then the embeddings (the tied `wte`
    /// last of all). Work that needs finished gradients (sending them
    /// somewhere) can start while the rest of the backward pass runs.
    pub fn forward_backward_with(
        &mut self,
        acts: &mut GptActs,
        tokens: &[u32],
        targets: &[u32],
        loss_scale: f64,
        ready: &mut GradsReady<'_>,
    ) -> Result<()> {
        self.forward_to_logits(acts, tokens)?;
        acts.targets.copy_from_slice(targets)?;
        acts.token_index.update(tokens)?;
        let grad_scale = loss_scale / (acts.b * acts.t) as f64;
        // Fused: losses out, and logits overwritten by dL/dlogits.
        ops::softmax_cross_entropy(
            &mut acts.logits,
            &mut acts.losses,
            &acts.targets,
            self.config.vocab_size,
            Some(grad_scale),
        )?;
        self.backward(acts, ready)
    }

    fn forward_to_logits(&self, acts: &mut GptActs, tokens: &[u32]) -> Result<()> {
        acts.tokens.copy_from_slice(tokens)?;
        ops::embedding_forward(&mut acts.encoded, &acts.tokens, &self.wte.value, &self.wpe.value)?;
        acts.stack.forward(&self.blocks, &acts.encoded)?;
        let last = acts.stack.output(&acts.encoded);
        self.ln_f.forward(&mut acts.lnf, &mut acts.lnf_stats, last)?;
        // LM head, tied: logits (B*T, Vp) = lnf (B*T, C) @ wte^T.
        ops::linear_forward(&mut acts.logits, &acts.lnf, &self.wte.value, None)?;
        Ok(())
    }

    /// Backward from dL/dlogits (in acts.logits) down to the embeddings,
    /// telling `ready` which parameters are done (see [`Gpt::forward_backward_with`]).
    fn backward(&mut self, acts: &mut GptActs, ready: &mut GradsReady<'_>) -> Result<()> {
        let ids = |params: Vec<&Param>| -> Vec<ParamId> { params.iter().map(|p| p.id).collect() };
        let mut tell = |model: &Gpt, done: Vec<ParamId>| ready(&model.params(), &done).map_err(Error::Ready);
        let GptActs { tokens, encoded, stack, lnf, lnf_stats, logits, dresid, dlnf, token_index, .. } = acts;
        // LM head: dlnf = dlogits @ wte; dwte += dlogits^T @ lnf.
        let (wte, dwte) = self.wte.value_and_grad("LM head backward")?;
        ops::linear_backward(dlnf, dwte, None, logits, lnf, wte)?;
        // The residual stream's gradient starts at zero and collects every branch.
        ops::zero(dresid)?;
        self.ln_f.backward(dresid, dlnf, stack.output(encoded), lnf_stats)?;
        tell(self, ids(self.ln_f.params()))?;
        for i in (0..self.blocks.len()).rev() {
            stack.backward_block(i, &mut self.blocks[i], encoded, dresid)?;
            tell(self, ids(self.blocks[i].params()))?;
        }
        const OP: &str = "embedding backward";
        let (dwte, dwpe) = (self.wte.grad_mut(OP)?, self.wpe.grad_mut(OP)?);
        ops::embedding_backward(dwte, dwpe, dresid, tokens, token_index)?;
        tell(self, vec![self.wte.id, self.wpe.id])
    }

    /// Writes every parameter (host copies) and the config (as metadata) to a
    /// safetensors file, atomically.
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        crate::weights::save(&self.params(), path, CONFIG_KEY, &self.config)
    }

    /// The config stored in a weights file by [`Gpt::save_weights`].
    pub fn config_from_weights(path: &Path) -> Result<GptConfig> {
        let loaded = io::load(path)?;
        config_from_metadata(&loaded.metadata, path)
    }

    /// Loads every parameter by name from a weights file written by
    /// [`Gpt::save_weights`]; see [`Gpt::load_named`].
    pub fn load_weights(&mut self, path: &Path) -> Result<()> {
        self.load_named(io::load(path)?.tensors, path)
    }

    /// Loads every parameter by name; see [`crate::load_named`].
    pub fn load_named(&mut self, tensors: BTreeMap<String, Tensor>, source: &Path) -> Result<()> {
        let (dtype, device) = (self.dtype, self.device.clone());
        crate::load_named(self.params_mut(), tensors, source, dtype, &device)
    }

    /// Loads the weights of a Hugging Face GPT-2 directory (see [`hf`]), whose
    /// config.json must describe this model's shape.
    pub fn load_hf(&mut self, dir: &Path) -> Result<()> {
        let imported = hf::import(dir)?;
        if imported.config != self.config {
            return Err(Error::File {
                path: dir.join(hf::CONFIG_FILE).display().to_string(),
                msg: format!("describes {:?}, but the model is {:?}", imported.config, self.config),
            });
        }
        self.load_named(imported.tensors, &dir.join(hf::WEIGHTS_FILE))
    }

    /// The config in a weights file's metadata (see [`Gpt::save_weights`]).
    pub fn config_from_metadata(metadata: &BTreeMap<String, String>, path: &Path) -> Result<GptConfig> {
        config_from_metadata(metadata, path)
    }

    /// A model from saved weights, whose shape comes with them: see [`read_weights`].
    pub fn from_path(path: &Path, dtype: DType, device: &Device) -> Result<Gpt> {
        let (config, tensors, source) = read_weights(path)?;
        let mut model = Gpt::new(config, dtype, device)?;
        model.load_named(tensors, &source)?;
        Ok(model)
    }
}

/// The metadata key of the config in a weights file.
pub const CONFIG_KEY: &str = "gpt_config";

fn config_from_metadata(metadata: &BTreeMap<String, String>, path: &Path) -> Result<GptConfig> {
    let raw = metadata.get(CONFIG_KEY).ok_or_else(|| Error::Weights {
        path: path.display().to_string(),
        msg: "no gpt_config metadata: not a weights file written by trainer".into(),
    })?;
    serde_json::from_str(raw).map_err(|e| Error::Weights { path: path.display().to_string(), msg: e.to_string() })
}

/// Weights in our names and layouts, with their model config, from any of:
/// a weights file written by [`Gpt::save_weights`]; a directory holding one as
/// `model.safetensors`; a Hugging Face GPT-2 directory (config.json +
/// model.safetensors, converted by [`hf::import`]). Also returns the file the
/// tensors came from, for error messages.
pub fn read_weights(path: &Path) -> Result<(GptConfig, BTreeMap<String, Tensor>, PathBuf)> {
    let file_err = |msg: &str| Error::File { path: path.display().to_string(), msg: msg.into() };
    if path.is_dir() {
        if hf::is_hf_dir(path) {
            let imported = hf::import(path)?;
            return Ok((imported.config, imported.tensors, path.join(hf::WEIGHTS_FILE)));
        }
        let inner = path.join(hf::WEIGHTS_FILE);
        if !inner.is_file() {
            return Err(file_err(&format!(
                "holds neither {} (a Hugging Face model) nor {}",
                hf::CONFIG_FILE,
                hf::WEIGHTS_FILE
            )));
        }
        return read_weights(&inner);
    }
    if !path.exists() {
        return Err(file_err("no such file or directory"));
    }
    let loaded = io::load(path)?;
    if !loaded.metadata.contains_key(CONFIG_KEY) {
        // A Hugging Face model.safetensors named directly: read its directory.
        if let Some(dir) = path.parent().filter(|d| hf::is_hf_dir(d)) {
            let imported = hf::import(dir)?;
            return Ok((imported.config, imported.tensors, path.to_path_buf()));
        }
    }
    let config = config_from_metadata(&loaded.metadata, path)?;
    Ok((config, loaded.tensors, path.to_path_buf()))
}

/// The token batch inside `batch`, or an error: GPT-2 reads token windows.
fn tokens_of(batch: &Batch) -> Result<(usize, usize, &[u32], &[u32])> {
    match batch {
        Batch::Tokens { b, t, inputs, targets } => Ok((*b, *t, inputs, targets)),
        other => Err(Error::Config(format!(
            "a gpt model reads token windows, but the data gives {} (is data.train a token shard pattern?)",
            other.kind()
        ))),
    }
}

impl Model for Gpt {
    fn desc(&self) -> ModelDesc {
        gpt_desc(&self.config)
    }

    fn summary(&self) -> String {
        let c = &self.config;
        format!("n_layer={} n_head={} n_embd={} vocab={}", c.n_layer, c.n_head, c.n_embd, c.vocab_size)
    }

    fn input(&self) -> InputSpec {
        InputSpec::Tokens { vocab_size: self.config.vocab_size, max_len: self.config.block_size }
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn init(&mut self, seed: u64) -> Result<()> {
        Gpt::init(self, seed)
    }

    fn load_pretrained(&mut self, dir: &Path) -> Result<()> {
        self.load_hf(dir)
    }

    fn set_recompute(&mut self, recompute: Recompute) -> Result<()> {
        self.recompute = recompute;
        Ok(())
    }

    fn new_acts(&self, batch: &Batch) -> Result<Acts> {
        let (b, t, _, _) = tokens_of(batch)?;
        Ok(Acts::new(Gpt::new_acts(self, b, t)?))
    }

    fn forward_backward(
        &mut self,
        acts: &mut Acts,
        batch: &Batch,
        loss_scale: f64,
        ready: &mut GradsReady<'_>,
    ) -> Result<f64> {
        let acts = acts.get_mut::<GptActs>("gpt")?;
        let (_, _, inputs, targets) = tokens_of(batch)?;
        self.forward_backward_with(acts, inputs, targets, loss_scale, ready)?;
        acts.mean_loss()
    }

    fn evaluate(&self, acts: &mut Acts, batch: &Batch) -> Result<BatchEval> {
        let acts = acts.get_mut::<GptActs>("gpt")?;
        let (_, _, inputs, targets) = tokens_of(batch)?;
        Ok(BatchEval { loss: self.forward(acts, inputs, Some(targets))?.unwrap_or(f64::NAN), hits: None })
    }

    fn flops_per_sample(&self, batch: &Batch) -> f64 {
        match batch {
            Batch::Tokens { t, .. } => self.config.flops_per_token(*t) * *t as f64,
            // new_acts has refused any other batch before a step could run.
            _ => 0.0,
        }
    }

    fn units_per_sample(&self, batch: &Batch) -> usize {
        match batch {
            Batch::Tokens { t, .. } => *t,
            _ => 0,
        }
    }

    fn save_weights(&self, path: &Path) -> Result<()> {
        Gpt::save_weights(self, path)
    }
}

impl Module for Gpt {
    fn params(&self) -> Vec<&Param> {
        let mut p = vec![&self.wte, &self.wpe];
        for b in &self.blocks {
            p.extend(b.params());
        }
        p.extend(self.ln_f.params());
        p
    }

    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut p = vec![&mut self.wte, &mut self.wpe];
        for b in &mut self.blocks {
            p.extend(b.params_mut());
        }
        p.extend(self.ln_f.params_mut());
        p
    }
}
