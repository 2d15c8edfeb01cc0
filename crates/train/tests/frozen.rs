//! A frozen parameter gets no gradient, no optimizer state and no update,
//! and the rest of the model trains exactly as it would without it: a test
//! model written here (a bigram table plus a bias on every logit) drives the
//! trainer through the model seam, once with the bias as a frozen parameter
//! and once with the same bias as a plain constant.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::Path;

use trainer_core::{DType, Device, Tensor, io};
use trainer_data::{Batch, write_shard};
use trainer_models::{Acts, BatchEval, GradsReady, InputSpec, Model, ModelDesc};
use trainer_nn::{Module, Param, ParamId, number_params};
use trainer_train::{Config, StopSignal, train_with};

const VOCAB: usize = 16;

/// logits[i] = table[x_i] + bias; the loss is the mean cross-entropy. The
/// bias is a parameter (`frozen` says whether it trains) or, when
/// `bias_param` is false, a constant outside the parameters.
#[derive(Debug)]
struct Bigram {
    /// (VOCAB, VOCAB)
    table: Param,
    /// (VOCAB), when a parameter.
    bias: Option<Param>,
    /// The bias's values when it is not a parameter.
    constant_bias: Vec<f32>,
}

impl Bigram {
    fn new(bias_param: bool, frozen: bool) -> Bigram {
        let table = Param::zeros("table", &[VOCAB, VOCAB], DType::F32, &Device::Cpu).unwrap();
        let bias = bias_param.then(|| {
            let mut b = Param::zeros("bias", &[VOCAB], DType::F32, &Device::Cpu).unwrap();
            if frozen {
                b.freeze();
            }
            b
        });
        let mut m = Bigram { table, bias, constant_bias: initial_bias() };
        number_params(m.params_mut());
        m
    }

    fn bias(&self) -> Vec<f32> {
        self.bias.as_ref().map_or_else(|| self.constant_bias.clone(), |b| b.value.to_vec::<f32>().unwrap())
    }

    /// Per position: (loss, dL/dlogits row) for targets of the batch.
    fn rows(&self, batch: &Batch) -> Vec<(f64, Vec<f32>, u32)> {
        let Batch::Tokens { inputs, targets, .. } = batch else { panic!("the bigram model reads tokens") };
        let (table, bias) = (self.table.value.to_vec::<f32>().unwrap(), self.bias());
        inputs
            .iter()
            .zip(targets)
            .map(|(&x, &y)| {
                let logits: Vec<f32> = (0..VOCAB).map(|j| table[x as usize * VOCAB + j] + bias[j]).collect();
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
                let loss = (sum.ln() + max - logits[y as usize]) as f64;
                let mut d: Vec<f32> = logits.iter().map(|l| (l - max).exp() / sum).collect();
                d[y as usize] -= 1.0;
                (loss, d, x)
            })
            .collect()
    }
}

fn initial_bias() -> Vec<f32> {
    (0..VOCAB).map(|j| 0.1 * (j as f32 - 7.5)).collect()
}

fn add_into(grad: &mut Tensor, at: usize, values: &[f32]) {
    let mut g = grad.to_vec::<f32>().unwrap();
    for (a, v) in g[at..at + values.len()].iter_mut().zip(values) {
        *a += v;
    }
    grad.copy_from_slice(&g).unwrap();
}

impl Module for Bigram {
    fn params(&self) -> Vec<&Param> {
        std::iter::once(&self.table).chain(&self.bias).collect()
    }

    fn params_mut(&mut self) -> Vec<&mut Param> {
        std::iter::once(&mut self.table).chain(&mut self.bias).collect()
    }
}

impl Model for Bigram {
    fn desc(&self) -> ModelDesc {
        ModelDesc { kind: "bigram".into(), config: serde_json::json!({ "vocab": VOCAB }) }
    }

    fn summary(&self) -> String {
        format!("vocab={VOCAB}")
    }

    fn input(&self) -> InputSpec {
        InputSpec::Tokens { vocab_size: VOCAB, max_len: 1 << 20 }
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn device(&self) -> &Device {
        &Device::Cpu
    }

    fn init(&mut self, seed: u64) -> trainer_models::Result<()> {
        let table: Vec<f32> = (0..VOCAB * VOCAB).map(|i| ((i as u64 * 7 + seed) % 13) as f32 * 0.01).collect();
        self.table.value.copy_from_slice(&table)?;
        if let Some(b) = &mut self.bias {
            b.value.copy_from_slice(&initial_bias())?;
        }
        Ok(())
    }

    fn load_pretrained(&mut self, dir: &Path) -> trainer_models::Result<()> {
        Err(trainer_models::Error::Config(format!("bigram: cannot load {}", dir.display())))
    }

    fn new_acts(&self, _batch: &Batch) -> trainer_models::Result<Acts> {
        Ok(Acts::new(()))
    }

    fn forward_backward(
        &mut self,
        _acts: &mut Acts,
        batch: &Batch,
        loss_scale: f64,
        ready: &mut GradsReady<'_>,
    ) -> trainer_models::Result<f64> {
        let rows = self.rows(batch);
        let n = rows.len() as f32;
        let scale = loss_scale as f32 / n;
        for (_, d, x) in &rows {
            let d: Vec<f32> = d.iter().map(|v| v * scale).collect();
            add_into(self.table.grad_mut("bigram backward")?, *x as usize * VOCAB, &d);
            if let Some(g) = self.bias.as_mut().and_then(|b| b.grad.as_mut()) {
                add_into(g, 0, &d);
            }
        }
        let ids: Vec<ParamId> = self.params().iter().map(|p| p.id).collect();
        ready(&self.params(), &ids).map_err(trainer_models::Error::Ready)?;
        Ok(rows.iter().map(|r| r.0).sum::<f64>() / rows.len() as f64)
    }

    fn evaluate(&self, _acts: &mut Acts, batch: &Batch) -> trainer_models::Result<BatchEval> {
        let rows = self.rows(batch);
        Ok(BatchEval { loss: rows.iter().map(|r| r.0).sum::<f64>() / rows.len() as f64, hits: None })
    }

    fn flops_per_sample(&self, batch: &Batch) -> f64 {
        (6 * VOCAB * batch.samples()) as f64
    }

    fn units_per_sample(&self, batch: &Batch) -> usize {
        match batch {
            Batch::Tokens { t, .. } => *t,
            Batch::Images { .. } => 1,
        }
    }

    fn save_weights(&self, path: &Path) -> trainer_models::Result<()> {
        let named: Vec<(&str, &Tensor)> = self.params().iter().map(|p| (p.name.as_str(), &p.value)).collect();
        io::save(path, &named, Some(BTreeMap::new()))?;
        Ok(())
    }
}

fn config(dir: &Path, run: &str) -> Config {
    let tokens: Vec<u32> = (0..3000u32).map(|i| (i * 7 + i * i / 5) % VOCAB as u32).collect();
    write_shard(&dir.join("train_000000.bin"), &tokens).unwrap();
    let src = format!(
        r#"
[model]
preset = "test"
[data]
train = "{d}/train_*.bin"
[training]
micro_batch_size = 2
seq_len = 8
grad_accum_steps = 2
max_steps = 5
[optimizer]
lr = 5e-2
[checkpoint]
interval = 5
[logging]
run_dir = "{d}/{run}"
"#,
        d = dir.display()
    );
    Config::from_toml(&src, "t.toml", &[]).unwrap()
}

fn read(path: &Path) -> BTreeMap<String, Vec<f32>> {
    io::load(path).unwrap().tensors.into_iter().map(|(n, t)| (n, t.to_vec::<f32>().unwrap())).collect()
}

#[test]
fn a_frozen_parameter_gets_no_gradient_state_or_update_and_the_rest_trains_as_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let world = trainer_comm::World::single(Default::default());
    let run = |name: &str, bias_param: bool| {
        let cfg = config(dir.path(), name);
        let build =
            move |_: &Device| -> trainer_train::Result<Box<dyn Model>> { Ok(Box::new(Bigram::new(bias_param, true))) };
        train_with(&cfg, &StopSignal::new(), &world, &build).unwrap()
    };
    let frozen = run("frozen", true);
    let constant = run("constant", false);
    assert_eq!(frozen.steps, 5);
    // The same losses, bit for bit: the frozen bias acted as the constant did.
    assert_eq!(frozen.final_train_loss, constant.final_train_loss);
    let (wf, wc) =
        (read(&dir.path().join("frozen/model.safetensors")), read(&dir.path().join("constant/model.safetensors")));
    assert_eq!(wf["table"], wc["table"], "the trainable parameter trained as without the frozen one");
    assert_ne!(wf["table"], Bigram::new(false, false).table.value.to_vec::<f32>().unwrap(), "it did train");
    assert_eq!(wf["bias"], initial_bias(), "the frozen parameter was not updated");
    // Its checkpoint keeps the frozen value and no optimizer state for it.
    let ck = dir.path().join("frozen/checkpoints/step_00000005");
    let optim = read(&ck.join("optim_rank00000.safetensors"));
    let mut names: Vec<&str> = optim.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["table.exp_avg", "table.exp_avg_sq"]);
    assert_eq!(read(&ck.join("model.safetensors"))["bias"], initial_bias());
    // A model whose bias is frozen has no gradient buffer for it.
    assert!(Bigram::new(true, true).bias.unwrap().grad.is_none());
}
