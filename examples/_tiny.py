"""Tiny random causal LMs for the examples, built from a config: nothing downloaded."""

from __future__ import annotations

import torch


def tiny_causal_lm(seed: int, hidden: int, layers: int, vocab: int, peaked: float = 1.0):
    """A Qwen2-style causal LM with random weights; ``peaked`` scales its lm head so a random
    teacher has confident, structured next-token distributions worth distilling."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                      num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(peaked)
    return model


def random_batches(n: int, batch: int, length: int, vocab: int, prompt: int, seed: int = 0):
    """Token batches with the first ``prompt`` positions' labels ignored (-100), as in SFT/KD."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, length), generator=g)
        labels = ids.clone()
        labels[:, :prompt] = -100
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def steps_and_vocab(doc: str, argv: list[str] | None) -> tuple[int, int]:
    """The examples' command line: ``--steps N`` (default 20) or ``--smoke`` (3 tiny steps, what CI
    runs); returns (steps, vocabulary size)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="3 tiny steps (CI)")
    args = ap.parse_args(argv)
    return (3, 128) if args.smoke else (args.steps, 1024)
