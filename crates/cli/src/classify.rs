//! `trainer classify`: the top classes of image files under a trained image
//! classifier, each image prepared as validation images are (the shorter side
//! resized to the model's size, the centre square kept).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use trainer_core::{DType, Device};
use trainer_data::Batch;
use trainer_models::InputSpec;
use trainer_models::vit::VitActs;

use crate::interop::ModelSource;

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    #[command(flatten)]
    source: ModelSource,
    /// JPEG or PNG files to classify.
    #[arg(long, required = true, num_args = 1..)]
    image: Vec<PathBuf>,
    /// The class names, one per line (the classes.txt `trainer prepare`
    /// writes beside the shards) [default: class numbers].
    #[arg(long)]
    class_names: Option<PathBuf>,
    /// How many classes to print per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
}

pub fn run_classify(args: &ClassifyArgs) -> Result<()> {
    let path = args.source.resolve()?;
    let model = trainer_models::from_weights(&path, DType::F32, &Device::Cpu)?;
    let InputSpec::Images { size, channels, classes } = model.input() else {
        bail!("{}: a {} model, not an image classifier", path.display(), model.desc().kind);
    };
    let names = match &args.class_names {
        Some(f) => {
            let names = trainer_data::read_class_names(f)?;
            if names.len() != classes {
                bail!("--class-names {}: {} names for a model of {classes} classes", f.display(), names.len());
            }
            names
        }
        None => (0..classes).map(|i| format!("class {i}")).collect(),
    };
    let mut pixels = Vec::with_capacity(args.image.len() * size * size * channels);
    for f in &args.image {
        pixels.extend(trainer_data::decode_image(f, size, channels)?);
    }
    let b = args.image.len();
    let batch = Batch::Images { b, height: size, width: size, channels, pixels, labels: vec![0; b] };
    let mut acts = model.new_acts(&batch)?;
    model.evaluate(&mut acts, &batch)?;
    let logits = acts.get_mut::<VitActs>("vit")?.logits.to_vec_f64().context("reading the logits")?;
    for (file, row) in args.image.iter().zip(logits.chunks(classes)) {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
        let mut ranked: Vec<(usize, f64)> = row.iter().map(|v| (v - max).exp() / sum).enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let top: Vec<String> =
            ranked.iter().take(args.top).map(|(i, p)| format!("{}={p:.4}", names[*i].replace(' ', "_"))).collect();
        println!("{} {}", file.display(), top.join(" "));
    }
    Ok(())
}
