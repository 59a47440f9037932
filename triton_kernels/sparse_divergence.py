"""Divergence against a sparse (top-k) teacher: loss, dense student gradient, teacher gradient.

One program per row, everything O(K) inside the kernel (no torch op around it):
  0. the row's checks (ids in [0, V) and distinct on the support; under "bucket" a teacher mass
     on S of at most 1 + slack): an error code, raised as a ValueError by the launcher;
  1. the teacher's final log-probs from the raw ones, in float64 (tail 1 - sum_S p, re-tempering,
     renormalization: ``prepare_teacher`` in ``fdiv_kernels/divergences/_sparse_tails.py``);
  2. L = LSE(f(x) / T) over the row (one read; "renormalize" needs only the support), f the
     student's logit transform (scale s, or softcap c tanh(s x / c));
  3. O(K): the element terms of the K entries (+ the tail), H = sum h, and the teacher gradient
     through step 1 (``teacher_vjp``);
  4. the dense gradient (q_j times a row coefficient times f'(x_j) / T, zeros under
     "renormalize"), then, after a barrier, the K support entries overwritten with their own value.
Under "bucket" the student tail is log1mexp(LSE_S lq) while the support holds less than half the
mass; otherwise its log-mass is the online log-sum-exp of the off-support logits, in a second read
of the row (membership by comparing each column block against the K ids), so a vanishing tail
stays exact at any gap (no exp of the gap is formed: e^-110 underflows float32). Off S the
gradient q_j (-H) + h_tail Q_S q_j / q_tail is written as exp(a_j - L_off) (h_tail Q_S - H q_tail),
L_off = L + lq_tail the off-support log-sum-exp, whose exps are at most 1 there.
A support covering all V ids leaves no outcome for the teacher's tail: its mass deficit is rounding
(empty tail; the check asks for a mass of 1 within the slack), and a tail the student gives no mass
(q_tail = 0) is dropped when the teacher's is within the slack (``_sparse_divergence``).
The math: ``fdiv_kernels/divergences/_sparse.py``; tail ids:
``fdiv_kernels/divergences/_sparse_tails.py``.
"""

import math

import torch
import triton
import triton.language as tl

from fdiv_kernels.core import _ids
from fdiv_kernels.triton_kernels.divergence import _mix_logs
from fdiv_kernels.triton_kernels.divergence_terms import element_terms
from fdiv_kernels.triton_kernels.ids import TAIL_BUCKET, TAIL_RENORMALIZE
from fdiv_kernels.triton_kernels.logit_transform import (
    chain,
    load_logits,
    transform,
    transform_scalars,
)
from fdiv_kernels.triton_kernels.online_softmax import logsumexp_of_row, online_update

MAX_BLOCK = 8192  # 16-bit elements per loop iteration (half for fp32); tests lower it
OFF_BLOCK = 64  # columns per membership test (OFF_BLOCK x BLOCK_K compares)

# Error codes of step 0 (the highest seen in the launch wins; the launcher raises the ValueError).
ERR_NO_MASS = tl.constexpr(1)
ERR_MASS = tl.constexpr(2)
ERR_DUPLICATE = tl.constexpr(3)
ERR_RANGE = tl.constexpr(4)


@triton.jit
def _masked_lse64(x, keep, extra):
    """log(sum_keep exp(x) + exp(extra)) in float64; -inf when empty."""
    m = tl.maximum(tl.max(tl.where(keep, x, float("-inf")), 0), extra)
    sh = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.where(keep, tl.exp(x - sh), 0.0), 0) + tl.exp(extra - sh)
    return sh + tl.log(s)


@triton.jit
def _log1mexp64(x):
    """log(1 - exp(x)) for x <= 0, float64: 1 - e^x by its Taylor series near 0, where it
    cancels (|x| < 1e-3: the first dropped term is below 1e-17 relative)."""
    em1 = tl.where(x > -1e-3, x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0)))),
                   tl.exp(x) - 1.0)
    return tl.log(-em1)


@triton.jit
def _sparse_divergence_fwd_kernel(
    # data ptrs
    x_ptr, ids_ptr, lp_ptr, sup_ptr, valid_ptr, loss_ptr, gs_ptr, gt_ptr, stats_ptr, gl_ptr,
    err_ptr,
    # sizes and strides (rows contiguous)
    V, K, stride_x, stride_gs,
    # scalars; k1, c2, kd: the student transform's (logit_transform.transform_scalars, 1 / T in)
    # log_min_mass: log(1 - slack) (a covering support); log_slack: log(slack)
    param, log_w, log_1mw, alpha, log_max_mass, log_min_mass, log_slack, k1, c2, kd,
    # features
    BASE: tl.constexpr, SWAP: tl.constexpr, TAIL: tl.constexpr, GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, OFF_BLOCK: tl.constexpr,
    BWD: tl.constexpr, HAS_SUP: tl.constexpr, HAS_VALID: tl.constexpr, RETEMPER: tl.constexpr,
    RENORM_T: tl.constexpr, CAP: tl.constexpr,
):
    # RENORM_T: the teacher is renormalized after re-tempering (prepare_teacher): under "bucket"
    # when re-tempered, otherwise when re-tempered or under "renormalize".
    # BWD: the backward launch. The row normalizer and student tail come from the forward's
    # stats, so the row is read once (for the gradient), which is scaled by grad_loss[row].
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: N x V may exceed 2^31
    x_row = x_ptr + row * stride_x
    gs_row = gs_ptr + row * stride_gs
    kk = tl.arange(0, BLOCK_K)
    in_k = kk < K
    keep_row = True
    if HAS_VALID:
        keep_row = tl.load(valid_ptr + row) != 0
    if keep_row:
        sup = in_k
        if HAS_SUP:
            sup = (tl.load(sup_ptr + row * K + kk, mask=in_k, other=0) != 0) & in_k
        ids = tl.load(ids_ptr + row * K + kk, mask=sup, other=0).to(tl.int64)
        # 0. checks; an id out of range is never read (it leaves the support).
        bad = sup & ((ids < 0) | (ids >= V))
        code = tl.max(bad.to(tl.int32), 0) * ERR_RANGE
        sup = sup & (bad == 0)
        if not BWD:
            dup = (ids[:, None] == ids[None, :]) & sup[:, None] & sup[None, :] & (
                kk[:, None] < kk[None, :])
            n_dup = tl.sum(tl.sum(dup.to(tl.int32), 1), 0)
            code = tl.maximum(code, tl.where(n_dup > 0, ERR_DUPLICATE, 0))
        # 1. the teacher, float64.
        raw = tl.load(lp_ptr + row * K + kk, mask=sup, other=0.0).to(tl.float64)
        raw = tl.where(sup, raw, float("-inf"))
        neg_inf64 = tl.full([], float("-inf"), tl.float64)
        mass_t = _masked_lse64(raw, sup, neg_inf64)
        a_t = 1.0
        if RETEMPER:
            a_t = alpha
        raw_tail = neg_inf64
        fin_tail = neg_inf64
        z = tl.zeros([], tl.float64)
        if TAIL == TAIL_BUCKET:
            # A support covering every id: the tail has no outcome; mass 1 within the slack.
            covered = tl.sum(sup.to(tl.int32), 0) == V
            if not BWD:
                code = tl.maximum(code, tl.where(mass_t > log_max_mass, ERR_MASS, 0))
                low = covered & (mass_t < log_min_mass)
                code = tl.maximum(code, tl.where(low, ERR_MASS, 0))
            raw_tail = tl.where((mass_t >= 0.0) | covered, neg_inf64,
                                _log1mexp64(tl.minimum(mass_t, 0.0)))
            fin_tail = raw_tail
            if RETEMPER:
                z = _masked_lse64(a_t * raw, sup, a_t * raw_tail)
                fin_tail = tl.where(z == float("-inf"), neg_inf64, a_t * raw_tail - z)
        elif RETEMPER or TAIL == TAIL_RENORMALIZE:
            z = _masked_lse64(a_t * raw, sup, neg_inf64)
            if not BWD:  # renormalizing all -inf log-probs on a non-empty S is 0 / 0
                none = (tl.sum(sup.to(tl.int32), 0) > 0) & (z == float("-inf"))
                code = tl.maximum(code, tl.where(none, ERR_NO_MASS, 0))
        # An empty support renormalized (z = -inf) has no entries, not NaN ones.
        z_ok = z > float("-inf")
        fin = tl.where(sup, tl.where(z_ok, a_t * raw - z, float("-inf")), float("-inf"))
        if not BWD:
            tl.atomic_max(err_ptr, code)
        # 2. the student normalizer.
        x_s = tl.load(x_row + ids, mask=sup, other=0.0).to(tl.float32)
        f_s, th_s = transform(x_s, k1, c2, CAP)
        a_s = tl.where(sup, f_s, float("-inf"))
        if BWD:
            lse = tl.load(stats_ptr + row * 2)
        elif TAIL == TAIL_RENORMALIZE:  # renormalized: the normalizer is over S only
            m_s = tl.max(a_s, 0)
            sh = tl.where(m_s == float("-inf"), 0.0, m_s)
            lse = sh + tl.log(tl.sum(tl.where(sup, tl.exp(a_s - sh), 0.0), 0))
        elif CAP:
            m = tl.full([], float("-inf"), tl.float32)
            s = tl.zeros([], tl.float32)
            for c0 in range(0, V, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                a, _ = load_logits(x_row, cols, V, k1, c2, CAP)
                m, s = online_update(m, s, a)
            lse = m + tl.log(s)
        else:
            lse = logsumexp_of_row(x_row, V, k1, BLOCK)
        # 3. the K entries.
        lq = tl.where(sup, a_s - lse, float("-inf"))
        lp = fin.to(tl.float32)
        t, h, k = element_terms(lp, lq, param, log_w, log_1mw, BASE, SWAP)
        t = tl.where(sup, t, 0.0)
        h = tl.where(sup, h, 0.0)
        k = tl.where(sup, k, 0.0)
        loss = tl.sum(t, 0)
        H = tl.sum(h, 0)
        c_sup = H
        c_tail = 0.0
        ref_off = lse
        kt = tl.zeros([], tl.float32)
        if TAIL == TAIL_BUCKET:
            m_q = tl.max(lq, 0)
            shq = tl.where(m_q == float("-inf"), 0.0, m_q)
            mass = tl.minimum(shq + tl.log(tl.sum(tl.exp(lq - shq), 0)), 0.0)  # log sum_S q
            if BWD:
                lq_tail = tl.load(stats_ptr + row * 2 + 1)
            elif mass < -0.6931471805599453:
                lq_tail = tl.log(1.0 - tl.exp(mass))
            else:
                # The off-support log-sum-exp, online: its exps never underflow as a whole.
                m_off = tl.full([], float("-inf"), tl.float32)
                s_off = tl.zeros([], tl.float32)
                for o in range(0, V, OFF_BLOCK):
                    cols = o + tl.arange(0, OFF_BLOCK)
                    a, _ = load_logits(x_row, cols, V, k1, c2, CAP)
                    hit = (cols[:, None] == ids[None, :]) & sup[None, :]
                    on_s = tl.max(hit.to(tl.int32), 1) > 0
                    m_off, s_off = online_update(
                        m_off, s_off, tl.where(on_s | (cols >= V), float("-inf"), a))
                lq_tail = (m_off + tl.log(s_off)) - lse
            tt, ht, kt = element_terms(fin_tail.to(tl.float32), lq_tail, param, log_w, log_1mw,
                                       BASE, SWAP)
            # No student tail: a teacher tail within the slack is rounding (the backward, which
            # only sees q_tail = 0, drops it too: its gradient is only used when finite).
            forgive = lq_tail == float("-inf")
            if not BWD:
                forgive = forgive & (fin_tail <= log_slack)
            tt = tl.where(forgive, 0.0, tt)
            ht = tl.where(forgive, 0.0, ht)
            kt = tl.where(forgive, 0.0, kt)
            loss += tt
            c_sup = H + ht
            # Off S: q_j (-H) + h_tail Q_S q_j / q_tail = exp(a_j - L_off) (h_tail Q_S - H q_tail)
            # with L_off = L + lq_tail (no 1 / q_tail formed); no tail gradient: -H q_j.
            use = (ht != 0.0) & (lq_tail > float("-inf"))
            c_tail = tl.where(use, ht * tl.exp(mass) - H * tl.exp(lq_tail), -H)
            ref_off = tl.where(use, lse + lq_tail, lse)
            if not BWD:
                tl.store(stats_ptr + row * 2 + 1, lq_tail)
        else:
            if not BWD:
                tl.store(stats_ptr + row * 2 + 1, 0.0)
        if TAIL != TAIL_RENORMALIZE:
            loss += lse - lse  # NaN logits: NaN loss
        if not BWD:
            tl.store(loss_ptr + row, loss)
            tl.store(stats_ptr + row * 2, lse)
        if GRAD_T:
            # The chain rule through step 1 (teacher_vjp), float64.
            k64 = k.to(tl.float64)
            g_t = k64
            g_tail = kt.to(tl.float64)
            if RENORM_T:
                total = tl.sum(k64, 0)
                if TAIL == TAIL_BUCKET:
                    total += g_tail
                g_t = a_t * (k64 - tl.where(sup, tl.exp(fin), 0.0) * total)
                g_tail = a_t * (g_tail - tl.exp(fin_tail) * total)
            if TAIL == TAIL_BUCKET:
                through = (raw_tail > float("-inf")) & (g_tail != 0.0)
                ratio = tl.exp(raw - tl.where(through, raw_tail, 0.0))
                g_t -= tl.where(through, g_tail, 0.0) * ratio
            g_t = tl.where(sup, g_t, 0.0)
            tl.store(gt_ptr + row * K + kk, g_t.to(tl.float32), mask=in_k)
        rs = 1.0
        if BWD:
            rs = tl.load(gl_ptr + row)
        if GRAD_S:
            gm = rs * kd
            for off0 in range(0, V, BLOCK):
                cols = off0 + tl.arange(0, BLOCK)
                if TAIL == TAIL_RENORMALIZE:
                    g = tl.zeros([BLOCK], tl.float32)
                else:
                    a, th = load_logits(x_row, cols, V, k1, c2, CAP)
                    if TAIL == TAIL_BUCKET:
                        # Clamped at 1: the support columns (overwritten below) may exceed it.
                        g = c_tail * tl.exp(tl.minimum(a - ref_off, 0.0))
                    else:
                        g = -H * tl.exp(a - lse)
                    g = chain(g, th, gm, CAP)
                tl.store(gs_row + cols, g.to(gs_ptr.dtype.element_ty), mask=cols < V)
            # The support entries overwrite the dense values other threads just stored.
            tl.debug_barrier()
            g_s = chain(h - tl.exp(lq) * c_sup, th_s, gm, CAP)
            tl.store(gs_row + ids, g_s.to(gs_ptr.dtype.element_ty), mask=sup)
    else:
        if not BWD:
            tl.store(loss_ptr + row, 0.0)
            tl.store(stats_ptr + row * 2, 0.0)
            tl.store(stats_ptr + row * 2 + 1, 0.0)
        if GRAD_T:
            tl.store(gt_ptr + row * K + kk, tl.zeros([BLOCK_K], tl.float32), mask=in_k)
        if GRAD_S:
            for off0 in range(0, V, BLOCK):
                cols = off0 + tl.arange(0, BLOCK)
                tl.store(gs_row + cols, tl.zeros([BLOCK], tl.float32).to(gs_ptr.dtype.element_ty),
                         mask=cols < V)


def _block(V: int, dtype: torch.dtype) -> tuple[int, int]:
    cap = MAX_BLOCK // 2 if dtype.itemsize >= 4 else MAX_BLOCK
    block = min(triton.next_power_of_2(V), cap)
    return block, max(1, min(16, block // 512))


def sparse_divergence_fwd(student, ids, teacher, support, valid, base, swap, param,
                          inv_temperature, tail, teacher_alpha, mass_slack, logit_scale, softcap,
                          grad_student, grad_teacher):
    """Launch on (N, V) contiguous logits and (N, K) contiguous ids / raw teacher log-probs
    (``support`` / ``valid`` may be empty: all real / all kept); allocates the loss (N,), the
    student gradient and the (N, K) teacher one. The checks' error code is read back once (the
    one host sync of the forward) and raised as a ValueError."""
    N, V = student.shape
    K = ids.shape[1]
    f32 = dict(dtype=torch.float32, device=student.device)
    loss = torch.empty(N, **f32)
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty(N, K, **f32) if grad_teacher else torch.empty(0, **f32)
    stats = torch.empty(N, 2, **f32)
    err = torch.zeros(1, dtype=torch.int32, device=student.device)
    _launch(student, ids, teacher, support, valid, loss, gs, gt, stats, loss, err, base, swap,
            param, inv_temperature, tail, teacher_alpha, mass_slack, logit_scale, softcap,
            grad_student, grad_teacher, False)
    code = int(err.item()) if N else 0
    if code == ERR_RANGE.value:
        raise ValueError(f"teacher_ids must be in [0, {V}) on the support")
    if code == ERR_DUPLICATE.value:
        raise ValueError("teacher_ids must not repeat an id within a row (on the support)")
    if code == ERR_MASS.value:
        raise ValueError(f"teacher_logprobs: under tail='bucket' the teacher mass on the support "
                         f"must be at most 1 (+{mass_slack} rounding), and 1 (-+{mass_slack}) "
                         f"where the support covers all {V} ids")
    if code == ERR_NO_MASS.value:
        raise ValueError("teacher_logprobs: renormalized over the support (tail='renormalize', "
                         "or tail='none' with a teacher_temperature), a row's teacher needs some "
                         "mass there; a row has every log-prob on its support -inf")
    return loss, gs, gt, stats


def sparse_divergence_bwd(student, ids, teacher, support, valid, stats, grad_loss, base, swap,
                          param, inv_temperature, tail, teacher_alpha, logit_scale, softcap):
    """d loss / d student logits times grad_loss per row, from the forward's stats."""
    gs = torch.empty_like(student)
    _launch(student, ids, teacher, support, valid, stats, gs, stats, stats, grad_loss, stats,
            base, swap, param, inv_temperature, tail, teacher_alpha, 0.0, logit_scale, softcap,
            True, False, True)
    return gs


def _launch(student, ids, teacher, support, valid, loss, gs, gt, stats, grad_loss, err, base,
            swap, param, inv_temperature, tail, teacher_alpha, mass_slack, logit_scale, softcap,
            grad_student, grad_teacher, bwd):
    N, V = student.shape
    K = ids.shape[1]
    if N == 0:
        return
    block, warps = _block(V, student.dtype)
    has_sup, has_valid = support.numel() > 0, valid.numel() > 0
    _sparse_divergence_fwd_kernel[(N,)](
        student, ids, teacher, support if has_sup else ids, valid if has_valid else ids, loss,
        gs if grad_student else student, gt if grad_teacher else loss, stats, grad_loss, err,
        V, K, student.stride(0), gs.stride(0) if grad_student else 0,
        float(param), *_mix_logs(base, param), float(teacher_alpha),
        math.log1p(mass_slack) if mass_slack < float("inf") else float("inf"),
        math.log1p(-mass_slack) if mass_slack < 1 else float("-inf"),
        math.log(mass_slack) if mass_slack > 0 else float("-inf"),
        *transform_scalars(float(logit_scale), float(softcap), float(inv_temperature)),
        BASE=base, SWAP=bool(swap), TAIL=int(tail), GRAD_S=bool(grad_student),
        GRAD_T=bool(grad_teacher), BLOCK=block, BLOCK_K=triton.next_power_of_2(K),
        OFF_BLOCK=OFF_BLOCK, BWD=bool(bwd), HAS_SUP=has_sup, HAS_VALID=has_valid,
        RETEMPER=teacher_alpha > 0,
        RENORM_T=teacher_alpha > 0 or tail == _ids.TAIL_RENORMALIZE,
        CAP=softcap > 0, num_warps=warps,
    )


def launch_variants(widths=(1000, 128256, 262144),
                    dtypes=(torch.bfloat16, torch.float16, torch.float32), ks=(8, 64)):
    """Every launch of the sparse launchers per registry kind (base, swap) x tail x gradient
    flags (forward) or backward x re-tempering x softcap x support mask / row mask x dtype x
    row width x support width K, as (labels, call) on one-row CPU inputs: see
    ``divergence.launch_variants``."""
    from fdiv_kernels.kinds._registry import DIVERGENCES

    kinds = {}
    for name, d in DIVERGENCES.items():  # one per (base, swap): the compiled code is the same
        kinds.setdefault((d.base, d.swap), (name, d.default))
    tails = {"none": _ids.TAIL_NONE, "bucket": _ids.TAIL_BUCKET,
             "renormalize": _ids.TAIL_RENORMALIZE}
    modes = [("s+t", True, True), ("s", True, False), ("t", False, True), ("none", False, False),
             ("bwd", True, False)]
    # (re-tempered, softcap, masks given): the flags that change the compiled code.
    extras = [(False, False, False), (True, False, True), (False, True, False), (True, True, True)]
    for V in widths:
        for K in ks:
            for (base, swap), (name, param) in kinds.items():
                for tail_name, tail in tails.items():
                    for mode, gs, gt in modes:
                        for retemper, cap, masks in extras:
                            for dt in dtypes:
                                def call(V=V, K=K, base=base, swap=swap, param=param, tail=tail,
                                         mode=mode, gs=gs, gt=gt, dt=dt, retemper=retemper,
                                         cap=cap, masks=masks):
                                    s = torch.randn(1, V, dtype=dt)
                                    ids = torch.arange(K, dtype=torch.int64)[None]
                                    lp = torch.full((1, K), -float(K), dtype=torch.float32)
                                    support = (torch.ones(1, K, dtype=torch.bool) if masks
                                               else torch.ones(0, dtype=torch.bool))
                                    valid = (torch.ones(1, dtype=torch.bool) if masks
                                             else torch.ones(0, dtype=torch.bool))
                                    alpha = 1.5 if retemper else 0.0
                                    softcap = 30.0 if cap else 0.0
                                    if mode == "bwd":
                                        sparse_divergence_bwd(
                                            s, ids, lp, support, valid, torch.zeros(1, 2),
                                            torch.ones(1), base, swap, param, 1.0, tail, alpha,
                                            1.0, softcap)
                                    else:
                                        sparse_divergence_fwd(
                                            s, ids, lp, support, valid, base, swap, param, 1.0,
                                            tail, alpha, 1e-4, 1.0, softcap, gs, gt)
                                yield {"kind": name, "tail": tail_name, "grads": mode, "K": K,
                                       "retemper": retemper, "softcap": cap, "masks": masks,
                                       "dtype": str(dt).removeprefix("torch."), "V": V}, call
    # The dtypes offline stores keep (int32 ids, fp16 / bf16 log-probs, fk.topk_logprobs'
    # outputs), which the launchers pass on as they are: one kind, every tail, both launches.
    for tail_name, tail in tails.items():
        for mode in ("s+t", "bwd"):
            for lp_dt in (torch.float16, torch.bfloat16):
                def call(tail=tail, mode=mode, lp_dt=lp_dt):
                    s = torch.randn(1, 128256, dtype=torch.bfloat16)
                    ids = torch.arange(64, dtype=torch.int32)[None]
                    lp = torch.full((1, 64), -64.0, dtype=lp_dt)
                    none = torch.ones(0, dtype=torch.bool)
                    base, swap, param = _ids.KL, False, 0.0
                    if mode == "bwd":
                        sparse_divergence_bwd(s, ids, lp, none, none, torch.zeros(1, 2),
                                              torch.ones(1), base, swap, param, 1.0, tail, 0.0,
                                              1.0, 0.0)
                    else:
                        sparse_divergence_fwd(s, ids, lp, none, none, base, swap, param, 1.0,
                                              tail, 0.0, 1e-4, 1.0, 0.0, True, True)
                yield {"kind": "kl", "tail": tail_name, "grads": mode, "K": 64,
                       "store": f"int32 ids, {str(lp_dt).removeprefix('torch.')} log-probs",
                       "dtype": "bfloat16", "V": 128256}, call
