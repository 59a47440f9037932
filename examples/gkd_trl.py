"""TRL's GKD trainer for a few steps, plain and on fdiv_kernels (``apply_fk_to_trl()``: the loss
from both models' hidden states and lm heads, no (B, T, V) logits); prints both runs' losses.

    python examples/gkd_trl.py                      # 20 steps
    python examples/gkd_trl.py --smoke              # 3 steps (what CI runs)

Tiny randomly initialized Qwen2 teacher and student and a word-level tokenizer built in place:
nothing is downloaded. ``lmbda=0`` trains on the dataset's completions (no on-policy sampling),
which keeps the run deterministic; GKD's on-policy mode works the same with a chat dataset.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tiny import random_batches, steps_and_vocab, tiny_causal_lm  # noqa: E402

from fdiv_kernels.integrations.trl import apply_fk_to_trl  # noqa: E402


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def train(steps: int, vocab: int, swapped: bool) -> tuple[list[float], list[str]]:
    """GKD for ``steps`` steps, TRL as installed or with ``apply_fk_to_trl()``; its losses and
    what the patch rebound."""
    from datasets import Dataset

    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [{k: v[0].tolist() for k, v in b.items()}
            for b in random_batches(4 * steps, 1, 24, vocab, prompt=8)]

    def collate(batch):
        return {k: torch.tensor([r[k] for r in batch]) for k in batch[0]}

    patch = None
    if swapped:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # host packages' own deprecation warnings
            patch = apply_fk_to_trl()
    patched = patch.targets if patch is not None else []   # undo() below empties the handle
    losses = []

    class LoggedGKD(GKDTrainer):
        def compute_loss(self, *a, **k):
            loss = super().compute_loss(*a, **k)
            losses.append(loss.item())
            return loss

    try:
        with tempfile.TemporaryDirectory() as out:
            # fp32: GKDConfig's default bf16 rounds TRL's logits to bf16 (fk forms them in fp32
            # from the hidden states), which would make the two runs differ by that rounding.
            cfg = GKDConfig(output_dir=out, per_device_train_batch_size=4, max_steps=steps,
                            lmbda=0.0, beta=0.5, learning_rate=5e-3, logging_steps=1,
                            report_to=[], use_cpu=True, save_strategy="no", seed=0,
                            max_length=24, disable_tqdm=True, bf16=False, log_level="error")
            trainer = LoggedGKD(
                model=tiny_causal_lm(2, hidden=32, layers=1, vocab=vocab),
                teacher_model=tiny_causal_lm(1, hidden=64, layers=2, vocab=vocab, peaked=8.0),
                args=cfg, train_dataset=Dataset.from_list(rows), data_collator=collate,
                processing_class=word_tokenizer(vocab))
            trainer.train()
    finally:
        if patch is not None:
            patch.undo()
    return losses, patched


def main(argv: list[str] | None = None) -> dict:
    steps, vocab = steps_and_vocab(__doc__, argv)
    plain, _ = train(steps, vocab, swapped=False)
    swapped, patched = train(steps, vocab, swapped=True)
    print("patched:", ", ".join(patched))
    for i, (a, b) in enumerate(zip(plain, swapped)):
        print(f"step {i}: trl {a:.6f}  fk {b:.6f}")
    return {"plain": plain, "swapped": swapped, "losses": swapped, "patched": patched}


if __name__ == "__main__":
    main()
