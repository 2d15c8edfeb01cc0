#!/usr/bin/env python3
"""Builds a small randomly initialized GPT-2 with transformers, saves it as a
Hugging Face model directory, and writes what crates/models/tests/hf_parity.rs
compares our import against.

    pip install torch transformers safetensors
    python3 scripts/parity/make_hf_golden.py [--out-dir tests/data]

Writes, under --out-dir:
  hf_gpt2_tiny/                   GPT2LMHeadModel.save_pretrained (config.json,
                                  model.safetensors, generation_config.json)
  hf_gpt2_tiny.golden.safetensors input ids, their logits, and a greedy
                                  continuation of a prompt

Every parameter is random (LayerNorm gains and all biases too, which
transformers' own init sets to constants), so a mix-up between any two tensors,
a missing transpose or a wrong bias shows. The vocabulary (301) is not a
multiple of 128, so the import's padding is exercised. Logits and the greedy
continuation are computed in float64 from the float32 weights as saved: the
exact answer for those weights, which the Rust test meets in f64 tightly and in
f32 within rounding. The greedy path is checked to have a clear winner at every
step (the top two logits at least MIN_MARGIN apart), so f32 rounding cannot
flip a token and the test can demand the same tokens exactly.
"""
import argparse
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

CFG = dict(vocab_size=301, n_positions=40, n_embd=32, n_layer=2, n_head=4)
# Chosen so that the greedy path is varied and free of near ties (both asserted
# below); HF_GOLDEN_SEED overrides it.
SEED = int(os.environ.get("HF_GOLDEN_SEED", "5"))
B, T = 2, 12
PROMPT_LEN, NEW_TOKENS = 5, 20
MIN_MARGIN = 1e-3
# Random models tend to repeat one token; a varied path exercises positions.
MIN_DISTINCT = 8


def greedy(model, prompt, n):
    """Greedy continuation by full forwards, with the top-1/top-2 gap of each step."""
    ids, margins = prompt.clone(), []
    for _ in range(n):
        logits = model(ids).logits[0, -1]
        top = torch.topk(logits, 2).values
        margins.append((top[0] - top[1]).item())
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, prompt.shape[1]:], min(margins)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "tests/data"))
    args = ap.parse_args()
    torch.manual_seed(SEED)

    config = GPT2Config(**CFG, bos_token_id=None, eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, initializer_range=0.3)
    model = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif ".ln_" in name:
                p.copy_(1.0 + 0.02 * torch.randn(p.shape, generator=g))

    hf_dir = os.path.join(args.out_dir, "hf_gpt2_tiny")
    model.save_pretrained(hf_dir)

    # Ground truth: float64 from exactly the float32 weights saved.
    model64 = GPT2LMHeadModel.from_pretrained(hf_dir).double().eval()
    data = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, CFG["vocab_size"], (B, T), generator=data)
    prompt = torch.randint(0, CFG["vocab_size"], (1, PROMPT_LEN), generator=data)
    with torch.no_grad():
        logits = model64(ids).logits
        tokens, margin = greedy(model64, prompt, NEW_TOKENS)
        # transformers' own generate (with its KV cache) agrees.
        generated = model64.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                                     attention_mask=torch.ones_like(prompt))
    assert torch.equal(generated[0, PROMPT_LEN:], tokens), (generated, tokens)
    assert margin >= MIN_MARGIN, f"greedy path has a near tie ({margin:.2e}); pick another SEED"
    distinct = len(set(tokens.tolist()))
    assert distinct >= MIN_DISTINCT, f"greedy path repeats itself ({distinct} distinct tokens); pick another SEED"

    out = {
        "input.ids": ids.to(torch.int32).contiguous(),
        "out.logits": logits.contiguous(),
        "greedy.prompt": prompt[0].to(torch.int32).contiguous(),
        "greedy.tokens": tokens.to(torch.int32).contiguous(),
    }
    meta = {"config": json.dumps(CFG), "torch": torch.__version__, "transformers": transformers.__version__,
            "greedy_min_margin": f"{margin:.6e}"}
    golden = os.path.join(args.out_dir, "hf_gpt2_tiny.golden.safetensors")
    save_file(out, golden, metadata=meta)
    sizes = {f: os.path.getsize(os.path.join(hf_dir, f)) for f in sorted(os.listdir(hf_dir))}
    print(f"wrote {hf_dir} {sizes} and {golden} ({os.path.getsize(golden)} bytes); "
          f"greedy {tokens.tolist()}, min top-2 margin {margin:.3e}", file=sys.stderr)


if __name__ == "__main__":
    main()
