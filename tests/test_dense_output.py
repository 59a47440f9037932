"""The C++ CPU kernels' (N, V) gradients at sizes that take the huge-page allocation (>= 16 MiB,
csrc/cpu/dense_output.cpp): the values match the float64 reference, the tensor starts on a 2 MiB
boundary when the kernel can give huge pages, and it behaves as a gradient (accumulation, save,
shared memory); FDIV_KERNELS_HUGEPAGES=0 turns the allocation back into a plain at::empty."""

import io
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close, available_backends, grad_tol
from reference import (
    divergence_with_grads,
    logits,
    softmax_stats_rows,
    sparse_divergence_with_grads,
    sparse_teacher,
)

import fdiv_kernels as fk

pytestmark = pytest.mark.skipif("cpu" not in available_backends("divergence_fwd"),
                                reason="the C++ CPU extension is not built")

N, V = 64, 65536  # fp32: exactly 16 MiB, the smallest size that takes the huge-page path
HUGE = 2 << 20
TOL = (1e-4, 1e-7)


def _free_huge_blocks() -> int:
    total = 0
    with open("/proc/buddyinfo") as f:
        for line in f:
            counts = [int(c) for c in line.split("zone", 1)[1].split()[1:]]
            total += sum(c << (k - 9) for k, c in enumerate(counts) if k >= 9)
    return total


def _huge_pages_expected() -> bool:
    """THP not disabled, and far more free 2 MiB blocks than a 16 MiB gradient needs (the
    allocation checks the same count and falls back to 4 KiB pages when it is short)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return False
    return ("[never]" not in mode and os.environ.get("FDIV_KERNELS_HUGEPAGES") != "0"
            and _free_huge_blocks() >= 64)


def _check_layout(g: torch.Tensor) -> None:
    assert g.is_contiguous() and g.storage_offset() == 0
    if _huge_pages_expected():
        assert g.data_ptr() % HUGE == 0, "a >= 16 MiB gradient should start on a 2 MiB boundary"


def test_token_logprobs_grad():
    x = logits((N, V), seed=1).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    w = torch.randn(N, generator=torch.Generator().manual_seed(3))
    (fk.token_logprobs(x, y, backend="cpu") * w).sum().backward()
    _check_layout(x.grad)
    x64 = x.detach().double().requires_grad_(True)
    (softmax_stats_rows(x64, y)[2] * w.double()).sum().backward()
    assert_close(x.grad, x64.grad, grad_tol(TOL, x64.grad), "d token_logprobs / d x")


@pytest.mark.parametrize("kind,kw", [("kl", {}), ("renyi", {"alpha": 0.5})])
def test_divergence_grads(kind, kw):
    s = logits((N, V), seed=4).requires_grad_(True)
    t = logits((N, V), seed=5).requires_grad_(True)
    fk.divergence(s, t, kind, reduction="sum", backend="cpu", **kw).backward()
    for g in (s.grad, t.grad):
        _check_layout(g)
    _, gs, gt = divergence_with_grads(s, t, kind, kw.get("alpha"))
    assert_close(s.grad, gs, grad_tol(TOL, gs), f"{kind}: d / d student")
    assert_close(t.grad, gt, grad_tol(TOL, gt), f"{kind}: d / d teacher")


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sparse_divergence_grad(tail):
    s = logits((N, V), seed=6).requires_grad_(True)
    ids, lp = sparse_teacher((N, V), 8, seed=7)
    fk.sparse_divergence(s, ids, lp.float(), "kl", tail=tail, reduction="sum",
                         backend="cpu").backward()
    _check_layout(s.grad)
    _, gs, _ = sparse_divergence_with_grads(s, ids, lp, "kl", tail=tail)
    assert_close(s.grad, gs, grad_tol(TOL, gs), f"sparse {tail}: d / d student")


def test_behaves_as_a_gradient():
    x = logits((N, V), seed=8).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(9))
    fk.token_logprobs(x, y, backend="cpu").sum().backward()
    first = x.grad.clone()
    fk.token_logprobs(x, y, backend="cpu").sum().backward()  # accumulates in place
    assert_close(x.grad, 2 * first, (0, 0), "accumulated gradient")
    buf = io.BytesIO()
    torch.save(x.grad, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), x.grad)
    x.grad.share_memory_()
    assert x.grad.is_shared() and torch.equal(x.grad, 2 * first)
    x.grad = None  # frees the allocation through the tensor's deleter


def test_env_switch_turns_it_off():
    code = (
        "import torch, fdiv_kernels as fk\n"
        f"x = torch.randn({N}, {V}, requires_grad=True)\n"
        "fk.token_logprobs(x, torch.zeros(x.shape[0], dtype=torch.long), backend='cpu')"
        ".sum().backward()\n"
        "print(x.grad.data_ptr() % (2 << 20), x.grad.untyped_storage().resizable())\n"
    )
    env = dict(os.environ, FDIV_KERNELS_HUGEPAGES="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    # Plain at::empty: a glibc mmap chunk (never 2 MiB-aligned past its header), resizable.
    assert out[0] != "0" and out[1] == "True"
