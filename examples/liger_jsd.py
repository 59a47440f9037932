"""A tiny student distilled with Liger's chunked ``LigerFusedLinearJSDLoss``, plain and swapped to
fdiv_kernels with ``apply_fk_to_liger()``; prints both runs' losses.

    python examples/liger_jsd.py                    # 20 steps
    python examples/liger_jsd.py --smoke            # 3 steps (what CI runs)

The training script imports Liger's class at the top, the usual style: the patch reaches that
binding too. Tiny random Qwen2 models: nothing is downloaded.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tiny import random_batches, steps_and_vocab, tiny_causal_lm  # noqa: E402

from fdiv_kernels.integrations.liger import apply_fk_to_liger  # noqa: E402


def train(steps: int, vocab: int) -> list[float]:
    # Looked up at call time from this module's globals, which the patch rebinds.
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.2, weight_soft_loss=0.8, beta=0.5,
                                      temperature=2.0, compiled=False, chunk_size=64)
    student = tiny_causal_lm(2, hidden=32, layers=1, vocab=vocab)
    teacher = tiny_causal_lm(1, hidden=64, layers=2, vocab=vocab, peaked=8.0).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=5e-3)
    losses = []
    for batch in random_batches(steps, 4, 24, vocab, prompt=8):
        hs = student.model(input_ids=batch["input_ids"]).last_hidden_state[:, :-1]
        with torch.no_grad():
            ht = teacher.model(input_ids=batch["input_ids"]).last_hidden_state[:, :-1]
        labels = batch["labels"][:, 1:].reshape(-1)
        loss = loss_fn(hs.reshape(-1, hs.shape[-1]), student.lm_head.weight,
                       ht.reshape(-1, ht.shape[-1]), teacher.lm_head.weight, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> dict:
    steps, vocab = steps_and_vocab(__doc__, argv)
    global LigerFusedLinearJSDLoss
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # the script's own binding

    plain = train(steps, vocab)
    with apply_fk_to_liger() as patch:
        patched = patch.targets
        swapped = train(steps, vocab)
    for i, (a, b) in enumerate(zip(plain, swapped)):
        print(f"step {i}: liger {a:.6f}  fk {b:.6f}")
    return {"plain": plain, "swapped": swapped, "patched": patched}


if __name__ == "__main__":
    main()
