"""Deterministic runs: under ``torch.use_deterministic_algorithms(True)`` every op family gives
bit-identical results and gradients on repeated runs, on every backend here (cpu, torch, triton
under the interpreter).

No op accumulates through atomics or an order-dependent scatter: the kernels reduce each row in a
fixed order inside one program/task, the fused forms add their chunks' weight gradients one chunk
after another, and the one Triton atomic (``tl.atomic_max`` of an integer error code in the sparse
kernel) is order-independent. On the CPU torch's scatters are deterministic anyway, so these tests
mainly guard the contract (a nondeterministic op under the flag raises, which would fail here)
and run again on a GPU in tests/test_gpu.py.
"""

import pytest
import torch
from helpers import SINKHORN_BACKENDS
from reference import logits

import fdiv_kernels as fk
import fdiv_kernels.distributed as fkd

N, V, H = 7, 37, 16


@pytest.fixture(autouse=True)
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _leaf(shape, seed, scale=2.0):
    return logits(shape, torch.float32, seed=seed, scale=scale).requires_grad_(True)


def _run(fn, leaves_of):
    """The outputs and the gradients of fresh leaves, as plain tensors."""
    leaves = leaves_of()
    outs = fn(*leaves)
    outs = [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,)) if o is not None]
    total = sum((o.float() * (1.0 + torch.arange(o.numel()).reshape(o.shape))).sum()
                for o in outs if o.requires_grad)
    grads = torch.autograd.grad(total, [x for x in leaves if x.requires_grad])
    return [o.detach() for o in outs] + list(grads)


def _assert_repeatable(fn, leaves_of, runs=3):
    first = _run(fn, leaves_of)
    for _ in range(runs - 1):
        again = _run(fn, leaves_of)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "a repeated run differs"


LABELS = torch.tensor([3, -100, 0, 36, 5, -100, 12])


@pytest.mark.parametrize("kind, kw", [("kl", {}), ("reverse_kl", {}), ("js", {"beta": 0.3}),
                                      ("alpha", {"alpha": 0.5}), ("renyi", {"alpha": 2.0}),
                                      ("cauchy_schwarz", {})])
def test_divergence(kind, kw, backend):
    _assert_repeatable(
        lambda s, t: fk.divergence(s, t, kind, labels=LABELS, backend=backend, **kw),
        lambda: (_leaf((N, V), 1), _leaf((N, V), 2)))


def test_stats(backend):
    def fn(x):
        st = fk.softmax_stats(x, LABELS, temperature=0.7, backend=backend)
        return (fk.token_logprobs(x, LABELS, backend=backend), fk.entropy(x, backend=backend),
                fk.logsumexp(x, backend=backend), *st)

    _assert_repeatable(fn, lambda: (_leaf((N, V), 3),))


def test_sparse_divergence(backend):
    g = torch.Generator().manual_seed(4)
    ids = torch.stack([torch.randperm(V, generator=g)[:5] for _ in range(N)])
    lp = torch.log_softmax(logits((N, 5), torch.float32, seed=5), -1) - 0.2
    _assert_repeatable(
        lambda s: fk.sparse_divergence(s, ids, lp, "reverse_kl", labels=LABELS, backend=backend),
        lambda: (_leaf((N, V), 6),))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fused_forms(backend):
    def fn(hs, ws, ht, wt):
        g = torch.Generator().manual_seed(7)
        ids = torch.stack([torch.randperm(V, generator=g)[:5] for _ in range(N)])
        lp = torch.log_softmax(logits((N, 5), torch.float32, seed=8), -1) - 0.2
        kw = {"chunk_size": 3, "backend": backend}
        return (fk.fused_linear_divergence(hs, ws, ht, wt, "js", labels=LABELS, ce_weight=0.1,
                                           **kw),
                *fk.fused_linear_token_logprobs(hs, ws, LABELS, return_entropy=True, **kw),
                fk.fused_linear_sparse_divergence(hs, ws, ids, lp, "kl", labels=LABELS, **kw))

    _assert_repeatable(fn, lambda: (_leaf((N, H), 9), _leaf((V, H), 10, 0.3),
                                    _leaf((N, H), 11), _leaf((V, H), 12, 0.3)))


# The implicit gradient runs its adjoint solve on the cpu backend (the interpreter is slow).
SINKHORN_CASES = [(b, "envelope") for b in SINKHORN_BACKENDS] + [("cpu", "implicit")] * (
    "cpu" in SINKHORN_BACKENDS)


@pytest.mark.parametrize("sinkhorn_backend, grad", SINKHORN_CASES)
def test_sinkhorn(sinkhorn_backend, grad):
    def fn(x, y):
        r = fk.sinkhorn(x=x, y=y, epsilon=0.1, cost_fn="sqeuclidean", grad=grad,
                        backend=sinkhorn_backend, max_iter=20, tol=1e-5)
        # The value and the potentials, each differentiated (grad="implicit" through f and g too).
        return r.value, r.f, r.g

    _assert_repeatable(fn, lambda: (_leaf((2, 6, 3), 13, 1.0), _leaf((2, 5, 3), 14, 1.0)), runs=2)


def test_vocab_parallel_one_rank():
    def fn(s, t):
        return (fkd.vocab_parallel_divergence(s, t, "js", beta=0.3, labels=LABELS),
                fkd.vocab_parallel_token_logprobs(s, LABELS), fkd.vocab_parallel_entropy(t),
                fkd.vocab_parallel_logsumexp(s))

    _assert_repeatable(fn, lambda: (_leaf((N, V), 15), _leaf((N, V), 16)))
