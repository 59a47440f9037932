"""Batched log-domain Sinkhorn, each problem solved whole in one program of one launch.

The statement of record is ``fdiv_kernels.transport._solver.solve`` (its conventions, schedule,
checks and counts); this runs it per problem. With lr = LSE_j(lb_j + g_j / ev - C_ij / ev),
lc = LSE_i(la_i + f_i / ev - C_ij / ev) and t = tau ev, tau = rho / (rho + ev) (1: balanced):

    alternating  f = -t_a lr;  then g = -t_b lc (from the new f)
    symmetric    f = (f - t_a lr) / 2,  g = (g - t_b lc) / 2 (both from the old potentials)
    error        sum_i a_i |exp(f_i / ev + lr_i) - target_i| = sum_i |(P 1)_i - a_i target_i|
                 (+ the columns' when symmetric), target 1 or exp(-f_i / rho), zero-weight
                 points left out; NaN counts as +inf (never converged)

one iteration per eps-scaling level ev_k = max(eps, eps0 scaling^k) (the (levels, B) table of
``transport._solver.eps_schedule``, the one schedule every backend reads), then at eps until the
error, checked every
``check_every`` iterations from the row LSE of the next update, is <= tol or ``max_iter``
iterations ran. A converged problem stops on its own (a scalar while loop, no host sync).

Why: the per-update path (``sinkhorn_lse.py``) costs two launches and a few torch ops per iteration
and a host sync per check, whatever the size; one program does an iteration of a problem of a
few hundred points per side in microseconds. Cost tiles are recomputed from the points each
pass (``cost_tile``, shared with the per-update kernel) or read from the dense cost; f, g and the
LSE scratch live in global memory (a few KiB per problem, L2-resident), and a
``tl.debug_barrier()`` (bar.sync: orders the CTA's global writes for its own threads) separates
a pass that writes a vector from the next that reads it.
"""


import torch
import triton
import triton.language as tl

from fdiv_kernels.core import _ids
from fdiv_kernels.triton_kernels.online_softmax import finalize_lse, online_update
from fdiv_kernels.triton_kernels.sinkhorn_lse import MAX_BLOCK_D, cost_tile

# Tile side cap, and 8 warps: ptxas (sm_90, compiled offline) gives 110-190 registers per thread
# without spills for square 16..64 tiles of the dot-product costs, where 4 warps spill.
MAX_BLOCK = 64
NUM_WARPS = 8
# Elements of the l1 broadcast tile (BLOCK_M, BLOCK_D, BLOCK_N): 16 per thread at 8 warps
# (at 64 x 64, BLOCK_D 1 needs 128 registers where BLOCK_D 2 needs 254).
L1_TILE = 4096
# Elementwise passes (error, update) over f or g: one element per thread at 8 warps, so no
# replicated lane reads an element that another has already updated in place.
BLOCK_V = 256


@triton.jit
def _lse_pass(
    s_ptr, o_ptr, c_ptr, lo_ptr, po_ptr, out_ptr, scale, ev,
    N, M, D, ssi, ssd, soj, sod, sci, scj,
    KIND: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[i] = scale LSE_j(lo_j + po_j / ev - c_ij / ev) for this side's N points i, the other
    side's M points j streamed in BLOCK_M tiles (rows: s = x, o = y; columns: swapped)."""
    eps_inv = 1.0 / ev
    for off_i in range(0, N, BLOCK_N):
        offs_i = off_i + tl.arange(0, BLOCK_N)
        mask_i = offs_i < N
        run_m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        run_s = tl.zeros([BLOCK_N], tl.float32)
        for off_j in range(0, M, BLOCK_M):
            offs_j = off_j + tl.arange(0, BLOCK_M)
            mask_j = offs_j < M
            h = (tl.load(lo_ptr + offs_j, mask=mask_j, other=float("-inf"))
                 + tl.load(po_ptr + offs_j, mask=mask_j, other=0.0) / ev)
            c = cost_tile(o_ptr, s_ptr, c_ptr, offs_j, offs_i, mask_j, mask_i, D,
                          soj, sod, ssi, ssd, scj, sci, KIND, DENSE, BLOCK_M, BLOCK_N, BLOCK_D)
            v = tl.where(mask_j[:, None], h[:, None] - c * eps_inv, float("-inf"))
            run_m, run_s = online_update(run_m, run_s, v)
        # A row with nothing folded in is -inf, without log(0) (as the per-update kernel).
        # A NaN sum stays NaN (a NaN problem is then reported not converged).
        seen = (run_s > 0) | (run_m == float("inf")) | (run_s != run_s)  # noqa: PLR0124
        lse = tl.where(seen, finalize_lse(run_m, tl.where(seen, run_s, 1.0)), float("-inf"))
        tl.store(out_ptr + offs_i, scale * lse, mask=mask_i)


@triton.jit
def _marginal_error(p_ptr, lse_ptr, l_ptr, N, ev, rho, BLOCK: tl.constexpr):
    """sum_i [l_i > -inf] exp(l_i) |exp(p_i / ev + lse_i) - target_i|, NaN -> +inf."""
    acc = tl.zeros([BLOCK], tl.float32)
    rho_safe = tl.where(rho > 0, rho, 1.0)
    for off in range(0, N, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < N
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        lse = tl.load(lse_ptr + offs, mask=mask, other=0.0)
        lw = tl.load(l_ptr + offs, mask=mask, other=float("-inf"))
        marg = tl.exp(p / ev + lse)
        target = tl.where(rho > 0, tl.exp(-p / rho_safe), 1.0)
        acc += tl.where(lw > float("-inf"), tl.exp(lw) * tl.abs(marg - target), 0.0)
    err = tl.sum(acc, 0)
    return tl.where(err != err, float("inf"), err)  # noqa: PLR0124 (the NaN test)


@triton.jit
def _update(p_ptr, lse_ptr, N, t, SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr):
    """p = (p - t lse) / 2 (symmetric) or p = -t lse, elementwise (each thread reads its own)."""
    for off in range(0, N, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < N
        lse = tl.load(lse_ptr + offs, mask=mask, other=0.0)
        if SYMMETRIC:
            p = 0.5 * (tl.load(p_ptr + offs, mask=mask, other=0.0) - t * lse)
        else:
            p = -t * lse
        tl.store(p_ptr + offs, p, mask=mask)


@triton.jit
def _sinkhorn_solve_kernel(
    # data ptrs
    x_ptr, y_ptr, c_ptr, la_ptr, lb_ptr, evs_ptr, f_ptr, g_ptr, lr_ptr, lc_ptr,
    n_iter_ptr, err_ptr,
    # sizes and schedule
    B, N, M, D, levels, max_iter, check_every, eps, tol, rho_a, rho_b,
    # strides (f, g, la, lb, lr, lc are contiguous (B, N) / (B, M))
    sxb, sxn, sxd, syb, sym, syd, scb, scn, scm,
    KIND: tl.constexpr, DENSE: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    x_ptr += pid * sxb
    y_ptr += pid * syb
    c_ptr += pid * scb
    la_ptr += pid * N
    f_ptr += pid * N
    lr_ptr += pid * N
    lb_ptr += pid * M
    g_ptr += pid * M
    lc_ptr += pid * M
    ra = tl.where(rho_a > 0, rho_a, 1.0)  # tau = rho / (rho + ev), without a 0 / 0
    rb = tl.where(rho_b > 0, rho_b, 1.0)

    # One loop for the `levels` eps-scaling steps (no check, not counted), then the iterations
    # at eps; one body, so the row/column passes are written once.
    k = tl.full([], 0, tl.int32)
    it = tl.full([], 0, tl.int32)
    iters = tl.full([], 0, tl.int32)
    go = tl.full([], 1, tl.int1)
    while (k < levels) | ((it < max_iter) & go):
        scaled = k < levels
        ev = eps
        if scaled:
            ev = tl.load(evs_ptr + k * B + pid)
        ta = tl.where(rho_a > 0, rho_a / (ra + ev), 1.0) * ev
        tb = tl.where(rho_b > 0, rho_b / (rb + ev), 1.0) * ev
        # lr from g (symmetric: lc from f too): what the check and the update read.
        _lse_pass(x_ptr, y_ptr, c_ptr, lb_ptr, g_ptr, lr_ptr, 1.0, ev,
                  N, M, D, sxn, sxd, sym, syd, scn, scm, KIND, DENSE, BLOCK_X, BLOCK_Y, BLOCK_D)
        if SYMMETRIC:
            _lse_pass(y_ptr, x_ptr, c_ptr, la_ptr, f_ptr, lc_ptr, 1.0, ev,
                      M, N, D, sym, syd, sxn, sxd, scm, scn, KIND, DENSE, BLOCK_Y, BLOCK_X,
                      BLOCK_D)
        tl.debug_barrier()
        if (k >= levels) & (it % check_every == 0):
            err = _marginal_error(f_ptr, lr_ptr, la_ptr, N, ev, rho_a, BLOCK_V)
            if SYMMETRIC:
                err += _marginal_error(g_ptr, lc_ptr, lb_ptr, M, ev, rho_b, BLOCK_V)
            go = err > tol
        if go:
            _update(f_ptr, lr_ptr, N, ta, SYMMETRIC, BLOCK_V)
            if SYMMETRIC:
                _update(g_ptr, lc_ptr, M, tb, SYMMETRIC, BLOCK_V)
            else:
                tl.debug_barrier()  # the column pass reads the new f
                # g straight from the column pass, which does not read g.
                _lse_pass(y_ptr, x_ptr, c_ptr, la_ptr, f_ptr, g_ptr, -tb, ev,
                          M, N, D, sym, syd, sxn, sxd, scm, scn, KIND, DENSE, BLOCK_Y, BLOCK_X,
                          BLOCK_D)
        tl.debug_barrier()
        if scaled:
            k += 1
        else:
            iters += go.to(tl.int32)
            it += 1

    # The final error from fresh LSEs, as solve computes it (also for a converged problem).
    _lse_pass(x_ptr, y_ptr, c_ptr, lb_ptr, g_ptr, lr_ptr, 1.0, eps,
              N, M, D, sxn, sxd, sym, syd, scn, scm, KIND, DENSE, BLOCK_X, BLOCK_Y, BLOCK_D)
    if SYMMETRIC:
        _lse_pass(y_ptr, x_ptr, c_ptr, la_ptr, f_ptr, lc_ptr, 1.0, eps,
                  M, N, D, sym, syd, sxn, sxd, scm, scn, KIND, DENSE, BLOCK_Y, BLOCK_X, BLOCK_D)
    tl.debug_barrier()
    err = _marginal_error(f_ptr, lr_ptr, la_ptr, N, eps, rho_a, BLOCK_V)
    if SYMMETRIC:
        err += _marginal_error(g_ptr, lc_ptr, lb_ptr, M, eps, rho_b, BLOCK_V)
    tl.store(n_iter_ptr + pid, iters)
    tl.store(err_ptr + pid, err)


def _block(n: int) -> int:
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(n)))


def sinkhorn_solve(x, y, cost, log_a, log_b, f0, g0, eps_levels, eps: float, kind: int,
                   rho_a: float, rho_b: float, max_iter: int, tol: float, check_every: int,
                   symmetric: bool):
    """Launch one program per problem. Returns f (B, n), g (B, m) fp32, n_iter (B,) int32,
    error (B,) fp32. Any input dtype; everything is computed in fp32. ``eps_levels``: the
    (levels, B) eps-scaling table of ``transport._solver.eps_schedule``, or None."""
    B, n = log_a.shape
    m = log_b.shape[1]
    dev = log_a.device
    f32 = torch.float32
    la = log_a.to(f32).contiguous()
    lb = log_b.to(f32).contiguous()
    f = torch.zeros(B, n, dtype=f32, device=dev) if f0 is None else f0.to(f32).contiguous().clone()
    g = torch.zeros(B, m, dtype=f32, device=dev) if g0 is None else g0.to(f32).contiguous().clone()
    n_iter = torch.zeros(B, dtype=torch.int32, device=dev)
    err = torch.empty(B, dtype=f32, device=dev)
    if B == 0:
        return f, g, n_iter, err
    lr, lc = torch.empty_like(f), torch.empty_like(g)  # the LSE scratch
    evs = None if eps_levels is None else eps_levels.to(f32).contiguous()
    levels = 0 if evs is None else evs.shape[0]
    bx, by = _block(n), _block(m)
    if cost is not None:
        xa = ya = c = cost
        D = 1
        sx = sy = (0, 0, 0)
        sc = cost.stride()
        block_d = 16
    else:
        if kind == _ids.COSINE:
            x = torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-12)
            y = torch.nn.functional.normalize(y.float(), dim=-1, eps=1e-12)
        xa, ya, c = x, y, x
        D = x.shape[2]
        sx, sy, sc = x.stride(), y.stride(), (0, 0, 0)
        if kind == _ids.L1:  # the broadcast tile, not tl.dot: any BLOCK_D, kept small
            block_d = max(1, min(triton.next_power_of_2(D), L1_TILE // (bx * by)))
        else:
            block_d = max(16, min(MAX_BLOCK_D, triton.next_power_of_2(D)))
    _sinkhorn_solve_kernel[(B,)](
        xa, ya, c, la, lb, evs if evs is not None else la, f, g, lr, lc, n_iter, err,
        B, n, m, D, levels, max_iter, check_every, float(eps), float(tol), float(rho_a),
        float(rho_b), *sx, *sy, *sc,
        KIND=kind, DENSE=cost is not None, SYMMETRIC=symmetric,
        BLOCK_X=bx, BLOCK_Y=by, BLOCK_D=block_d, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
    )
    return f, g, n_iter, err


def launch_variants(sizes=((10, 12), (20, 30), (50, 40), (300, 256), (10, 200)), dims=(3, 64),
                    dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """Every launch of ``sinkhorn_solve`` per cost kind (and a dense cost) x alternating /
    symmetric x problem size (the tile sides ``_block`` picks) x point dimension x dtype (float64
    never takes this path), as (labels, call) on two CPU problems (one would
    specialize B = 1): see
    ``divergence.launch_variants``."""
    for n, m in sizes:
        for dt in dtypes:
            for kind in [*_ids.COSTS.values(), "dense"]:
                for D in dims if kind != "dense" else (None,):
                    for symmetric in (False, True):
                        def call(n=n, m=m, dt=dt, kind=kind, D=D, symmetric=symmetric):
                            la, lb = torch.zeros(2, n, dtype=dt), torch.zeros(2, m, dtype=dt)
                            if kind == "dense":
                                x = y = None
                                cost, kind = torch.rand(2, n, m, dtype=dt), _ids.SQEUCLIDEAN
                            else:
                                x = torch.randn(2, n, D, dtype=dt)
                                y = torch.randn(2, m, D, dtype=dt)
                                cost = None
                            levels = torch.full((2, 2), 0.2)  # a 2-level eps schedule
                            sinkhorn_solve(x, y, cost, la, lb, None, None, levels, 0.1, kind,
                                           0.0, 0.0, 10, 1e-3, 1, symmetric)
                        yield {"cost": kind, "dtype": str(dt).removeprefix("torch."), "D": D,
                               "n": n, "m": m, "symmetric": symmetric}, call
