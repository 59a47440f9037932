"""TRL's GKD trainer for a few steps with its loss on fdiv_kernels (``apply_fk_to_trl()``).

    python examples/gkd_trl.py                      # 10 steps
    python examples/gkd_trl.py --smoke              # 2 steps (what CI runs)

Tiny randomly initialized Qwen2 teacher and student and a word-level tokenizer built in place:
nothing is downloaded. ``lmbda=0`` trains on the dataset's completions (no on-policy sampling),
which keeps the run deterministic; GKD's on-policy mode works the same with a chat dataset.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tiny import random_batches, tiny_causal_lm  # noqa: E402

from fdiv_kernels.integrations.trl import apply_fk_to_trl  # noqa: E402


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--beta", type=float, default=0.5, help="GKD's JSD beta")
    ap.add_argument("--smoke", action="store_true", help="2 tiny steps (CI)")
    args = ap.parse_args(argv)
    steps, vocab = (2, 128) if args.smoke else (args.steps, 1024)

    from datasets import Dataset

    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [{k: v[0].tolist() for k, v in b.items()}
            for b in random_batches(16, 1, 24, vocab, prompt=8)]

    def collate(batch):
        return {k: torch.tensor([r[k] for r in batch]) for k in batch[0]}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # host packages' own deprecation warnings
        patch = apply_fk_to_trl()
    patched = patch.targets             # undo() below empties the handle
    print("patched:", ", ".join(patched))
    losses = []

    class LoggedGKD(GKDTrainer):
        def compute_loss(self, *a, **k):
            loss = super().compute_loss(*a, **k)
            losses.append(loss.item())
            return loss

    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = GKDConfig(output_dir=out, per_device_train_batch_size=4, max_steps=steps,
                            lmbda=0.0, beta=args.beta, learning_rate=5e-3, logging_steps=1,
                            report_to=[], use_cpu=True, save_strategy="no", seed=0,
                            max_length=24, disable_tqdm=args.smoke)
            trainer = LoggedGKD(
                model=tiny_causal_lm(2, hidden=32, layers=1, vocab=vocab),
                teacher_model=tiny_causal_lm(1, hidden=64, layers=2, vocab=vocab, peaked=8.0),
                args=cfg, train_dataset=Dataset.from_list(rows), data_collator=collate,
                processing_class=word_tokenizer(vocab))
            trainer.train()
    finally:
        patch.undo()
    print(f"GKD (fk loss): {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return {"losses": losses, "patched": patched}


if __name__ == "__main__":
    main()
