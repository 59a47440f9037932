"""torchtune's chunked KD loss (``ForwardKLWithChunkedOutputLoss``) on fdiv_kernels in a tiny
training loop shaped like torchtune's KD recipe, beside torchtune's own loss when installed.

    python examples/torchtune_kd.py                 # 20 steps
    python examples/torchtune_kd.py --smoke         # 3 steps (what CI runs)

In a recipe config the swap is one line:
``kd_loss: {_component_: fdiv_kernels.integrations.torchtune.ForwardKLWithChunkedOutputLoss}``.
Tiny random Qwen2 models: nothing is downloaded.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tiny import random_batches, steps_and_vocab, tiny_causal_lm  # noqa: E402

from fdiv_kernels.integrations import torchtune as fk_tt  # noqa: E402


def train(loss_cls, steps: int, vocab: int, chunks: int = 4) -> list[float]:
    kd_loss = loss_cls(num_output_chunks=chunks)
    ce_weight = 0.5                     # the recipe's kd_ratio mixes CE and the KD loss
    student = tiny_causal_lm(2, hidden=32, layers=1, vocab=vocab)
    teacher = tiny_causal_lm(1, hidden=64, layers=2, vocab=vocab, peaked=8.0).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=5e-3)
    losses = []
    for batch in random_batches(steps, 4, 23, vocab, prompt=8):
        labels = batch["labels"][:, 1:]
        hs = student.model(input_ids=batch["input_ids"]).last_hidden_state[:, :-1]
        with torch.no_grad():
            ht = teacher.model(input_ids=batch["input_ids"]).last_hidden_state[:, :-1]
            t_chunks = [teacher.lm_head(c) for c in ht.tensor_split(chunks, dim=1)]
        s_chunks = [student.lm_head(c) for c in hs.tensor_split(chunks, dim=1)]
        ce = torch.nn.functional.cross_entropy(torch.cat(s_chunks, 1).flatten(0, 1),
                                               labels.flatten())
        loss = (1 - ce_weight) * ce + ce_weight * kd_loss(s_chunks, t_chunks, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> dict:
    steps, vocab = steps_and_vocab(__doc__, argv)
    swapped = train(fk_tt.ForwardKLWithChunkedOutputLoss, steps, vocab)
    try:
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss
    except ImportError:
        plain = None
        print("torchtune is not installed: fdiv_kernels' loss only")
    else:
        plain = train(ForwardKLWithChunkedOutputLoss, steps, vocab)
    for i, b in enumerate(swapped):
        print(f"step {i}: " + (f"torchtune {plain[i]:.6f}  " if plain else "") + f"fk {b:.6f}")
    return {"plain": plain, "swapped": swapped}


if __name__ == "__main__":
    main()
