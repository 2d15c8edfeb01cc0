#!/usr/bin/env python3
"""Builds a small randomly initialized ViTForImageClassification with
transformers, saves it as a Hugging Face model directory, and writes what
crates/models/tests/vit_parity.rs compares our import against.

    pip install torch transformers safetensors numpy
    python3 scripts/parity/make_vit_golden.py [--out-dir tests/data]

Writes, under --out-dir:
  hf_vit_tiny/                    save_pretrained (config.json, model.safetensors)
                                  and a preprocessor_config.json with per-channel
                                  image_mean / image_std that are not 0.5
  hf_vit_tiny.golden.safetensors  uint8 images (as int32) and labels, the
                                  pixel_values transformers was given, logits,
                                  the mean cross-entropy loss, and the gradient
                                  of every parameter (under transformers' names);
                                  and the logits of 20x20 images with the 3x3
                                  position grid interpolated to 5x5

Every parameter is random (LayerNorm gains and all biases too, which
transformers' own init sets to constants), so a mix-up between any two
tensors, q/k/v order or a wrong reshape of the patch convolution shows. The
pixel values are normalized exactly as our loader does (in float32:
x * (1 / (255 std)) - mean / std), then the model runs in float64: the exact
answer for those inputs and the float32 weights as saved, which the Rust test
meets in f64 tightly and in f32 within rounding.

  python3 scripts/parity/make_vit_golden.py --check-export DIR

loads DIR (written by `trainer export` from the imported golden model) with
transformers and compares its logits on the golden images with the golden
logits: our export is what transformers reads.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTForImageClassification

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=12,
           patch_size=4, num_channels=3, layer_norm_eps=1e-12, hidden_act="gelu", qkv_bias=True,
           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CLASSES = 5
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
SEED = 11
B = 3


def pixel_values(images):
    """(B, H, W, C) uint8 -> (B, C, H, W) float64, normalized as our patchify does in float32."""
    x = images.astype(np.float32)
    scale = np.array([1.0 / (255.0 * s) for s in STD], dtype=np.float32)
    shift = np.array([m / s for m, s in zip(MEAN, STD)], dtype=np.float32)
    v = x * scale - shift  # float32 multiply, then float32 subtract (no fused multiply-add)
    return torch.from_numpy(v.astype(np.float64)).permute(0, 3, 1, 2).contiguous()


def check_export(export_dir, golden_path):
    golden = load_file(golden_path)
    model = ViTForImageClassification.from_pretrained(export_dir).double().eval()
    images = golden["input.images"].numpy().astype(np.uint8)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values(images)).logits
    err = (logits - golden["out.logits"]).abs().max().item() / golden["out.logits"].abs().max().item()
    print(f"export {export_dir}: logits relative error {err:.2e} against the golden model")
    return err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "tests/data"))
    ap.add_argument("--check-export", help="a directory written by `trainer export`")
    args = ap.parse_args()
    golden_path = os.path.join(args.out_dir, "hf_vit_tiny.golden.safetensors")
    if args.check_export:
        # f32 weights (ours, exported) against the same f32 weights: only the float64 run's order differs.
        sys.exit(0 if check_export(args.check_export, golden_path) < 1e-12 else 1)

    torch.manual_seed(SEED)
    config = ViTConfig(**CFG, num_labels=CLASSES, id2label={i: f"class{i}" for i in range(CLASSES)},
                       label2id={f"class{i}": i for i in range(CLASSES)})
    model = ViTForImageClassification(config).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
            if "layernorm" in name and name.endswith(".weight"):
                p.add_(1.0)
    hf_dir = os.path.join(args.out_dir, "hf_vit_tiny")
    model.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "ViTImageProcessor", "do_normalize": True, "do_rescale": True,
                   "rescale_factor": 1 / 255, "image_mean": MEAN, "image_std": STD}, f, indent=2)

    # Ground truth: float64 from exactly the float32 weights saved.
    model64 = ViTForImageClassification.from_pretrained(hf_dir).double().eval()
    rng = np.random.default_rng(SEED)
    s, c = CFG["image_size"], CFG["num_channels"]
    images = rng.integers(0, 256, size=(B, s, s, c), dtype=np.uint8)
    labels = torch.from_numpy(rng.integers(0, CLASSES, size=B)).long()
    pv = pixel_values(images)
    # Fine-tuning at another resolution: 20x20 images, the position grid
    # interpolated from 3x3 to 5x5 (bicubic, as interpolate_pos_encoding does).
    images20 = rng.integers(0, 256, size=(B, 20, 20, c), dtype=np.uint8)
    with torch.no_grad():
        logits20 = model64(pixel_values=pixel_values(images20), interpolate_pos_encoding=True).logits
    out = model64(pixel_values=pv, labels=labels)
    out.loss.backward()
    golden = {
        "input.images": torch.from_numpy(images.astype(np.int32)),
        "input.labels": labels.to(torch.int32),
        "input.pixel_values": pv,
        "out.logits": out.logits.detach().contiguous(),
        "out.loss": out.loss.detach().reshape(1),
        "input.images20": torch.from_numpy(images20.astype(np.int32)),
        "out.logits20": logits20.contiguous(),
    }
    # Under the names save_pretrained writes (transformers 5 renames its modules
    # in memory, q_proj for attention.attention.query and so on, but saves the
    # names every hub checkpoint has): save the gradients as if they were weights.
    with torch.no_grad():
        for p in model64.parameters():
            p.copy_(p.grad)
    with tempfile.TemporaryDirectory() as tmp:
        model64.save_pretrained(tmp)
        for name, grad in load_file(os.path.join(tmp, "model.safetensors")).items():
            golden[f"grad.{name}"] = grad.to(torch.float64).contiguous()
    meta = {"config": json.dumps(CFG), "classes": str(CLASSES), "torch": torch.__version__,
            "transformers": transformers.__version__}
    save_file(golden, golden_path, metadata=meta)
    sizes = {f: os.path.getsize(os.path.join(hf_dir, f)) for f in sorted(os.listdir(hf_dir))}
    print(f"wrote {hf_dir} {sizes} and {golden_path} ({os.path.getsize(golden_path)} bytes); "
          f"loss {out.loss.item():.6f}", file=sys.stderr)


if __name__ == "__main__":
    main()
