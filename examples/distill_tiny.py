"""Distil a small randomly initialized causal LM into a smaller one on the CPU.

    python examples/distill_tiny.py                 # under a minute on 2 cores; distill_tiny.png
    python examples/distill_tiny.py --smoke         # a few steps (what CI runs)

The loss is ``fdiv_kernels.integrations.hf.distillation_loss``: both models run to their last
hidden states and ``fk.fused_linear_divergence`` takes the divergence through their lm heads, so
neither model's (batch, length, vocab) logits are ever materialized.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tiny import random_batches, tiny_causal_lm  # noqa: E402

from fdiv_kernels.integrations.hf import distillation_loss  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="js", help="fk divergence kind (default js)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--out", default=".", help="folder for distill_tiny.png")
    ap.add_argument("--smoke", action="store_true", help="a few tiny steps (CI)")
    args = ap.parse_args(argv)
    steps, vocab, length, batch = args.steps, args.vocab, 32, 8
    if args.smoke:
        steps, vocab, length, batch = 4, 256, 16, 2
    torch.set_num_threads(min(2, torch.get_num_threads()))

    teacher = tiny_causal_lm(1, hidden=128, layers=2, vocab=vocab, peaked=8.0).eval()
    student = tiny_causal_lm(2, hidden=64, layers=1, vocab=vocab)
    opt = torch.optim.AdamW(student.parameters(), lr=2e-2)
    params = {"beta": 0.5} if args.kind == "js" else {}

    from tqdm.auto import tqdm

    losses, t0 = [], time.perf_counter()
    # A small fixed corpus, cycled: the student can match the teacher on it within the budget.
    corpus = list(random_batches(8, batch, length, vocab, prompt=length // 4))
    bar = tqdm((corpus[i % len(corpus)] for i in range(steps)), total=steps,
               desc=f"distil ({args.kind})", disable=args.smoke and not sys.stderr.isatty())
    for inputs in bar:
        loss = distillation_loss(student, teacher, inputs, kind=args.kind, **params)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    seconds = time.perf_counter() - t0

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "distill_tiny.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{args.kind} divergence (teacher || student)")
    ax.set_title(f"distilling a random {teacher.num_parameters() / 1e6:.1f}M LM into "
                 f"{student.num_parameters() / 1e6:.1f}M, V={vocab}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"{steps} steps in {seconds:.1f} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}; {png}")
    return {"losses": losses, "png": png, "seconds": seconds}


if __name__ == "__main__":
    main()
