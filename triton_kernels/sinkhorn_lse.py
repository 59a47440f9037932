"""Batched Sinkhorn potential updates: one log-sum-exp per row over the other side's points.

    out[b, i] = LSE_j(h[b, j] - c(b, i, j) * eps_inv[b])

Grid (problems, row tiles). Each program holds BLOCK_N rows and streams the other side in
BLOCK_M tiles, getting each cost tile from ``cost_tile`` (on the fly from the points, or from a
dense cost read in any order; shared with the whole-solve kernel of ``sinkhorn_solve``), and
folds it into a running (max, sum) with the shared ``online_update``. A problem whose ``active``
flag is 0 (converged) streams nothing and writes -inf, which the caller masks out.
"""

import torch
import triton
import triton.language as tl

from fdiv_kernels.core import _ids
from fdiv_kernels.triton_kernels.ids import COSINE, DOT, EUCLIDEAN, L1, SQEUCLIDEAN
from fdiv_kernels.triton_kernels.online_softmax import finalize_lse, online_update

BLOCK_N = 32
BLOCK_M = 32
MAX_BLOCK_D = 32


@triton.jit
def cost_tile(
    o_ptr, s_ptr, c_ptr, offs_j, offs_i, mask_j, mask_i, D,
    soj, sod, ssi, ssd, scj, sci,
    KIND: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The fp32 (BLOCK_M, BLOCK_N) tile c[j, i] between the other side's points j (``o_ptr``) and
    this side's points i (``s_ptr``), pointers already at the problem; or, ``DENSE``, loaded from
    ``c_ptr`` with strides (scj, sci), any order, so a transposed read needs no copy.

    sqeuclidean |o|^2 + |s|^2 - 2 <o, s> (clamped at 0; euclidean its sqrt), l1 sum_d |o - s|
    (a broadcast (BLOCK_M, BLOCK_D, BLOCK_N) tile: keep it small), dot -<o, s>, cosine
    1 - <o, s> on points the launcher normalized. Entries outside the masks are meaningless:
    the caller masks them.
    """
    if DENSE:
        c = tl.load(c_ptr + offs_j[:, None] * scj + offs_i[None, :] * sci,
                    mask=mask_j[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        on = tl.zeros([BLOCK_M], tl.float32)
        sn = tl.zeros([BLOCK_N], tl.float32)
        for off_d in range(0, D, BLOCK_D):
            offs_d = off_d + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            ot = tl.load(o_ptr + offs_j[:, None] * soj + offs_d[None, :] * sod,
                         mask=mask_j[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            st = tl.load(s_ptr + offs_d[:, None] * ssd + offs_i[None, :] * ssi,
                         mask=mask_d[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
            if KIND == L1:
                acc += tl.sum(tl.abs(ot[:, :, None] - st[None, :, :]), 1)
            else:
                acc += tl.dot(ot, st, input_precision="ieee")
                if KIND == SQEUCLIDEAN or KIND == EUCLIDEAN:
                    on += tl.sum(ot * ot, 1)
                    sn += tl.sum(st * st, 0)
        if KIND == SQEUCLIDEAN or KIND == EUCLIDEAN:
            # Rounding negatives clamped at 0 with a where, not tl.maximum, which drops a NaN:
            # a NaN point must make its problem NaN (then reported not converged), as in torch.
            sq = on[:, None] + sn[None, :] - 2.0 * acc
            c = tl.where(sq < 0.0, 0.0, sq)
            if KIND == EUCLIDEAN:
                c = tl.sqrt(c)
        elif KIND == L1:
            c = acc
        elif KIND == DOT:
            c = -acc
        elif KIND == COSINE:  # on points the launcher normalized
            c = 1.0 - acc
    return c


@triton.jit
def _sinkhorn_lse_kernel(
    x_ptr, y_ptr, c_ptr, h_ptr, eps_inv_ptr, active_ptr, out_ptr,
    N, M, D,
    sxb, sxn, sxd, syb, sym, syd, scb, scn, scm, shb, sob,
    KIND: tl.constexpr, DENSE: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_i = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_i = offs_i < N
    eps_inv = tl.load(eps_inv_ptr + pid_b).to(tl.float32)
    m_len = M
    if HAS_ACTIVE:
        act = tl.load(active_ptr + pid_b)
        m_len = tl.where(act != 0, M, 0)
    # Tiles are (other side j, this side i): online_update reduces over axis 0, per row i.
    run_m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_s = tl.zeros([BLOCK_N], tl.float32)
    for off_j in range(0, m_len, BLOCK_M):
        offs_j = off_j + tl.arange(0, BLOCK_M)
        mask_j = offs_j < M
        h = tl.load(h_ptr + pid_b * shb + offs_j, mask=mask_j, other=float("-inf")).to(tl.float32)
        c = cost_tile(y_ptr + pid_b * syb, x_ptr + pid_b * sxb, c_ptr + pid_b * scb,
                      offs_j, offs_i, mask_j, mask_i, D, sym, syd, sxn, sxd, scm, scn,
                      KIND, DENSE, BLOCK_M, BLOCK_N, BLOCK_D)
        v = h[:, None] - c * eps_inv
        v = tl.where(mask_j[:, None], v, float("-inf"))
        run_m, run_s = online_update(run_m, run_s, v)
    # A row with nothing folded in (all -inf, or a skipped problem) is -inf, without log(0).
    # A NaN sum stays NaN (a NaN problem is then reported not converged).
    seen = (run_s > 0) | (run_m == float("inf")) | (run_s != run_s)  # noqa: PLR0124
    out = tl.where(seen, finalize_lse(run_m, tl.where(seen, run_s, 1.0)), float("-inf"))
    tl.store(out_ptr + pid_b * sob + offs_i, out, mask=mask_i)


def sinkhorn_lse(x, y, cost, h, eps_inv, kind: int, transpose: bool, active):
    """Launch over (B, cdiv(n, BLOCK_N)); returns (B, n) fp32 (fp64 inputs are computed in fp32)."""
    B, M = h.shape
    h = h.contiguous()
    if cost is not None:
        c = cost.transpose(1, 2) if transpose else cost
        N = c.shape[1]
        dense = True
        xa = ya = c  # unused pointers
        D = 1
        sx = sy = (0, 0, 0)
        sc = (c.stride(0), c.stride(1), c.stride(2))
    else:
        if kind == _ids.COSINE:
            x = torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-12)
            y = torch.nn.functional.normalize(y.float(), dim=-1, eps=1e-12)
        xa, ya, c = x, y, x
        N, D = x.shape[1], x.shape[2]
        dense = False
        sx, sy, sc = x.stride(), y.stride(), (0, 0, 0)
    out = torch.empty(B, N, dtype=torch.float32, device=h.device)
    act = active.to(torch.int8).contiguous() if active is not None else out
    block_d = max(16, min(MAX_BLOCK_D, triton.next_power_of_2(max(D, 1))))
    grid = (B, triton.cdiv(N, BLOCK_N))
    _sinkhorn_lse_kernel[grid](
        xa, ya, c, h, eps_inv.float().contiguous(), act, out,
        N, M, D, *sx, *sy, *sc, h.stride(0), out.stride(0),
        KIND=kind, DENSE=dense, HAS_ACTIVE=active is not None,
        BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, BLOCK_D=block_d,
    )
    return out.to(h.dtype)


def launch_variants(sizes=((10, 12), (300, 200)), dims=(3, 64),
                    dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)):
    """Every launch of ``sinkhorn_lse`` per cost kind (on the fly, and a dense cost read straight
    or transposed) x convergence mask x dtype x point dimension, as (labels, call) on CPU inputs
    of two problems (one would specialize the batch stride): see ``divergence.launch_variants``."""
    for n, m in sizes:
        for dt in dtypes:
            ht = torch.float64 if dt == torch.float64 else torch.float32  # the potentials' dtype
            for kind in [*_ids.COSTS.values(), "dense", "dense_t"]:
                for D in dims if not isinstance(kind, str) else (None,):
                    for masked in (True, False):
                        def call(n=n, m=m, dt=dt, ht=ht, kind=kind, D=D, masked=masked):
                            h = torch.zeros(2, m, dtype=ht)
                            active = torch.ones(2, dtype=torch.bool) if masked else None
                            if isinstance(kind, str):
                                shape = (2, m, n) if kind == "dense_t" else (2, n, m)
                                sinkhorn_lse(None, None, torch.rand(shape, dtype=dt), h,
                                             torch.ones(2, dtype=ht), _ids.SQEUCLIDEAN,
                                             kind == "dense_t", active)
                            else:
                                x = torch.randn(2, n, D, dtype=dt)
                                y = torch.randn(2, m, D, dtype=dt)
                                sinkhorn_lse(x, y, None, h, torch.ones(2, dtype=ht), kind, False,
                                             active)
                        yield {"cost": kind, "dtype": str(dt).removeprefix("torch."), "D": D,
                               "n": n, "m": m, "masked": masked}, call
