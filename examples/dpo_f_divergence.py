"""A few f-DPO steps on a tiny randomly initialized causal LM, one run per divergence.

    python examples/dpo_f_divergence.py             # 4 divergences x 20 steps
    python examples/dpo_f_divergence.py --smoke     # 2 steps each (what CI runs)

Sequence log-probabilities come from ``fk.token_logprobs`` (log-softmax of the label without
materializing it), the loss from ``fk.losses.fdpo_loss`` ("Beyond Reverse KL", TRL's
conventions); ``reverse_kl`` is standard DPO. The reference model is a frozen copy of the policy.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tiny import tiny_causal_lm  # noqa: E402

import fdiv_kernels as fk  # noqa: E402


def sequence_logps(model, ids, completion_mask):
    """Sum over completion tokens of log pi(token | prefix): one fused pass over the logits."""
    logits = model(input_ids=ids).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
    return fk.token_logprobs(logits, labels).sum(-1)


def preference_pairs(n, length, prompt, vocab, seed=0):
    """Chosen completions use the lower half of the vocabulary, rejected ones the upper half."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab, (n, prompt), generator=g)
    chosen = torch.randint(3, vocab // 2, (n, length - prompt), generator=g)
    rejected = torch.randint(vocab // 2, vocab, (n, length - prompt), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[:, :prompt] = 0
    return torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1), mask


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--smoke", action="store_true", help="2 tiny steps per divergence (CI)")
    args = ap.parse_args(argv)
    steps, vocab = (2, 128) if args.smoke else (args.steps, 512)
    chosen, rejected, mask = preference_pairs(8, 24, 8, vocab)
    results = {}
    for div in ("reverse_kl", "forward_kl", "js", "alpha"):
        policy = tiny_causal_lm(0, hidden=64, layers=1, vocab=vocab)
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        with torch.no_grad():
            ref_c, ref_r = sequence_logps(ref, chosen, mask), sequence_logps(ref, rejected, mask)
        losses = []
        for _ in range(steps):
            pc, pr = sequence_logps(policy, chosen, mask), sequence_logps(policy, rejected, mask)
            loss = fk.losses.fdpo_loss(pc, pr, ref_c, ref_r, divergence=div, beta=args.beta,
                                       alpha=args.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            margin = ((sequence_logps(policy, chosen, mask) - ref_c)
                      - (sequence_logps(policy, rejected, mask) - ref_r)).mean().item()
        results[div] = {"losses": losses, "margin": margin}
        print(f"{div:>10}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
              f"chosen-vs-rejected log-ratio margin {margin:+.3f}")
    return results


if __name__ == "__main__":
    main()
