"""Paths of the sparse-divergence CPU kernel and of the fused form that their speed rests on: the
"bucket" tail's off-support mass taken in the normalizer's read of the row (rows of several
4096-column blocks whose running max moves, where that sum is rescaled), the forward that
writes the student gradient over the logits (the fused form's chunk buffer), and the fused
form's chunk sizing from a memory budget."""

import pytest
import torch
from helpers import assert_close, available_backends
from reference import logits, sparse_divergence_with_grads, sparse_teacher, transform_logits

import fdiv_kernels as fk
from fdiv_kernels.fused_linear._sparse import CPU_CHUNK_BYTES, cpu_chunk_rows

needs_cpu = pytest.mark.skipif("cpu" not in available_backends("sparse_divergence_fwd"),
                               reason="the C++ extension is not built")


@needs_cpu
@pytest.mark.parametrize("transform", [{}, {"student_softcap": 20.0, "student_logit_scale": 0.9}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bucket_tail_over_many_blocks(dtype, transform):
    """A student whose support holds most of its mass (its own top-k plus a few) over rows of
    3 blocks and a tail, with the row max rising block after block (the off-support sum is
    rescaled with the normalizer) and, in one row, sitting in the last block: the tail from the
    fused read against the float64 definition, with both gradients."""
    n, v, k = 4, 3 * 4096 + 777, 24
    s = logits((n, v), seed=80, scale=1.0)
    s += torch.linspace(0, 6, v)  # the running max moves in every block
    s[1] = s[1].flip(0)  # this row's max is in the first block instead
    ids, lp = sparse_teacher((n, v), k, seed=81, top=True, student=s)
    s = s.scatter_add(-1, ids, torch.full(ids.shape, 9.0))  # ~0.99 of q on S
    # Row 2: its top logit 60+ above every earlier block (the block is redone against its own
    # max), the off-support mass still above the underflow fallback.
    s[2, ids[2, 0]] = 75.0
    s = s.to(dtype)
    x = s.float().clone().requires_grad_(True) if dtype == torch.float32 else (
        s.clone().requires_grad_(True))
    lp_ = lp.float().requires_grad_(True)
    out = fk.sparse_divergence(x, ids, lp_, "kl", tail="bucket", reduction="none",
                               backend="cpu", **transform)
    out.sum().backward()
    z = transform_logits(s.double(), transform.get("student_logit_scale", 1.0),
                         transform.get("student_softcap"))
    zr = z.clone().requires_grad_(True)
    rows, gs, gt = sparse_divergence_with_grads(zr, ids, lp.float(), "kl", tail="bucket")
    q = torch.softmax(z, -1).gather(-1, ids).sum(-1)
    assert (q > 0.5).all()  # the off-support path, not 1 - sum_S q
    tol = (2e-5, 2e-6) if dtype == torch.float32 else (1e-4, 1e-5)
    assert_close(out, rows, tol, "loss")
    assert_close(lp_.grad, gt, (2e-4, 1e-6), "teacher grad")
    if not transform:  # the reference's student is then the logits themselves
        assert_close(x.grad, gs, (2e-4, 1e-7) if dtype == torch.float32 else (1.6e-2, 1e-6),
                     "student grad")


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bucket_tail_with_support_on_block_edges(dtype):
    """Support columns on the first and last column of the row and of each 4096-column block, in
    runs of neighbours and alone in a block, holding all but ~1e-5 of the student's mass: the
    kernel sums each block apart around those columns, and a tail of 1e-5 taken as 1 - sum_S q
    in fp32 would be 1% off (a loss error of ~1e-3 through a teacher tail of 0.1). The loss and
    the student gradient against float64, with one row whose first block is all -inf."""
    n, v = 3, 3 * 4096 + 5
    edges = [0, 1, 4095, 4096, 4097, 8190, 8191, 8192, 12287, 12288, v - 2, v - 1]
    s = logits((n, v), seed=82, scale=1.0)
    g = torch.Generator().manual_seed(83)
    rows = []
    for i in range(n):
        extra = torch.randperm(v, generator=g)[:20]
        extra = extra[~torch.isin(extra, torch.tensor(edges))][:12]
        rows.append(torch.cat([torch.tensor(edges), extra])[torch.randperm(24, generator=g)])
    ids = torch.stack(rows)
    _, lp = sparse_teacher((n, v), ids.shape[1], seed=84, mass=0.9)
    s = s.scatter_add(-1, ids, torch.full(ids.shape, 16.0))
    s[2, :4096] = float("-inf")
    s[2, ids[2][ids[2] < 4096]] = 20.0  # the support there stays finite
    x = s.to(dtype).requires_grad_(True)
    out = fk.sparse_divergence(x, ids, lp.to(dtype), "kl", tail="bucket", reduction="none",
                               backend="cpu")
    out.sum().backward()
    zr = s.double().clone().requires_grad_(True)
    ref, gs, _ = sparse_divergence_with_grads(zr, ids, lp.to(dtype), "kl", tail="bucket")
    q_tail = 1 - torch.softmax(s.double(), -1).gather(-1, ids).sum(-1)
    assert (q_tail < 1e-4).all() and (q_tail > 1e-7).all()
    tol = (2e-5, 1e-7) if dtype == torch.float32 else (1e-9, 1e-12)
    assert_close(out, ref, tol, "loss")
    assert_close(x.grad, gs, (2e-4, 1e-7) if dtype == torch.float32 else (1e-8, 1e-12),
                 "student grad")


@needs_cpu
@pytest.mark.parametrize("tail", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_forward_is_the_forward(tail, dtype):
    """sparse_divergence_fwd_inplace_cpu writes, over its student, exactly the gradient the
    allocating forward returns, and the same loss, teacher gradient and stats (bit for bit),
    with the logit transforms on, padding and an ignored row."""
    n, v, k = 5, 4096 + 301, 8
    s = logits((n, v), seed=82).to(dtype)
    ids, lp = sparse_teacher((n, v), k, seed=83, mass=0.8)
    support = torch.ones(n, k, dtype=torch.bool)
    support[2, 5:] = False
    valid = torch.tensor([True, True, False, True, True])
    args = (ids, lp.float(), support, valid, 1, False, 0.3, 0.8, tail, 1.5, 1e-4, 0.9, 25.0)
    loss, gs, gt, stats = torch.ops.fdiv.sparse_divergence_fwd_cpu(s, *args, True, True)
    buf = s.clone()
    loss2, gt2, stats2 = torch.ops.fdiv.sparse_divergence_fwd_inplace_cpu(buf, *args, True)
    for a, b in ((loss, loss2), (gs, buf), (gt, gt2), (stats, stats2)):
        assert torch.equal(a, b)


def test_fused_chunks_from_the_budget():
    """The fused form's CPU chunk: the budget's rows (one (chunk, V) fp32 buffer in place, two
    otherwise), then equal chunks; never 0 rows, never more rows than there are."""
    v = 32000
    one = CPU_CHUNK_BYTES // (4 * v)
    assert cpu_chunk_rows(1024, v, 1, 32 << 20) == 256  # at a 262-row budget: 4 x 256
    assert cpu_chunk_rows(100, v, 1) == 100
    assert cpu_chunk_rows(1024, v, 2) <= one // 2
    assert cpu_chunk_rows(5, 10**9, 2) == 1
    assert cpu_chunk_rows(0, v, 1) == 1
    for m in (1, 7, 263, 1000, 4097):
        c = cpu_chunk_rows(m, v, 1)
        assert 1 <= c <= min(m, one)
        chunks = -(-m // c)
        assert chunks == -(-m // min(m, one))  # no more chunks than the budget needs


@needs_cpu
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_fused_in_place_matches_chunked_allocating(ce_weight):
    """The fused form on the cpu backend (in place without ce_weight) gives what the torch
    backend gives, at the default chunk and at 3-row chunks, with ignored rows."""
    n, h, v, k = 13, 16, 700, 6
    g = torch.Generator().manual_seed(84)
    hs = torch.randn(n, h, generator=g)
    ws = torch.randn(v, h, generator=g) / 4
    ids, lp = sparse_teacher((n, v), k, seed=85, mass=0.85)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[2, 9]] = -100
    outs = []
    for backend, chunk in (("torch", None), ("cpu", None), ("cpu", 3)):
        hh, ww = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        loss = fk.fused_linear_sparse_divergence(hh, ww, ids, lp.float(), "js", beta=0.3,
                                                 labels=labels, ce_weight=ce_weight,
                                                 chunk_size=chunk, backend=backend)
        loss.backward()
        outs.append((loss.detach(), hh.grad, ww.grad))
    for other in outs[1:]:
        for a, b, what in zip(outs[0], other, ("loss", "d hidden", "d weight")):
            assert_close(b, a, (2e-5, 1e-6), what)
