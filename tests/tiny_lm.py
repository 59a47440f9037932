"""Tiny random causal LMs and batches for the integration tests (nothing downloaded)."""

import torch


def tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_lm(seed: int, hidden: int = 32, layers: int = 1, vocab: int = 96):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg)


def lm_batches(n: int, length: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    labels = ids.clone()
    for i in range(n):
        labels[i, : 2 + (i * 3) % (length - 3)] = -100     # prompts of different lengths
    return [{"input_ids": ids[i].tolist(), "attention_mask": [1] * length,
             "labels": labels[i].tolist()} for i in range(n)]


def collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
