"""The torch backend: the readable statement of every op, chunked over rows to bound its memory.

It runs on any device and dtype (float64 included), and is the spec the other backends are tested
against, next to the independent float64 reference in tests/.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fdiv_kernels.transport import _ops_torch as _sinkhorn_torch  # noqa: F401  (fdiv::sinkhorn_*_torch)
from fdiv_kernels.core._ops import SoftmaxOps, define, register
from fdiv_kernels.core._rows import row_chunks
from fdiv_kernels.core._transforms import transform_logits
from fdiv_kernels.core._validation import loss_dtype
from fdiv_kernels.kinds._registry import KernelSpec
from fdiv_kernels.divergences._sparse_tails import (
    TAIL_BUCKET,
    TAIL_RENORMALIZE,
    check_teacher,
    prepare_teacher,
    teacher_vjp,
)
from fdiv_kernels.kinds._terms import element_terms

# Rows per chunk: the chunk's (rows, V) temporaries are the only memory beyond the outputs.
CHUNK_ELEMENTS = 1 << 22


def _zero_where(keep: Tensor, x: Tensor) -> Tensor:
    return torch.where(keep.reshape(-1, *([1] * (x.dim() - 1))), x, torch.zeros_like(x))


def divergence_fwd_torch(
    student: Tensor, teacher: Tensor, valid: Tensor, base: int, swap: bool, param: float,
    inv_temperature: float, student_scale: float, student_softcap: float, teacher_scale: float,
    teacher_softcap: float, grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    spec = KernelSpec("", base, swap, param)
    ctype = loss_dtype(student.dtype)
    N, V = student.shape
    loss = student.new_empty(N, dtype=ctype)
    ent = student.new_empty(N, dtype=ctype)
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    for rows in row_chunks(N, V, CHUNK_ELEMENTS):
        a, da = transform_logits(student[rows].to(ctype), student_scale, student_softcap)
        b, db = transform_logits(teacher[rows].to(ctype), teacher_scale, teacher_softcap)
        lq = torch.log_softmax(a * inv_temperature, dim=-1)
        lp = torch.log_softmax(b * inv_temperature, dim=-1)
        term, h, k = element_terms(spec, lp, lq)
        keep = valid[rows]
        loss[rows] = _zero_where(keep, term.sum(-1))
        # The student's entropy whatever the kind (swap exchanges roles in the terms only).
        q = lq.exp()
        ent[rows] = _zero_where(keep, -torch.where(q == 0, torch.zeros_like(q), q * lq).sum(-1))
        # dD/d logits = (h - q sum h) / T for the student, (k - p sum k) / T for the teacher,
        # times the transform's derivative.
        if grad_student:
            g = (h - q * h.sum(-1, keepdim=True)) * inv_temperature * da
            gs[rows] = _zero_where(keep, g)
        if grad_teacher:
            g = (k - lp.exp() * k.sum(-1, keepdim=True)) * inv_temperature * db
            gt[rows] = _zero_where(keep, g)
    return loss, gs, gt, ent


def _phase_terms(spec, student, teacher, lse_s, lse_t, inv_t, rows):
    ctype = loss_dtype(student.dtype)
    lq = student[rows].to(ctype) * inv_t - lse_s[rows, None]
    lp = teacher[rows].to(ctype) * inv_t - lse_t[rows, None]
    return lp, lq, element_terms(spec, lp, lq)


def divergence_partials_torch(
    student: Tensor, teacher: Tensor, valid: Tensor, lse_student: Tensor, lse_teacher: Tensor,
    base: int, swap: bool, param: float, inv_temperature: float,
) -> Tensor:
    spec = KernelSpec("", base, swap, param)
    N, V = student.shape
    sums = student.new_empty(N, 3, dtype=loss_dtype(student.dtype))
    for rows in row_chunks(N, V, CHUNK_ELEMENTS):
        _, _, terms = _phase_terms(spec, student, teacher, lse_student, lse_teacher,
                                   inv_temperature, rows)
        sums[rows] = _zero_where(valid[rows], torch.stack([x.sum(-1) for x in terms], -1))
    return sums


def divergence_grads_torch(
    student: Tensor, teacher: Tensor, valid: Tensor, lse_student: Tensor, lse_teacher: Tensor,
    sums: Tensor, base: int, swap: bool, param: float, inv_temperature: float,
    grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor]:
    spec = KernelSpec("", base, swap, param)
    N, V = student.shape
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    for rows in row_chunks(N, V, CHUNK_ELEMENTS):
        lp, lq, (_, h, k) = _phase_terms(spec, student, teacher, lse_student, lse_teacher,
                                         inv_temperature, rows)
        keep = valid[rows]
        if grad_student:
            g = (h - lq.exp() * sums[rows, 1:2]) * inv_temperature
            gs[rows] = _zero_where(keep, g)
        if grad_teacher:
            g = (k - lp.exp() * sums[rows, 2:3]) * inv_temperature
            gt[rows] = _zero_where(keep, g)
    return gs, gt


def softmax_stats_fwd_torch(
    x: Tensor, labels: Tensor | None, ignore_index: int, inv_temperature: float, scale: float,
    softcap: float, entropy: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    ctype = loss_dtype(x.dtype)
    N, V = x.shape
    lse = x.new_empty(N, dtype=ctype)
    ent = x.new_empty(N if entropy else 0, dtype=ctype)
    lp = x.new_empty(N if labels is not None else 0, dtype=ctype)
    for rows in row_chunks(N, V, CHUNK_ELEMENTS):
        a = transform_logits(x[rows].to(ctype), scale, softcap)[0] * inv_temperature
        lse[rows] = torch.logsumexp(a, dim=-1)
        if entropy:
            la = torch.log_softmax(a, dim=-1)
            q = la.exp()
            ent[rows] = -torch.where(q == 0, torch.zeros_like(q), q * la).sum(-1)
        if labels is not None:
            lab = labels[rows]
            in_range = (lab >= 0) & (lab < V)
            picked = a.gather(-1, torch.where(in_range, lab, 0).unsqueeze(-1)).squeeze(-1)
            val = torch.where(in_range, picked - lse[rows], torch.full_like(picked, float("nan")))
            lp[rows] = _zero_where(lab != ignore_index, val)
    return lse, ent, lp


def softmax_stats_bwd_torch(
    x: Tensor, labels: Tensor | None, lse: Tensor, entropy: Tensor, g_lse: Tensor | None,
    g_entropy: Tensor | None, g_logprob: Tensor | None, ignore_index: int, inv_temperature: float,
    scale: float, softcap: float,
) -> Tensor:
    ctype = loss_dtype(x.dtype)
    N, V = x.shape
    dx = torch.empty_like(x)
    for rows in row_chunks(N, V, CHUNK_ELEMENTS):
        z, dz = transform_logits(x[rows].to(ctype), scale, softcap)
        a = z * inv_temperature
        la = a - lse[rows, None]
        q = la.exp()
        g = torch.zeros_like(a)
        if g_lse is not None:
            g += g_lse[rows, None] * q
        if g_entropy is not None:
            dh = -q * (la + entropy[rows, None])  # dH/da = -q (log q + H)
            g += g_entropy[rows, None] * torch.where(q == 0, torch.zeros_like(dh), dh)
        if g_logprob is not None:
            lab = labels[rows]
            coef = _zero_where(lab != ignore_index, g_logprob[rows])
            onehot = torch.nn.functional.one_hot(lab.clamp(0, V - 1), V).to(ctype)
            g += coef[:, None] * (onehot - q)
            if g_lse is None and g_entropy is None:
                # Only the label's log-prob flows back: an ignored row is inert (zero gradient,
                # even where its logits hold NaN and 0 * q is NaN).
                g = _zero_where(lab != ignore_index, g)
        dx[rows] = g * inv_temperature * dz
    return dx



# ---- sparse (top-k) teacher: fk.sparse_divergence ------------------------------------------


def _scatter_support(g: Tensor, ids: Tensor, support: Tensor, values: Tensor) -> None:
    """g[r, ids[r, i]] = values[r, i] for the support entries only (padding ids may repeat)."""
    r, i = support.nonzero(as_tuple=True)
    g[r, ids[r, i]] = values[r, i].to(g.dtype)


def sparse_divergence_fwd_torch(
    student: Tensor, ids: Tensor, teacher: Tensor, support: Tensor, valid: Tensor, base: int,
    swap: bool, param: float, inv_temperature: float, tail: int, teacher_alpha: float,
    mass_slack: float, logit_scale: float, softcap: float, grad_student: bool,
    grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss over the K (+1 tail) outcomes, d loss / d student logits (dense),
    d loss / d teacher log-probs (N, K), and the per-row (normalizer, student tail log-prob) the
    backward starts from. ``teacher`` holds the raw log-probs; ``support`` / ``valid`` may be
    empty (all real / all kept); teacher_alpha 0 means no re-tempering, softcap 0 none. See
    ``fdiv_kernels.divergences._sparse`` for the math."""
    spec = KernelSpec("", base, swap, param)
    ctype = loss_dtype(student.dtype)
    N, V = student.shape
    K = ids.shape[1]
    ids = ids.long()  # torch's gather / scatter index in int64 (the spec may copy int32 ids)
    if support.numel() == 0:
        support = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    if valid.numel() == 0:
        valid = torch.ones(N, dtype=torch.bool, device=student.device)
    # Ignored rows are not read (as the kernels skip them): their ids may hold anything.
    support = support & valid[:, None]
    alpha = teacher_alpha if teacher_alpha > 0 else None
    check_teacher(ids, teacher, support, V, tail, mass_slack, keep=valid,
                  retempered=alpha is not None)
    # The teacher side in float64 (1 - sum p stays exact when S holds nearly all the mass).
    raw = teacher.to(torch.float64)
    lp_k, lp_tail = prepare_teacher(raw, support, tail, alpha, V)
    loss = student.new_empty(N, dtype=ctype)
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = student.new_zeros(N, K, dtype=ctype) if grad_teacher else student.new_empty(0)
    stats = student.new_zeros(N, 2, dtype=ctype)
    neg_inf = float("-inf")
    for rows in row_chunks(N, V, CHUNK_ELEMENTS):
        f, df = transform_logits(student[rows].to(ctype), logit_scale, softcap)
        a = f * inv_temperature
        sup = support[rows]
        idx = torch.where(sup, ids[rows], 0)
        a_s = torch.where(sup, a.gather(1, idx), torch.full_like(idx, neg_inf, dtype=ctype))
        # Renormalized: the student's normalizer is over S only (the full LSE is not needed).
        lse = torch.logsumexp(a_s if tail == TAIL_RENORMALIZE else a, dim=-1)
        lq = torch.where(sup, a_s - lse[:, None], a_s)
        lp = lp_k[rows].to(ctype)
        t, h, k = element_terms(spec, lp, lq)
        row = t.sum(-1)
        H = h.sum(-1)
        keep = valid[rows]
        kt = torch.zeros_like(H)
        if tail == TAIL_BUCKET:
            mass = torch.logsumexp(lq, dim=-1).clamp(max=0.0)  # log sum_S q
            # The tail summed directly over the columns off S, not as 1 - sum_S q: exact when
            # the support holds all but a sliver of the mass.
            a_off = a.clone()
            _scatter_support(a_off, idx, sup, torch.full_like(a_s, neg_inf))
            lq_tail = torch.logsumexp(a_off, dim=-1) - lse
            del a_off
            tt, ht, kt = element_terms(spec, lp_tail[rows].to(ctype), lq_tail)
            # No student tail (q_tail = 0): a teacher tail within the slack is rounding, dropped
            # (the backward, mass_slack = inf, drops it whenever q_tail = 0: its gradient is
            # only used when the loss is finite).
            forgive = (lq_tail == neg_inf) & (
                lp_tail[rows] <= (math.log(mass_slack) if mass_slack > 0 else neg_inf))
            tt, ht, kt = (torch.where(forgive, torch.zeros_like(x), x) for x in (tt, ht, kt))
            row = row + tt
        if tail != TAIL_RENORMALIZE:
            row = row + (lse - lse)  # NaN logits: NaN loss
        loss[rows] = _zero_where(keep, row)
        stats[rows, 0] = _zero_where(keep, lse)
        if tail == TAIL_BUCKET:
            stats[rows, 1] = _zero_where(keep, lq_tail)
        if grad_teacher:
            g_raw = teacher_vjp(raw[rows], sup, tail, alpha, torch.where(sup, k, 0.0).double(),
                                kt.double(), V)
            gt[rows] = _zero_where(keep, g_raw.to(ctype))
        if not grad_student:
            continue
        q_s = lq.exp()
        if tail == TAIL_RENORMALIZE:
            g = torch.zeros_like(a)
            vals = h - q_s * H[:, None]
        else:
            la = a - lse[:, None]
            g = -H[:, None] * la.exp()
            if tail == TAIL_BUCKET:
                # Off S: d lq_tail / d a_j = q_j Q_S / q_tail, the ratio q_j / q_tail (<= 1)
                # taken in log space; no tail mass (or no tail gradient): no term.
                coef = torch.where((ht != 0) & (lq_tail > neg_inf), ht * mass.exp(),
                                   torch.zeros_like(ht))
                ratio = torch.exp((la - lq_tail[:, None]).clamp(max=0.0))
                g = g + torch.where(coef[:, None] != 0, coef[:, None] * ratio,
                                    torch.zeros_like(g))
                vals = h - q_s * (H + ht)[:, None]
            else:
                vals = h - q_s * H[:, None]
        _scatter_support(g, idx, sup, vals)
        gs[rows] = _zero_where(keep, g * df * inv_temperature)
    return loss, gs, gt, stats


def sparse_divergence_bwd_torch(
    student: Tensor, ids: Tensor, teacher: Tensor, support: Tensor, valid: Tensor, stats: Tensor,
    grad_loss: Tensor, base: int, swap: bool, param: float, inv_temperature: float, tail: int,
    teacher_alpha: float, logit_scale: float, softcap: float,
) -> Tensor:
    """d loss / d student logits times grad_loss per row (the spec: recomputed whole)."""
    _, gs, _, _ = sparse_divergence_fwd_torch(
        student, ids, teacher, support, valid, base, swap, param, inv_temperature, tail,
        teacher_alpha, float("inf"), logit_scale, softcap, True, False)
    return (gs.to(grad_loss.dtype) * grad_loss[:, None]).to(student.dtype)


# ---- fk.divergence(kind="cauchy_schwarz" / "renyi"): weighted per-row log-sum-exps ---
def _scaled_logits(z: Tensor, scale: float, softcap: float,
                   inv_t: float) -> tuple[Tensor, Tensor | float]:
    """(a, da/dz) with a = transform(z) / T (fdiv_kernels.core._transforms)."""
    a, da = transform_logits(z, scale, softcap)
    return a * inv_t, da * inv_t


def _softmax_or_zero(x: Tensor, lse: Tensor) -> Tensor:
    """exp(x - lse) row-wise; 0 on rows whose lse is infinite (no mass, or an infinite term:
    nothing finite to differentiate)."""
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    dead = torch.isinf(lse)[:, None]
    return torch.where(dead, torch.zeros_like(x), torch.exp(x - safe[:, None]))


def lse_combination_fwd_torch(
    student: Tensor, teacher: Tensor, valid: Tensor, coeffs: list[float], inv_temperature: float,
    student_scale: float, student_softcap: float, teacher_scale: float, teacher_softcap: float,
    grad_student: bool, grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The torch statement of ``fdiv::lse_combination_fwd_<backend>`` (float64 sums):
    D = sum_k w_k lse(ca_k a + cb_k b) per row (``fdiv_kernels.divergences._row_kinds``)."""
    if len(coeffs) != 9:
        raise ValueError(f"coeffs must hold 9 numbers (ca, cb, w per term), got {len(coeffs)}")
    terms = [tuple(float(c) for c in coeffs[i:i + 3]) for i in (0, 3, 6)]
    if any(not math.isfinite(ca + cb + w) for ca, cb, w in terms):
        raise ValueError(f"coeffs must be finite, got {terms}")
    ctype = loss_dtype(student.dtype)
    wide = torch.promote_types(ctype, torch.float64)
    N, V = student.shape
    loss = student.new_empty(N, dtype=ctype)
    gs = torch.empty_like(student) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0)
    for rows in row_chunks(N, V, CHUNK_ELEMENTS):
        a, da = _scaled_logits(student[rows].to(wide), student_scale, student_softcap,
                               inv_temperature)
        b, db = _scaled_logits(teacher[rows].to(wide), teacher_scale, teacher_softcap,
                               inv_temperature)
        xs = [_mix(a, b, ca, cb) for ca, cb, _ in terms]
        # The maxima first, then the log-sums (as the kernels: exact 0 on identical CS rows). A
        # term with a +inf entry (a negative coefficient on a -inf logit) has lse = +inf: its
        # shift is +inf and its log-sum 0 (not inf - inf).
        maxes = [x.amax(-1) for x in xs]
        shifts = [torch.where(m == -math.inf, 0.0, m) for m in maxes]
        logs = [torch.where(m == math.inf, 0.0,
                            torch.log(torch.exp(x - torch.where(m == math.inf, 0.0, m)[:, None])
                                      .sum(-1)))
                for x, m in zip(xs, shifts)]
        lses = [m + ls for m, ls in zip(shifts, logs)]
        row = sum(w * m for (_, _, w), m in zip(terms, shifts))
        row = row + sum(w * ls for (_, _, w), ls in zip(terms, logs))
        keep = valid[rows]
        loss[rows] = _zero_where(keep, row.to(ctype))
        for want, out, slope, idx in ((grad_student, gs, da, 0), (grad_teacher, gt, db, 1)):
            if not want:
                continue
            g = torch.zeros_like(a)
            for term, x, lse in zip(terms, xs, lses):
                wc = term[2] * term[idx]
                if wc != 0:
                    g = g + wc * _softmax_or_zero(x, lse)
            out[rows] = _zero_where(keep, g * slope)
    return loss, gs, gt


def _mix(a: Tensor, b: Tensor, ca: float, cb: float) -> Tensor:
    """ca a + cb b, a zero coefficient dropping its input (0 * -inf would be NaN). A -inf from
    either side wins: a positive coefficient on a -inf logit (that outcome has no mass: p^alpha
    q^(1-alpha) = 0 at p = 0 whatever q) beats the +inf of a negative one."""
    x = (ca * a if ca else torch.zeros_like(a))
    y = (cb * b if cb else torch.zeros_like(b))
    return torch.where((x == -math.inf) | (y == -math.inf), -math.inf, x + y)


# ---- the teacher's side: fk.topk_logprobs ----------------------------------------------------


def topk_logprobs_fwd_torch(
    x: Tensor, k: int, inv_temperature: float, scale: float, softcap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The statement of ``fdiv::topk_logprobs_fwd_<backend>``: per row of a = transform(x) / T,
    the k largest a (descending, ties: lower id first; a NaN ranks as -inf) with their ids, and
    (m, log s), m = max a, s = sum exp(a - m) (log-probs are (a_i - m) - log s)."""
    ctype = loss_dtype(x.dtype)
    N, V = x.shape
    ids = x.new_empty(N, k, dtype=torch.int64)
    values = x.new_empty(N, k, dtype=ctype)
    stats = x.new_empty(N, 2, dtype=ctype)
    neg_inf = float("-inf")
    for rows in row_chunks(N, V, CHUNK_ELEMENTS):
        a = transform_logits(x[rows].to(ctype), scale, softcap)[0] * inv_temperature
        key = torch.where(torch.isnan(a), neg_inf, a)
        # A stable sort keeps equal values in id order: the lower id first, on every device.
        top, idx = torch.sort(key, dim=-1, descending=True, stable=True)
        ids[rows], values[rows] = idx[:, :k], top[:, :k]
        m = a.amax(-1)
        log_s = torch.log(torch.exp(a - torch.where(torch.isinf(m), 0.0, m)[:, None]).sum(-1))
        # An all -inf row: no mass, log s = -inf; a +inf logit: NaN (as log_softmax).
        log_s = torch.where(m == neg_inf, neg_inf, torch.where(m == -neg_inf, math.nan, log_s))
        stats[rows, 0], stats[rows, 1] = m, log_s
    return ids, values, stats


register(SoftmaxOps(
    "torch",
    divergence_fwd=define("divergence_fwd", "torch", divergence_fwd_torch),
    divergence_partials=define("divergence_partials", "torch", divergence_partials_torch),
    divergence_grads=define("divergence_grads", "torch", divergence_grads_torch),
    lse_combination_fwd=define("lse_combination_fwd", "torch", lse_combination_fwd_torch),
    sparse_divergence_fwd=define("sparse_divergence_fwd", "torch", sparse_divergence_fwd_torch),
    sparse_divergence_bwd=define("sparse_divergence_bwd", "torch", sparse_divergence_bwd_torch),
    softmax_stats_fwd=define("softmax_stats_fwd", "torch", softmax_stats_fwd_torch),
    softmax_stats_bwd=define("softmax_stats_bwd", "torch", softmax_stats_bwd_torch),
    topk_logprobs_fwd=define("topk_logprobs_fwd", "torch", topk_logprobs_fwd_torch),
    custom_kind_ops=("divergence_fwd", "divergence_partials", "divergence_grads",
                     "sparse_divergence_fwd", "sparse_divergence_bwd"),
))
