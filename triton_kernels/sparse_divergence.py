"""Divergence against a sparse (top-k) teacher: loss, dense student gradient, teacher gradient.

One program per row:
  1. L = LSE(x / T) over the row (``row_lse``, one read; "renormalize" needs only the support);
  2. O(K): gather the support logits, the element terms of the K entries (+ the tail), H = sum h;
  3. the dense gradient (q_j times a row coefficient, zeros under "renormalize"), then, after a
     barrier, the K support entries overwritten with their own value.
Under "bucket" the student tail is log1mexp(LSE_S lq) while the support holds less than half the
mass; otherwise the off-support exps are summed directly in a second read of the row (membership
by comparing each column block against the K ids), so a vanishing tail stays exact.
The math: ``fdiv_kernels/_sparse_divergence.py``; tail ids: ``fdiv_kernels/_sparse_tails.py``.
"""

import torch
import triton
import triton.language as tl

from fdiv_kernels.triton_kernels.divergence import _mix_logs
from fdiv_kernels.triton_kernels.divergence_terms import element_terms
from fdiv_kernels.triton_kernels.ids import TAIL_BUCKET, TAIL_RENORMALIZE
from fdiv_kernels.triton_kernels.online_softmax import logsumexp_of_row

MAX_BLOCK = 8192  # 16-bit elements per loop iteration (half for fp32); tests lower it
OFF_BLOCK = 64  # columns per membership test (OFF_BLOCK x BLOCK_K compares)


@triton.jit
def _sparse_divergence_fwd_kernel(
    # data ptrs
    x_ptr, ids_ptr, lp_ptr, lpt_ptr, sup_ptr, valid_ptr, loss_ptr, gs_ptr, gt_ptr, stats_ptr,
    gl_ptr,
    # sizes and strides (rows contiguous)
    V, K, stride_x, stride_gs,
    # scalars
    param, log_w, log_1mw, inv_t,
    # features
    BASE: tl.constexpr, SWAP: tl.constexpr, TAIL: tl.constexpr, GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, OFF_BLOCK: tl.constexpr,
    BWD: tl.constexpr,
):
    # BWD: the backward launch. The row normalizer and student tail come from the forward's
    # stats, so the row is read once (for the gradient), which is scaled by grad_loss[row].
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: N x V may exceed 2^31
    x_row = x_ptr + row * stride_x
    gs_row = gs_ptr + row * stride_gs
    kk = tl.arange(0, BLOCK_K)
    in_k = kk < K
    if tl.load(valid_ptr + row) != 0:
        sup = (tl.load(sup_ptr + row * K + kk, mask=in_k, other=0) != 0) & in_k
        ids = tl.load(ids_ptr + row * K + kk, mask=sup, other=0).to(tl.int64)
        a_s = tl.load(x_row + ids, mask=sup, other=float("-inf")).to(tl.float32) * inv_t
        if BWD:
            lse = tl.load(stats_ptr + row * 2)
        elif TAIL == TAIL_RENORMALIZE:  # renormalized: the normalizer is over S only
            m_s = tl.max(a_s, 0)
            sh = tl.where(m_s == float("-inf"), 0.0, m_s)
            lse = sh + tl.log(tl.sum(tl.where(sup, tl.exp(a_s - sh), 0.0), 0))
        else:
            lse = logsumexp_of_row(x_row, V, inv_t, BLOCK)
        lq = tl.where(sup, a_s - lse, float("-inf"))
        lp = tl.where(sup, tl.load(lp_ptr + row * K + kk, mask=sup, other=0.0), float("-inf"))
        t, h, k = element_terms(lp, lq, param, log_w, log_1mw, BASE, SWAP)
        t = tl.where(sup, t, 0.0)
        h = tl.where(sup, h, 0.0)
        k = tl.where(sup, k, 0.0)
        loss = tl.sum(t, 0)
        H = tl.sum(h, 0)
        c_sup = H
        c_tail = 0.0
        inv_qt = 0.0
        if TAIL == TAIL_BUCKET:
            m_q = tl.max(lq, 0)
            shq = tl.where(m_q == float("-inf"), 0.0, m_q)
            mass = tl.minimum(shq + tl.log(tl.sum(tl.exp(lq - shq), 0)), 0.0)  # log sum_S q
            if BWD:
                lq_tail = tl.load(stats_ptr + row * 2 + 1)
            elif mass < -0.6931471805599453:
                lq_tail = tl.log(1.0 - tl.exp(mass))
            else:
                off = tl.zeros([OFF_BLOCK], tl.float32)
                for o in range(0, V, OFF_BLOCK):
                    cols = o + tl.arange(0, OFF_BLOCK)
                    a = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                    e = tl.exp(a * inv_t - lse)
                    hit = (cols[:, None] == ids[None, :]) & sup[None, :]
                    on_s = tl.max(hit.to(tl.int32), 1) > 0
                    off += tl.where(on_s, 0.0, e)
                lq_tail = tl.log(tl.sum(off, 0))
            lpt = tl.load(lpt_ptr + row)
            tt, ht, kt = element_terms(lpt, lq_tail, param, log_w, log_1mw, BASE, SWAP)
            loss += tt
            c_sup = H + ht
            # Off S: h_tail Q_S q_j / q_tail with the ratio clamped to 1; dropped when the tail
            # is empty or too small for 1 / q_tail to be finite.
            use = (ht != 0.0) & (lq_tail > -80.0)
            c_tail = tl.where(use, ht * tl.exp(mass), 0.0)
            inv_qt = tl.where(use, tl.exp(-tl.maximum(lq_tail, -80.0)), 0.0)
            if GRAD_T:
                tl.store(gt_ptr + row * (K + 1) + K, kt)
            if not BWD:
                tl.store(stats_ptr + row * 2 + 1, lq_tail)
        else:
            if GRAD_T:
                tl.store(gt_ptr + row * (K + 1) + K, 0.0)
            if not BWD:
                tl.store(stats_ptr + row * 2 + 1, 0.0)
        if TAIL != TAIL_RENORMALIZE:
            loss += lse - lse  # NaN logits: NaN loss
        if not BWD:
            tl.store(loss_ptr + row, loss)
            tl.store(stats_ptr + row * 2, lse)
        if GRAD_T:
            tl.store(gt_ptr + row * (K + 1) + kk, k, mask=in_k)
        rs = 1.0
        if BWD:
            rs = tl.load(gl_ptr + row)
        if GRAD_S:
            for off0 in range(0, V, BLOCK):
                cols = off0 + tl.arange(0, BLOCK)
                if TAIL == TAIL_RENORMALIZE:
                    g = tl.zeros([BLOCK], tl.float32)
                else:
                    a = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                    q = tl.exp(a * inv_t - lse)
                    g = -H * q
                    if TAIL == TAIL_BUCKET:
                        g += c_tail * tl.minimum(q * inv_qt, 1.0)
                    g = g * (rs * inv_t)
                tl.store(gs_row + cols, g.to(gs_ptr.dtype.element_ty), mask=cols < V)
            # The support entries overwrite the dense values other threads just stored.
            tl.debug_barrier()
            g_s = (h - tl.exp(lq) * c_sup) * (rs * inv_t)
            tl.store(gs_row + ids, g_s.to(gs_ptr.dtype.element_ty), mask=sup)
    else:
        if not BWD:
            tl.store(loss_ptr + row, 0.0)
            tl.store(stats_ptr + row * 2, 0.0)
            tl.store(stats_ptr + row * 2 + 1, 0.0)
        if GRAD_T:
            tl.store(gt_ptr + row * (K + 1) + kk, tl.zeros([BLOCK_K], tl.float32), mask=in_k)
            tl.store(gt_ptr + row * (K + 1) + K, 0.0)
        if GRAD_S:
            for off0 in range(0, V, BLOCK):
                cols = off0 + tl.arange(0, BLOCK)
                tl.store(gs_row + cols, tl.zeros([BLOCK], tl.float32).to(gs_ptr.dtype.element_ty),
                         mask=cols < V)


def _block(V: int, dtype: torch.dtype) -> tuple[int, int]:
    cap = MAX_BLOCK // 2 if dtype.itemsize >= 4 else MAX_BLOCK
    block = min(triton.next_power_of_2(V), cap)
    return block, max(1, min(16, block // 512))


def sparse_divergence_fwd(student, ids, teacher, teacher_tail, support, valid, base, swap, param,
                          inv_temperature, tail, grad_student, grad_teacher):
    """Launch on (N, V) contiguous logits and (N, K) contiguous support tensors (float32
    teacher); allocates the loss (N,), the student gradient and the (N, K + 1) teacher one."""
    N, V = student.shape
    K = ids.shape[1]
    f32 = dict(dtype=torch.float32, device=student.device)
    loss = torch.empty(N, **f32)
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty(N, K + 1, **f32) if grad_teacher else torch.empty(0, **f32)
    stats = torch.empty(N, 2, **f32)
    _launch(student, ids, teacher, teacher_tail, support, valid, loss, gs, gt, stats, loss,
            base, swap, param, inv_temperature, tail, grad_student, grad_teacher, False)
    return loss, gs, gt, stats


def sparse_divergence_bwd(student, ids, teacher, teacher_tail, support, valid, stats, grad_loss,
                          base, swap, param, inv_temperature, tail):
    """d loss / d student logits times grad_loss per row, from the forward's stats."""
    gs = torch.empty_like(student)
    _launch(student, ids, teacher, teacher_tail, support, valid, stats, gs, stats, stats,
            grad_loss, base, swap, param, inv_temperature, tail, True, False, True)
    return gs


def _launch(student, ids, teacher, teacher_tail, support, valid, loss, gs, gt, stats, grad_loss,
            base, swap, param, inv_temperature, tail, grad_student, grad_teacher, bwd):
    N, V = student.shape
    K = ids.shape[1]
    block, warps = _block(V, student.dtype)
    _sparse_divergence_fwd_kernel[(N,)](
        student, ids, teacher, teacher_tail, support, valid, loss,
        gs if grad_student else student, gt if grad_teacher else loss, stats, grad_loss,
        V, K, student.stride(0), gs.stride(0) if grad_student else 0,
        float(param), *_mix_logs(base, param), float(inv_temperature),
        BASE=base, SWAP=bool(swap), TAIL=int(tail), GRAD_S=bool(grad_student),
        GRAD_T=bool(grad_teacher), BLOCK=block, BLOCK_K=triton.next_power_of_2(K),
        OFF_BLOCK=OFF_BLOCK, BWD=bool(bwd), num_warps=warps,
    )


def launch_variants(widths=(1000, 128256, 262144),
                    dtypes=(torch.bfloat16, torch.float16, torch.float32), ks=(8, 64)):
    """Every launch of the sparse launchers per registry kind (base, swap) x tail x gradient
    flags (forward) or backward x dtype x row width x support width K, as (labels, call) on
    one-row CPU inputs: see ``divergence.launch_variants``."""
    from fdiv_kernels import _ids
    from fdiv_kernels._kinds import DIVERGENCES

    kinds = {}
    for name, d in DIVERGENCES.items():  # one per (base, swap): the compiled code is the same
        kinds.setdefault((d.base, d.swap), (name, d.default))
    tails = {"none": _ids.TAIL_NONE, "bucket": _ids.TAIL_BUCKET,
             "renormalize": _ids.TAIL_RENORMALIZE}
    modes = [("s+t", True, True), ("s", True, False), ("t", False, True), ("none", False, False),
             ("bwd", True, False)]
    for V in widths:
        for K in ks:
            for (base, swap), (name, param) in kinds.items():
                for tail_name, tail in tails.items():
                    for mode, gs, gt in modes:
                        for dt in dtypes:
                            def call(V=V, K=K, base=base, swap=swap, param=param, tail=tail,
                                     mode=mode, gs=gs, gt=gt, dt=dt):
                                s = torch.randn(1, V, dtype=dt)
                                ids = torch.arange(K, dtype=torch.int64)[None]
                                lp = torch.full((1, K), -float(K), dtype=torch.float32)
                                tail_lp = torch.zeros(1)
                                support = torch.ones(1, K, dtype=torch.bool)
                                valid = torch.ones(1, dtype=torch.bool)
                                if mode == "bwd":
                                    sparse_divergence_bwd(s, ids, lp, tail_lp, support, valid,
                                                          torch.zeros(1, 2), torch.ones(1), base,
                                                          swap, param, 1.0, tail)
                                else:
                                    sparse_divergence_fwd(s, ids, lp, tail_lp, support, valid,
                                                          base, swap, param, 1.0, tail, gs, gt)
                            yield {"kind": name, "tail": tail_name, "grads": mode, "K": K,
                                   "dtype": str(dt).removeprefix("torch."), "V": V}, call
