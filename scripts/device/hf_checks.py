#!/usr/bin/env python3
"""Hugging Face interop checks against transformers, on CPU and CUDA. Runs on
the GPU machine (PyTorch + transformers there), with the release `trainer`
binary built on the development machine, from the repository root:

    python3 scripts/device/hf_checks.py [--trainer .dev/trainer] [--devices cpu,cuda]

1. Ours -> transformers: trains a tiny GPT-2 with `trainer` (configs/tiny.toml
   on the bundled KJV text, a few steps), exports it (`trainer export --format
   hf`), loads the directory with GPT2LMHeadModel.from_pretrained, and compares
   on each device:
   - logits of prompt + greedy continuation: our `trainer generate
     --logits-out` against transformers' forward, fp32 on both sides,
     max |ours - theirs| / max |theirs| <= 1e-4;
   - greedy generation, token by token: `trainer generate --temperature 0`
     against transformers' generate(do_sample=False).
2. Transformers -> ours: a randomly initialized GPT-2 124M made with
   transformers (every parameter random, biases and LayerNorm included),
   saved with save_pretrained, imported with `trainer import`, and the same two
   comparisons.
3. Informational: bf16 generation on CUDA against transformers' fp32 logits.

A greedy mismatch where transformers' own top-two logits are closer than
TIE (relative to the logit scale) is reported as a near tie, not a failure:
fp32 rounding may pick either side of a tie. TF32 is off in PyTorch so that
its fp32 means fp32 (our CUDA fp32 GEMMs are exact fp32 too).

Logs and files go to $OUT (or /tmp/hf_checks). Exit status 1 if any check fails.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.environ.get("OUT", "/tmp/hf_checks")
LOGITS_TOL = 1e-4
TIE = 1e-5
PROMPT = "And God said, Let there be light: and there was"
NEW_TOKENS = 40

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

results = []  # (check, ok, detail)


def record(name, ok, detail):
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def run(cmd, log):
    with open(os.path.join(OUT, log), "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        f.write(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return p.stdout


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def ours_generate(trainer, weights, device, tag, prompt_ids=None, dtype="fp32"):
    """Greedy generation and the logits of the whole sequence from our CLI."""
    logits_file = os.path.join(OUT, f"{tag}_{device}_{dtype}.logits.safetensors")
    cmd = [trainer, "generate", "--weights", weights, "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS),
           "--device", device, "--dtype", dtype, "--json", "--logits-out", logits_file]
    cmd += ["--prompt-ids", ",".join(map(str, prompt_ids))] if prompt_ids else ["--prompt", PROMPT]
    j = json.loads(run(cmd, f"{tag}.log").strip().splitlines()[-1])
    f = load_file(logits_file)
    return j, f["ids"].long(), f["logits"].double()


def compare(model, model64, trainer, weights, device, tag, prompt_ids=None):
    ours, ids, our_logits = ours_generate(trainer, weights, device, tag, prompt_ids)
    dev = torch.device(device)
    m = model.to(dev)
    with torch.no_grad():
        theirs = m(ids[None].to(dev)).logits[0].double().cpu()
    e = rel_err(our_logits, theirs)
    record(f"{tag} logits {device}", e <= LOGITS_TOL, f"rel err {e:.2e} over {tuple(ids.shape)[0]} positions "
           f"(tol {LOGITS_TOL:.0e})")

    prompt = torch.tensor(ours["prompt_ids"])[None]
    eos = model.config.eos_token_id
    with torch.no_grad():
        gen = m.generate(prompt.to(dev), attention_mask=torch.ones_like(prompt).to(dev), max_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=eos if eos is not None else 0)[0, prompt.shape[1]:].cpu()
    a, b = ours["tokens"], gen.tolist()
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    if first is None and len(a) == len(b):
        record(f"{tag} greedy {device}", True, f"{len(a)} tokens identical (stop={ours['stop']})")
        return
    if first is None:
        record(f"{tag} greedy {device}", False, f"same first {n} tokens, lengths {len(a)} vs {len(b)}")
        return
    # Near tie? transformers' float64 logits at the diverging position.
    with torch.no_grad():
        seq = torch.tensor(ours["prompt_ids"] + a[:first])[None]
        l64 = model64(seq).logits[0, -1]
    top = torch.topk(l64, 2).values
    margin = ((top[0] - top[1]) / l64.abs().max()).item()
    tie = margin < TIE
    record(f"{tag} greedy {device}", tie, f"first difference at token {first} (ours {a[first]}, transformers "
           f"{b[first]}); top-2 margin {margin:.1e} {'(near tie)' if tie else ''}")


def make_ours(trainer, args):
    """A small model trained by us (or --weights)."""
    if args.weights:
        return args.weights
    shards = os.path.join(OUT, "kjv")
    run([trainer, "prepare", "--input", "data/kjv/kjv.txt", "--output", shards, "--val-tokens", "65536",
         "--overwrite"], "train.log")
    run_dir = os.path.join(OUT, "run_tiny")
    # A fresh run: with checkpoint.resume = "auto" an old one would be continued.
    shutil.rmtree(run_dir, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run([trainer, "--config", "configs/tiny.toml", "--set", f'data.train="{shards}/train_*.bin"',
         "--set", f'data.val="{shards}/val_*.bin"', "--set", "training.max_steps=80", "--set", "eval.interval=0",
         "--set", f"training.device={device}", "--set", f'logging.run_dir="{run_dir}"'], "train.log")
    return os.path.join(run_dir, "model.safetensors")


def make_random_hf(path):
    torch.manual_seed(0)
    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # GPT-2 124M
    model = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif ".ln_" in name:
                p.copy_(1.0 + 0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)


def load(path):
    model = GPT2LMHeadModel.from_pretrained(path).float().eval()
    model64 = GPT2LMHeadModel.from_pretrained(path).double().eval()
    return model, model64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trainer", default=".dev/trainer")
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--weights", help="our weights to export (default: train a tiny model)")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    trainer = os.path.abspath(os.path.join(ROOT, args.trainer))
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    if "cuda" in args.devices and "cuda" not in devices:
        record("cuda available", False, "torch.cuda.is_available() is False")
    print(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, devices {devices}")

    # 1. Ours -> transformers.
    weights = make_ours(trainer, args)
    exported = os.path.join(OUT, "ours_hf")
    run([trainer, "export", "--weights", weights, "--format", "hf", "--output", exported], "export.log")
    model, model64 = load(exported)
    for device in devices:
        compare(model, model64, trainer, weights, device, "export")

    # 2. Transformers -> ours.
    hf_dir = os.path.join(OUT, "random_gpt2")
    make_random_hf(hf_dir)
    imported = os.path.join(OUT, "imported.safetensors")
    run([trainer, "import", "--from", hf_dir, "--output", imported], "import.log")
    model, model64 = load(hf_dir)
    prompt_ids = torch.randint(0, 50257, (8,), generator=torch.Generator().manual_seed(1)).tolist()
    for device in devices:
        compare(model, model64, trainer, imported, device, "import", prompt_ids)
    # The directory itself works as --weights too (converted on the fly).
    compare(model, model64, trainer, hf_dir, devices[0], "import_dir", prompt_ids)

    # 3. bf16 on CUDA (informational).
    if "cuda" in devices:
        _, ids, logits = ours_generate(trainer, imported, "cuda", "import_bf16", prompt_ids, dtype="bf16")
        with torch.no_grad():
            ref = model.to("cuda")(ids[None].cuda()).logits[0].double().cpu()
        print(f"info import bf16 cuda: logits rel err {rel_err(logits, ref):.2e} vs transformers fp32")

    failed = [r for r in results if not r[1]]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed (logs in {OUT})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
