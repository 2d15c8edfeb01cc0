#!/usr/bin/env python3
"""Builds the same GPT-2 in PyTorch from our initialization and writes the
golden file that crates/models/tests/gpt_parity.rs compares against.

    python3 scripts/parity/make_gpt_golden.py [--out crates/models/tests/data/gpt_parity.safetensors]

It runs our `gpt_init` example to get weights from our own initialization, then,
in PyTorch float64 (the ground truth, so the Rust test can check both its f64 run
tightly and its f32 run within f32 rounding):
  - logits and mean cross-entropy loss of one batch,
  - the gradient of every parameter,
  - the losses of 10 AdamW steps on that batch, with global-norm clipping.
The model is written out explicitly here (nanoGPT's architecture) rather than
taken from transformers, so that nothing but PyTorch is needed.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# Kept small so the committed file stays tiny; the odd vocabulary exercises the
# padding to 128, and T < block_size exercises a partial position table.
CFG = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
B, T, SEED = 2, 16, 1234
OPT = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0, steps=10)


class Gpt(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.p = torch.nn.ParameterDict({k.replace(".", "/"): torch.nn.Parameter(v.clone()) for k, v in w.items()})

    def w(self, name):
        return self.p[name.replace(".", "/")]

    def forward(self, idx):
        c, nh, V = CFG["n_embd"], CFG["n_head"], CFG["vocab_size"]
        b, t = idx.shape
        wte = self.w("transformer.wte.weight")
        x = wte[idx] + self.w("transformer.wpe.weight")[:t]
        ln = lambda x, n: F.layer_norm(x, (c,), self.w(n + ".weight"), self.w(n + ".bias"), 1e-5)
        lin = lambda x, n: F.linear(x, self.w(n + ".weight"), self.w(n + ".bias"))
        for i in range(CFG["n_layer"]):
            h = f"transformer.h.{i}"
            qkv = lin(ln(x, h + ".ln_1"), h + ".attn.c_attn")
            q, k, v = (z.view(b, t, nh, c // nh).transpose(1, 2) for z in qkv.split(c, dim=2))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(c // nh)
            mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = (att @ v).transpose(1, 2).reshape(b, t, c)
            x = x + lin(y, h + ".attn.c_proj")
            m = F.gelu(lin(ln(x, h + ".ln_2"), h + ".mlp.c_fc"), approximate="tanh")
            x = x + lin(m, h + ".mlp.c_proj")
        x = ln(x, "transformer.ln_f")
        # Tied head over the padded table; only the real vocabulary enters the loss.
        return (x @ wte.t())[..., :V]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "crates/models/tests/data/gpt_parity.safetensors"))
    args = ap.parse_args()
    torch.manual_seed(SEED)

    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init.safetensors")
        nums = [CFG[k] for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")] + [SEED]
        subprocess.run(["cargo", "run", "-q", "-p", "trainer-models", "--example", "gpt_init", "--", init]
                       + [str(n) for n in nums], check=True, cwd=ROOT)
        weights = {k: v.double() for k, v in load_file(init).items()}

    model = Gpt(weights)
    data = torch.randint(0, CFG["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(SEED))
    idx, tgt = data[:, :-1], data[:, 1:]

    logits = model(idx)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))
    loss.backward()
    out = {
        "input.tokens": idx.to(torch.int32).contiguous(),
        "input.targets": tgt.to(torch.int32).contiguous(),
        "out.logits": logits.detach().contiguous(),
        "out.loss": loss.detach().reshape(1),
    }
    for name in weights:
        out["param." + name] = weights[name].contiguous()
        out["grad." + name] = model.w(name).grad.detach().clone().contiguous()

    # AdamW steps; decay on matrices only (as our Param::decays), PyTorch's single-tensor path.
    model.zero_grad(set_to_none=True)
    params = list(model.p.values())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": OPT["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=OPT["lr"], betas=(OPT["beta1"], OPT["beta2"]), eps=OPT["eps"],
                            foreach=False, fused=False)
    losses = []
    for _ in range(OPT["steps"]):
        opt.zero_grad(set_to_none=True)
        logits = model(idx)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OPT["grad_clip"])
        opt.step()
        losses.append(loss.item())
    out["steps.losses"] = torch.tensor(losses, dtype=torch.float64)

    meta = {"config": json.dumps(CFG), "optimizer": json.dumps(OPT), "torch": torch.__version__,
            "batch": json.dumps({"B": B, "T": T})}
    save_file(out, args.out, metadata=meta)
    print(f"wrote {args.out}: loss {out['out.loss'].item():.6f}, step losses {losses[0]:.6f} .. {losses[-1]:.6f}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
