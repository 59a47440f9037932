"""The C++ CPU kernels' (N, V) gradients are ordinary torch tensors, at sizes where a
gradient is large (16 MiB): contiguous from the start of their own resizable storage, so that
what FSDP and friends do to a gradient (free its storage with resize_(0)) works."""

import pytest
import torch
from conftest import BACKENDS
from reference import logits, sparse_teacher

import fdiv_kernels as fk

pytestmark = pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ CPU extension is not built")

N, V = 64, 65536  # fp32: 16 MiB, a large gradient


def _grads(op):
    x = logits((N, V), seed=1).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    if op == "token_logprobs":
        fk.token_logprobs(x, y, backend="cpu").sum().backward()
        return [x.grad]
    if op == "sparse_divergence":
        ids, lp = sparse_teacher((N, V), 8, seed=3)
        fk.sparse_divergence(x, ids, lp.float(), "kl", backend="cpu").backward()
        return [x.grad]
    t = logits((N, V), seed=4).requires_grad_(True)
    kw = {"alpha": 0.5} if op == "renyi" else {}
    fk.divergence(x, t, op, backend="cpu", **kw).backward()
    return [x.grad, t.grad]


@pytest.mark.parametrize("op", ["token_logprobs", "js", "renyi", "sparse_divergence"])
def test_gradient_storage_is_ordinary(op):
    for g in _grads(op):
        assert g.is_contiguous() and g.storage_offset() == 0
        storage = g.untyped_storage()
        assert storage.nbytes() == g.numel() * g.element_size()
        assert storage.resizable()
        storage.resize_(0)  # as FSDP frees a gradient's memory
        assert storage.nbytes() == 0
