"""Reproductions of the defects found probing the newest forms, each kept as a test: zero-row
batches through every public op and module, custom-kind ids never reused, generators checked at
registration. (The sparse tails and Renyi above alpha = 1: test_hardening_numerics.py.)"""

import pytest
import torch
from reference import logits

import fdiv_kernels as fk
import fdiv_kernels.distributed as fkd

V, H, K = 11, 4, 3


def _leaf(*shape, seed=0):
    return logits(shape, torch.float32, seed=seed).requires_grad_(True)


def _zero_row_calls():
    """(name, thunk) for every public op and nn module on a zero-row batch."""
    s, t = _leaf(0, V), _leaf(0, V, seed=1)
    h, w, ht, wt = _leaf(0, H), _leaf(V, H, seed=2), _leaf(0, H + 1, seed=3), _leaf(V, H + 1, seed=4)
    ids, lp = torch.zeros(0, K, dtype=torch.int64), torch.zeros(0, K)
    lab = torch.zeros(0, dtype=torch.int64)
    calls = {
        "divergence": lambda: fk.divergence(s, t, "js"),
        "divergence renyi": lambda: fk.divergence(s, t, "renyi", alpha=2.0),
        "divergence cauchy_schwarz": lambda: fk.divergence(s, t, "cauchy_schwarz"),
        "sparse_divergence": lambda: fk.sparse_divergence(s, ids, lp, "kl"),
        "token_logprobs": lambda: fk.token_logprobs(s, lab),
        "entropy": lambda: fk.entropy(s),
        "logsumexp": lambda: fk.logsumexp(s, -1),
        "softmax_stats": lambda: fk.softmax_stats(s, lab).lse,
        "fused_linear_divergence": lambda: fk.fused_linear_divergence(h, w, ht, wt, "kl"),
        "fused_linear_sparse_divergence":
            lambda: fk.fused_linear_sparse_divergence(h, w, ids, lp, "kl"),
        "fused_linear_token_logprobs": lambda: fk.fused_linear_token_logprobs(h, w, lab),
        "topk_logprobs": lambda: fk.topk_logprobs(s, K).logprobs,
        # Forward-only (a teacher's): detached inputs.
        "fused_linear_topk_logprobs":
            lambda: fk.fused_linear_topk_logprobs(h.detach(), w.detach(), K).logprobs,
        "vocab_parallel_divergence": lambda: fkd.vocab_parallel_divergence(s, t, "js"),
        "vocab_parallel_token_logprobs": lambda: fkd.vocab_parallel_token_logprobs(s, lab),
        "vocab_parallel_entropy": lambda: fkd.vocab_parallel_entropy(s),
        "vocab_parallel_logsumexp": lambda: fkd.vocab_parallel_logsumexp(s),
        "vocab_parallel_fused_linear_divergence":
            lambda: fkd.vocab_parallel_fused_linear_divergence(h, w, ht, wt, "kl"),
        "vocab_parallel_sparse_divergence":
            lambda: fkd.vocab_parallel_sparse_divergence(s, ids, lp, "kl"),
        "vocab_parallel_fused_linear_sparse_divergence":
            lambda: fkd.vocab_parallel_fused_linear_sparse_divergence(h, w, ids, lp, "kl"),
        "vocab_parallel_topk_logprobs": lambda: fkd.vocab_parallel_topk_logprobs(s, K)[1],
        "nn.FDivergenceLoss": lambda: fk.nn.FDivergenceLoss("js")(s, t),
        "nn.FusedLinearDivergenceLoss": lambda: fk.nn.FusedLinearDivergenceLoss("kl")(h, w, ht, wt),
        "nn.SparseDivergenceLoss": lambda: fk.nn.SparseDivergenceLoss("kl")(s, ids, lp),
    }
    return calls


ZERO_ROW = _zero_row_calls()


def test_every_public_op_is_walked():
    """The walk below covers every public function that takes rows (a new op must join it)."""
    row_ops = {"divergence", "sparse_divergence", "token_logprobs", "entropy", "logsumexp",
               "softmax_stats", "fused_linear_divergence", "fused_linear_sparse_divergence",
               "fused_linear_token_logprobs", "topk_logprobs", "fused_linear_topk_logprobs"}
    public = {n for n in fk.__all__ if callable(getattr(fk, n)) and n[0].islower()}
    assert row_ops <= set(ZERO_ROW)
    assert public - {"describe", "not_supported_reasons", "register_divergence",
                     "unregister_divergence", "sinkhorn", "sinkhorn_divergence"} <= row_ops
    modules = {n for n in dir(fk.nn) if n.endswith("Loss") and not n.startswith("_")}
    assert {f"nn.{n}" for n in modules} - {"nn.SinkhornDistillationLoss"} <= set(ZERO_ROW)


@pytest.mark.parametrize("name", list(ZERO_ROW))
def test_zero_rows(name):
    """A zero-row batch gives an empty (or zero) result that backpropagates."""
    out = ZERO_ROW[name]()
    assert out.numel() == 0 or float(out.detach()) == 0.0
    if out.requires_grad:
        out.sum().backward()


def test_custom_kind_ids_are_never_reused():
    """A pending backward (the fused form's reduction="none" recomputes its chunks from the kind's
    base id) keeps its kind's gradient after that kind is unregistered and another registered."""
    n = 5
    hs, ws, ht, wt = (_leaf(n, H), _leaf(V, H, seed=1), _leaf(n, H, seed=2),
                      _leaf(V, H, seed=3))
    fk.register_divergence("hard_ka", lambda r: (r - 1) ** 2, lambda r: 2 * (r - 1))
    try:
        ref = fk.fused_linear_divergence(hs, ws, ht, wt, "hard_ka", reduction="none",
                                         backend="torch")
        (ref_grad,) = torch.autograd.grad(ref.sum(), ws)
        out = fk.fused_linear_divergence(hs, ws, ht, wt, "hard_ka", reduction="none",
                                         backend="torch")
    finally:
        fk.unregister_divergence("hard_ka")
    fk.register_divergence("hard_kb", lambda r: torch.xlogy(r, r), lambda r: torch.log(r) + 1)
    try:
        (grad,) = torch.autograd.grad(out.sum(), ws)
        kb = fk.fused_linear_divergence(hs, ws, ht, wt, "hard_kb", reduction="none",
                                        backend="torch")
    finally:
        fk.unregister_divergence("hard_kb")
    assert torch.equal(grad, ref_grad)
    assert not torch.allclose(kb, ref.detach())
    with pytest.raises(ValueError, match="kind must be one of"):
        fk.divergence(_leaf(2, V), _leaf(2, V), "hard_ka")
    with pytest.raises(KeyError, match="hard_ka"):
        fk.unregister_divergence("hard_ka")


@pytest.mark.parametrize("f, fp, match", [
    (lambda t: (t - 1) ** 2 + 0.5, lambda t: 2 * (t - 1), r"f\(1\) must be 0"),
    (lambda t: t * torch.log(t), lambda t: torch.log(t) + 1, r"f\(0.0\) is NaN"),
    (lambda t: (t - 1) ** 2 / (t - 3), lambda t: 2 * (t - 1) / (t - 3) - (t - 1) ** 2 /
     (t - 3) ** 2, "finite"),
    (lambda t: torch.xlogy(t, t), lambda t: torch.log(t) + 1, None),
])
def test_register_checks_the_generator(f, fp, match):
    if match is None:
        fk.register_divergence("hard_ok", f, fp)
        fk.unregister_divergence("hard_ok")
        return
    with pytest.raises(ValueError, match=match):
        fk.register_divergence("hard_bad", f, fp)
    assert "hard_bad" not in fk.kinds._registry.all_kinds()
