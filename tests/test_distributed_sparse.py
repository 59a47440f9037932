"""Sharded sparse teachers on 1-4 gloo processes (CPU) against the single-process ops:
``vocab_parallel_sparse_divergence``, its fused lm-head form, ``vocab_parallel_topk_logprobs``,
and ``vocab_size=`` / ``batch_invariant=True`` on the vocab-parallel ops.

Every rank builds the same full inputs from a seed, takes its columns (or weight rows), runs the
sharded op and compares the value and its slice of the gradients with the single-process op on the
full inputs. All cases of one world size run in one forked group of processes (start-up is the
cost), each reported back as its own pytest item.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import logits
from spawned_ranks import Cases

import fdiv_kernels as fk
import fdiv_kernels.distributed as fkd

LEAD, VOCAB, K, REAL = (2, 3), 29, 5, 24  # REAL: the vocab_size of the padded cases
N = LEAD[0] * LEAD[1]
# Uneven shards; world 3 has an empty shard, world 4 a last shard that is only padding columns
# in the padded cases (and one that straddles REAL in world 2 and 3).
CUTS = {1: [0, 29], 2: [0, 11, 29], 3: [0, 13, 13, 29], 4: [0, 3, 13, 24, 29]}
LABELS = torch.tensor([[1, -100, 3], [4, 5, 6]])  # row 1 ignored
KINDS = [("kl", {}), ("reverse_kl", {}), ("js", {"beta": 0.3}), ("skew_reverse_kl", {"lam": 0.2}),
         ("alpha", {"alpha": 2.5}), ("chi2", {}),
         ("tv", {})]
TAILS = ("none", "renormalize", "bucket")
TOL = (2e-5, 2e-6)

CASES = Cases()
case = CASES.case


def cols(rank: int, world: int) -> slice:
    return slice(CUTS[world][rank], CUTS[world][rank + 1])


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def teacher(seed: int, vocab: int = VOCAB, mass: float = 0.8):
    """(ids, log-probs, support mask) with a padding entry in row 0 (its id a repeat, its
    log-prob garbage): the mask is what makes it padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:K] for _ in range(N)]).reshape(*LEAD, K)
    lp = torch.log_softmax(logits((*LEAD, K), seed=seed + 1), -1) + math.log(mass)
    mask = torch.ones(*LEAD, K, dtype=torch.bool)
    mask[0, 0, -1] = False
    ids[0, 0, -1] = ids[0, 0, 0]
    lp[0, 0, -1] = 5.0
    return ids, lp, mask


# ------------------------------------------------------------------------------------------
# Cases (run inside the spawned ranks)
# ------------------------------------------------------------------------------------------


@case(1, 2, 3, 4)
def sparse_every_tail(rank, world, ck):
    """Value, student gradient (this rank's columns, 0 on padding columns) and teacher
    gradient against fk.sparse_divergence on the full logits, for every tail, a few kinds,
    re-tempering, a softcap, an ignored row, a padding entry and a padded vocabulary; one
    all_gather forward and nothing backward."""
    weights = 1.0 + 0.25 * logits(LEAD, seed=7)  # an upstream per-row gradient
    c = cols(rank, world)
    for i, (kind, kw) in enumerate(KINDS):
        for tail in TAILS:
            for padded in (False, True):
                vocab = REAL if padded else VOCAB
                s = logits((*LEAD, VOCAB), seed=100 + i)
                ids, lp, mask = teacher(200 + i, vocab)
                extra = dict(tail=tail, support_mask=mask, labels=LABELS, reduction="none", **kw)
                if i % 2:
                    extra.update(temperature=2.0, teacher_temperature=1.0)
                if i == 2:
                    extra.update(student_softcap=3.0, student_logit_scale=0.7)
                ss, lps = leaf(s[..., c]), leaf(lp)
                what = f"{kind} {tail} padded={padded} rank {rank}/{world}"
                with fkd.count_collectives() as fwd:
                    out = fkd.vocab_parallel_sparse_divergence(
                        ss, ids, lps, kind, vocab_start=c.start,
                        vocab_size=REAL if padded else None, **extra)
                with fkd.count_collectives() as bwd:
                    (out * weights).sum().backward()
                full, lpf = leaf(s[..., :vocab]), leaf(lp)
                ref = fk.sparse_divergence(full, ids, lpf, kind, **extra)
                (ref * weights).sum().backward()
                ck.close(out, ref, TOL, what + " loss")
                ref_grad = torch.zeros(*LEAD, VOCAB)
                ref_grad[..., :vocab] = full.grad
                ck.close(ss.grad, ref_grad[..., c], TOL, what + " student grad")
                ck.close(lps.grad, lpf.grad, TOL, what + " teacher grad")
                ck.true(bwd == [], f"{what}: backward collectives {bwd}")
                want = [("all_gather", (K + 1, N + 2))] if world > 1 else []
                ck.true([(x.op, x.shape) for x in fwd] == want, f"{what}: forward {fwd}")


@case(2, 4)
def sparse_reductions_dtypes_and_grads(rank, world, ck):
    """Scalar reductions (with num_items_in_batch), bf16 logits, float64 on the torch backend,
    and only one of the two gradients wanted."""
    from fdiv_kernels.distributed import _vocab_sparse

    c = cols(rank, world)
    ids, lp, mask = teacher(250)
    s = logits((*LEAD, VOCAB), seed=251)
    # Steps of one or two rows through the unfused op's local passes (forward and backward).
    saved, _vocab_sparse.CHUNK_ELEMENTS = _vocab_sparse.CHUNK_ELEMENTS, 20
    for what, dtype, kw in [("mean", torch.float32, dict(reduction="mean")),
                            ("sum", torch.float32, dict(reduction="sum")),
                            ("items", torch.float32, dict(num_items_in_batch=7)),
                            ("bf16", torch.bfloat16, dict(reduction="mean")),
                            ("fp64 torch", torch.float64, dict(backend="torch", tail="none")),
                            ("fp64", torch.float64, dict(tail="renormalize")),
                            ("triton", torch.float32, dict(backend="triton"))]:
        x = s.to(dtype)
        tol = (2e-2, 2e-3) if dtype == torch.bfloat16 else TOL
        if what == "triton" and world > 2:
            continue  # the interpreter is slow: once, on 2 ranks, is enough
        for grads in ((True, True), (True, False), (False, True))[: 1 if what == "triton" else 3]:
            ss = x[..., c].clone().requires_grad_(grads[0])
            lps = lp.clone().requires_grad_(grads[1])
            out = fkd.vocab_parallel_sparse_divergence(ss, ids, lps, "js", support_mask=mask,
                                                       labels=LABELS, vocab_start=c.start, **kw)
            full, lpf = leaf(x), leaf(lp)
            ref = fk.sparse_divergence(full, ids, lpf, "js", support_mask=mask, labels=LABELS,
                                       **kw)
            ref.backward()
            ck.close(out, ref, tol, f"{what} {grads} loss")
            out.backward()
            if grads[0]:
                ck.close(ss.grad, full.grad[..., c], tol, f"{what} {grads} d student")
            if grads[1]:
                ck.close(lps.grad, lpf.grad, tol, f"{what} {grads} d teacher")
    _vocab_sparse.CHUNK_ELEMENTS = saved


@case(2, 3)
def sparse_errors_on_every_rank(rank, world, ck):
    """A wrong vocab_start (the last rank shifted by one) raises the layout error on every rank,
    from the one all_gather the ops make anyway; so do ids out of range, a repeated id, too much
    bucket mass (the same checks as the single-process op); vocab_start=None raises first."""
    c = cols(rank, world)
    x = logits((*LEAD, VOCAB), seed=260)
    h, w, _ = head(261)
    ids, lp, mask = teacher(262)
    wrong = c.start + (1 if rank == world - 1 else 0)
    bad_id, repeat, heavy = ids.clone(), ids.clone(), lp.clone()
    bad_id[1, 1, 0] = VOCAB
    repeat[1, 1, 0] = repeat[1, 1, 1]
    heavy[1, 1] = heavy[1, 1] + 1.0
    empty = lp.clone()
    empty[1, 1] = float("-inf")  # nothing to renormalize
    calls = [
        ("sparse", "do not tile", lambda: fkd.vocab_parallel_sparse_divergence(
            x[..., c], ids, lp, support_mask=mask, vocab_start=wrong)),
        ("fused sparse", "do not tile", lambda: fkd.vocab_parallel_fused_linear_sparse_divergence(
            h, w[c], ids, lp, support_mask=mask, vocab_start=wrong)),
        ("topk", "do not tile", lambda: fkd.vocab_parallel_topk_logprobs(
            x[..., c], K, vocab_start=wrong)),
        ("id range", "teacher_ids must be in", lambda: fkd.vocab_parallel_sparse_divergence(
            x[..., c], bad_id, lp, support_mask=mask, vocab_start=c.start)),
        ("repeat", "must not repeat", lambda: fkd.vocab_parallel_sparse_divergence(
            x[..., c], repeat, lp, support_mask=mask, vocab_start=c.start)),
        ("mass", "mass", lambda: fkd.vocab_parallel_fused_linear_sparse_divergence(
            h, w[c], ids, heavy, support_mask=mask, vocab_start=c.start, chunk_size=2)),
        ("no vocab_start", "vocab_start is required", lambda:
            fkd.vocab_parallel_sparse_divergence(x[..., c], ids, lp, support_mask=mask)),
        ("topk k > V", "more than the vocabulary", lambda: fkd.vocab_parallel_topk_logprobs(
            x[..., c], VOCAB + 1, vocab_start=c.start)),
        ("no mass", "needs some mass", lambda: fkd.vocab_parallel_sparse_divergence(
            x[..., c], ids, empty, support_mask=mask, tail="renormalize", vocab_start=c.start)),
    ]
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dt = distribute_tensor(x, init_device_mesh("cpu", (world,)), [Shard(-1)])
    try:
        fkd.vocab_parallel_sparse_divergence(dt, ids, lp, support_mask=mask)
        ck.true(False, "a DTensor must raise")
    except TypeError as e:
        ck.true("to_local" in str(e), str(e))
    for name, match, call in calls:
        try:
            call()
            ck.true(False, f"{name}: must raise")
        except ValueError as e:
            ck.true(match in str(e), f"{name}: {e}")
            if match == "do not tile":
                ck.true(f"rank {world - 1}" in str(e), f"{name}: {e}")


@case(2, 3)
def sparse_ignored_rows_and_nan_off_support(rank, world, ck):
    """An ignored row's teacher is not read (out-of-range and repeated ids, a mass above 1), as
    in the single-process op, for the plain and the fused form; under "renormalize" a NaN logit
    off the support gets gradient 0 and leaves the loss finite, as there."""
    c = cols(rank, world)
    s = logits((*LEAD, VOCAB), seed=270)
    h, w, _ = head(273)
    ids, lp, mask = teacher(271)
    bad_ids, bad_lp = ids.clone(), lp.clone()
    bad_ids[0, 1] = torch.tensor([VOCAB + 5, 0, 0, -3, 1])  # row (0, 1): ignored by LABELS
    bad_lp[0, 1] = 0.0
    kw = dict(support_mask=mask, labels=LABELS, reduction="none")
    for tail in TAILS:
        ss = leaf(s[..., c])
        out = fkd.vocab_parallel_sparse_divergence(ss, bad_ids, bad_lp, tail=tail,
                                                   vocab_start=c.start, **kw)
        out.sum().backward()
        full = leaf(s)
        ref = fk.sparse_divergence(full, ids, lp, tail=tail, **kw)
        ref.sum().backward()
        ck.close(out, ref, TOL, f"{tail} ignored row: loss")
        ck.close(ss.grad, full.grad[..., c], TOL, f"{tail} ignored row: grad")
        fused = fkd.vocab_parallel_fused_linear_sparse_divergence(
            h, w[c], bad_ids, bad_lp, tail=tail, vocab_start=c.start, **kw)
        ck.close(fused, fk.fused_linear_sparse_divergence(h, w, ids, lp, tail=tail, **kw), TOL,
                 f"{tail} ignored row: fused loss")
    off = [j for j in range(VOCAB) if j not in ids[1, 0].tolist()][world]
    s_nan = s.clone()
    s_nan[1, 0, off] = float("nan")
    ss = leaf(s_nan[..., c])
    out = fkd.vocab_parallel_sparse_divergence(ss, ids, lp, tail="renormalize",
                                               vocab_start=c.start, **kw)
    out.sum().backward()
    full = leaf(s_nan)
    ref = fk.sparse_divergence(full, ids, lp, tail="renormalize", **kw)
    ref.sum().backward()
    ck.true(bool(torch.isfinite(out).all()), f"NaN off the support: loss {out}")
    ck.close(out, ref, TOL, "NaN off the support: loss")
    ck.true(bool(torch.isfinite(ss.grad).all()), "NaN off the support: a NaN gradient")
    ck.close(ss.grad, full.grad[..., c], TOL, "NaN off the support: grad")


H = 4


def head(seed: int):
    h = logits((*LEAD, H), seed=seed, scale=1.0)
    w = logits((VOCAB, H), seed=seed + 1, scale=1.0)
    b = logits((VOCAB,), seed=seed + 2, scale=0.5)
    return h, w, b


@case(1, 2, 3, 4)
def fused_sparse(rank, world, ck):
    """The lm-head form against fk.fused_linear_sparse_divergence on the full head: loss, dh,
    this rank's dW / db rows (0 on padding rows), d teacher log-probs, per reduction; chunks of
    4 rows (2 chunks); one all_gather per chunk and the dh all_reduce, nothing in a scalar
    reduction's backward."""
    c = cols(rank, world)
    for i, (kind, kw) in enumerate([("kl", {}), ("skew_reverse_kl", {"lam": 0.2})]):
        for tail in TAILS:
            for reduction in ("mean", "none"):
                padded = (i + len(tail)) % 2 == 1
                vocab = REAL if padded else VOCAB
                h, w, b = head(300 + i)
                ids, lp, mask = teacher(400 + i, vocab)
                extra = dict(tail=tail, support_mask=mask, labels=LABELS, reduction=reduction,
                             chunk_size=4, temperature=1.5, **kw)
                hh, ww, bb, lps = leaf(h), leaf(w[c]), leaf(b[c]), leaf(lp)
                what = f"{kind} {tail} {reduction} padded={padded} rank {rank}/{world}"
                up = 1.0 + 0.25 * logits(LEAD, seed=8) if reduction == "none" else 1.0
                with fkd.count_collectives() as fwd:
                    out = fkd.vocab_parallel_fused_linear_sparse_divergence(
                        hh, ww, ids, lps, kind, student_bias_shard=bb, vocab_start=c.start,
                        vocab_size=REAL if padded else None, **extra)
                with fkd.count_collectives() as bwd:
                    (out * up).sum().backward()
                rh, rw, rb, rlp = leaf(h), leaf(w[:vocab]), leaf(b[:vocab]), leaf(lp)
                ref = fk.fused_linear_sparse_divergence(rh, rw, ids, rlp, kind, student_bias=rb,
                                                        **extra)
                (ref * up).sum().backward()
                ck.close(out, ref, TOL, what + " loss")
                ck.close(hh.grad, rh.grad, TOL, what + " dh")
                ck.close(lps.grad, rlp.grad, TOL, what + " d teacher")
                gw, gb = torch.zeros(VOCAB, H), torch.zeros(VOCAB)
                gw[:vocab], gb[:vocab] = rw.grad, rb.grad
                ck.close(ww.grad, gw[c], TOL, what + " dW")
                ck.close(bb.grad, gb[c], TOL, what + " db")
                if tail == "bucket":  # the teacher's gradient alone (no head gradient wanted)
                    lpo = leaf(lp)
                    only = fkd.vocab_parallel_fused_linear_sparse_divergence(
                        h, w[c], ids, lpo, kind, student_bias_shard=b[c], vocab_start=c.start,
                        vocab_size=REAL if padded else None, **extra)
                    (only * up).sum().backward()
                    ck.close(lpo.grad, rlp.grad, TOL, what + " d teacher alone")
                if world == 1:
                    continue
                gathers = [("all_gather", (K + 1, 4 + 2)), ("all_gather", (K + 1, N - 4))]
                dh = [("all_reduce", (N, H))]
                got_f = [(x.op, x.shape) for x in fwd]
                got_b = [(x.op, x.shape) for x in bwd]
                if reduction == "none":
                    ck.true(got_f == gathers and got_b == dh, f"{what}: {got_f} / {got_b}")
                else:
                    ck.true(got_f == gathers + dh and got_b == [], f"{what}: {got_f} / {got_b}")


@case(2, 3)
def fused_sparse_batch_invariant(rank, world, ck):
    """batch_invariant=True: a row's loss and dh are bit-identical whether it runs with the
    whole batch or with a slice of it (and close to the single-process op)."""
    c = cols(rank, world)
    h, w, b = head(500)
    ids, lp, mask = teacher(600)
    flat = dict(reduction="none", batch_invariant=True, vocab_start=c.start,
                student_bias_shard=b[c])
    rows = slice(1, 4)
    outs = []
    for sl in (slice(0, N), rows):
        hh = leaf(h.reshape(N, H)[sl])
        out = fkd.vocab_parallel_fused_linear_sparse_divergence(
            hh, w[c], ids.reshape(N, K)[sl], lp.reshape(N, K)[sl],
            support_mask=mask.reshape(N, K)[sl], **flat)
        out.sum().backward()
        outs.append((out.detach(), hh.grad))
    (full, gfull), (part, gpart) = outs
    ck.true(torch.equal(full[rows], part), f"loss rows differ: {full[rows]} vs {part}")
    ck.true(torch.equal(gfull[rows], gpart), "dh rows differ")
    ref = fk.fused_linear_sparse_divergence(h, w, ids, lp, support_mask=mask, student_bias=b,
                                            reduction="none")
    ck.close(full, ref.reshape(N), TOL, "batch-invariant loss vs single process")


def topk_reference(x, k, T, scale, cap, top_p):
    """log_softmax(f(x) / T) in float64, its k best sorted (ties by the lower id), and the
    top_p prefix."""
    z = x.double() * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    lp = torch.log_softmax(z / T, -1)
    order = lp.argsort(dim=-1, descending=True, stable=True)[..., :k]  # stable: lower id first
    top = lp.gather(-1, order)
    p = top.exp()
    if top_p is None:
        return order, top, None
    # fk.topk_logprobs' mask: the nucleus prefix, never an entry of zero probability; masked
    # entries hold id -1 and log-prob -inf.
    mask = ((p.cumsum(-1) - p) < top_p) & (top > float("-inf"))
    return torch.where(mask, order, -1), top.masked_fill(~mask, float("-inf")), mask


@case(1, 2, 3, 4)
def topk_logprobs(rank, world, ck):
    """Global ids (int32, exact, ties by the lower id across shards), log-probs and the top_p
    mask against log_softmax(x).topk on the full row; one all_gather of 2k + 2 float64 a row.
    Logits of 1e30 (a log-prob (a - M) - log S, not a - LSE, which keeps no digit of log S)."""
    c = cols(rank, world)
    x = logits((*LEAD, VOCAB), seed=700)
    x[0, 1] = x[0, 1].round()  # many ties, across shards
    x[1, 2, 2:] = float("-inf")  # fewer finite entries than k
    for padded in (False, True):
        vocab = REAL if padded else VOCAB
        for T, scale, cap, top_p in [(1.0, 1.0, None, None), (0.7, 1.3, 4.0, 0.9),
                                     (2.0, 1.0, None, 0.5)]:
            what = f"T={T} cap={cap} top_p={top_p} padded={padded} rank {rank}/{world}"
            with fkd.count_collectives() as fwd:
                out = fkd.vocab_parallel_topk_logprobs(
                    x[..., c], K, temperature=T, logit_scale=scale, softcap=cap, top_p=top_p,
                    vocab_start=c.start, vocab_size=REAL if padded else None)
            ids, lp, mask = topk_reference(x[..., :vocab], K, T, scale, cap, top_p)
            ck.true(out[0].dtype == torch.int32 and torch.equal(out[0].long(), ids),
                    f"{what}: ids {out[0].tolist()} vs {ids.tolist()}")
            ck.close(out[1], lp, TOL, what + " log-probs")
            ck.true((out.support_mask is None) == (top_p is None), what + ": support_mask")
            if top_p is not None:
                ck.true(torch.equal(out[2], mask), f"{what}: mask {out[2]} vs {mask}")
            want = [("all_gather", (2 * K + 2, N + 2), 8 * (2 * K + 2) * (N + 2))]
            got = [(x.op, x.shape, x.nbytes) for x in fwd]
            ck.true(got == (want if world > 1 else []), f"{what}: collectives {got}")
    # The produced teacher goes straight into the sharded sparse loss.
    ids, lp, _ = fkd.vocab_parallel_topk_logprobs(x[..., c] * 0.5, K, vocab_start=c.start)
    s = leaf(x[..., c])
    out = fkd.vocab_parallel_sparse_divergence(s, ids, lp, vocab_start=c.start)
    ref = fk.sparse_divergence(x, ids, lp)
    ck.close(out, ref, TOL, "topk -> sparse divergence")
    # Huge logits: two tied maxima of 1e30 (on rank 0 and the last rank) hold all the mass.
    big = torch.zeros(N, VOCAB)
    big[:, 0] = big[:, VOCAB - 1] = 1e30
    out = fkd.vocab_parallel_topk_logprobs(big[:, c], 3, vocab_start=c.start)
    want = torch.tensor([-math.log(2), -math.log(2), -1e30]).expand(N, 3)
    ck.true(torch.equal(out.ids[:, :2].long(), torch.tensor([0, VOCAB - 1]).expand(N, 2)),
            f"1e30: ids {out.ids}")
    ck.close(out.logprobs, want, TOL, "1e30: log-probs")


@case(1, 2, 3, 4)
def vocab_size_dense_ops(rank, world, ck):
    """vocab_size= on the dense vocab-parallel ops: equal to the single-process op on the first
    REAL columns (rows of the heads), exactly zero gradient on the padding (which on world 4 is
    a whole shard); a vocab_size past the shards' total raises on every rank."""
    c = cols(rank, world)
    up = 1.0 + 0.25 * logits(LEAD, seed=9)
    s, t = logits((*LEAD, VOCAB), seed=800), logits((*LEAD, VOCAB), seed=801)
    cut = dict(vocab_start=c.start, vocab_size=REAL)

    def pad(g):  # the single-process gradient of the first REAL columns, widened with zeros
        out = torch.zeros(*g.shape[:-1], VOCAB, dtype=g.dtype)
        out[..., :REAL] = g
        return out[..., c]

    ss, tt = leaf(s[..., c]), leaf(t[..., c])
    out = fkd.vocab_parallel_divergence(ss, tt, "js", beta=0.3, labels=LABELS, reduction="none",
                                        temperature=1.5, **cut)
    (out * up).sum().backward()
    rs, rt = leaf(s[..., :REAL]), leaf(t[..., :REAL])
    ref = fk.divergence(rs, rt, "js", beta=0.3, labels=LABELS, reduction="none", temperature=1.5)
    (ref * up).sum().backward()
    ck.close(out, ref, TOL, "divergence")
    ck.close(ss.grad, pad(rs.grad), TOL, "divergence d student")
    ck.close(tt.grad, pad(rt.grad), TOL, "divergence d teacher")
    stats = [
        ("token_logprobs", lambda x: fkd.vocab_parallel_token_logprobs(x, LABELS, 1.5, **cut),
         lambda x: fk.token_logprobs(x, LABELS, 1.5)),
        ("entropy", lambda x: fkd.vocab_parallel_entropy(x, 1.5, **cut),
         lambda x: fk.entropy(x, 1.5)),
        ("logsumexp", lambda x: fkd.vocab_parallel_logsumexp(x, **cut),
         lambda x: fk.logsumexp(x, -1)),
    ]
    for name, op, single in stats:
        ss, rs = leaf(s[..., c]), leaf(s[..., :REAL])
        (op(ss) * up).sum().backward()
        ref = single(rs)
        (ref * up).sum().backward()
        ck.close(op(s[..., c]), ref, TOL, name)
        ck.close(ss.grad, pad(rs.grad), TOL, name + " grad")
    h, w, b = head(810)
    ht, wt, _ = head(820)
    hh, ww, bb, wwt = leaf(h), leaf(w[c]), leaf(b[c]), leaf(wt[c])
    out = fkd.vocab_parallel_fused_linear_divergence(
        hh, ww, ht, wwt, "kl", student_bias_shard=bb, chunk_size=4, labels=LABELS, **cut)
    out.backward()
    rh, rw, rb, rwt = leaf(h), leaf(w[:REAL]), leaf(b[:REAL]), leaf(wt[:REAL])
    fk.fused_linear_divergence(rh, rw, ht, rwt, "kl", student_bias=rb, chunk_size=4,
                               labels=LABELS).backward()
    ck.close(hh.grad, rh.grad, TOL, "fused dh")
    ck.close(ww.grad, pad(rw.grad.t()).t(), TOL, "fused dW")
    ck.close(wwt.grad, pad(rwt.grad.t()).t(), TOL, "fused dW teacher")
    ck.close(bb.grad, pad(rb.grad), TOL, "fused db")
    if world > 1:
        try:  # every rank raises, from the layouts its all_gather carries
            fkd.vocab_parallel_divergence(s[..., c], t[..., c], vocab_start=c.start,
                                          vocab_size=VOCAB + 1)
            ck.true(False, "vocab_size past the shards must raise")
        except ValueError as e:
            ck.true("vocab_size" in str(e), str(e))


def _fused_dense_row(c, n, pos, invariant):
    """One row's loss and dh under vocab_parallel_fused_linear_divergence at n rows."""
    fh = 64  # wide enough that BLAS picks different kernels for 1 and 33 rows
    w, wt = logits((VOCAB, fh), seed=900, scale=0.3), logits((VOCAB, fh), seed=901, scale=0.3)
    hs, ht = logits((n, fh), seed=902 + n), logits((n, fh), seed=903 + n)
    hs[pos], ht[pos] = logits((fh,), seed=904), logits((fh,), seed=905)
    hs = hs.requires_grad_(True)
    out = fkd.vocab_parallel_fused_linear_divergence(
        hs, w[c], ht, wt[c], "js", beta=0.3, reduction="none", vocab_start=c.start,
        batch_invariant=invariant)
    (dh,) = torch.autograd.grad(out.sum(), hs)
    return out.detach()[pos], dh[pos]


@case(2, 3)
def fused_dense_batch_invariant(rank, world, ck):
    """batch_invariant=True on the vocab-parallel fused divergence: the row's loss and dh are
    bit-identical alone, among 33 rows (last) and among 7 (middle)."""
    c = cols(rank, world)
    first = _fused_dense_row(c, 1, 0, True)
    for n, pos in ((33, 32), (7, 3)):
        got = _fused_dense_row(c, n, pos, True)
        ck.true(all(torch.equal(x, y) for x, y in zip(first, got)), f"n={n}: the row changed")
    # Why the flag exists (and that the check above can fail): by default it changes.
    a, b = _fused_dense_row(c, 1, 0, False), _fused_dense_row(c, 33, 32, False)
    ck.true(not all(torch.equal(x, y) for x, y in zip(a, b)), "default: no change seen")


# ------------------------------------------------------------------------------------------
# The harness: one forked group of processes per world size, results per case.
# ------------------------------------------------------------------------------------------


@case(3, 4)
def fused_default_chunks_agree(rank, world, ck):
    """Without chunk_size each rank's budget chunk follows its shard width (world 3 has an empty
    shard): the fused TP forms agree on the smallest, so their per-chunk collectives pair up.
    A budget of ~40 elements per chunk makes the widths' chunks differ here."""
    import fdiv_kernels.distributed._fused_linear_sparse_tp as sparse_tp
    import fdiv_kernels.fused_linear._engine as engine

    c = cols(rank, world)
    h, w, b = head(900)
    ids, lp, mask = teacher(901)
    budget = lambda m, vocab, *rest: max(1, min(m, 40 // max(vocab, 1)))  # noqa: E731
    saved = (sparse_tp.cpu_chunk_rows, engine.default_chunk_size)
    sparse_tp.cpu_chunk_rows, engine.default_chunk_size = budget, budget
    try:
        out = fkd.vocab_parallel_fused_linear_sparse_divergence(
            leaf(h), leaf(w[c]), ids, lp, "js", support_mask=mask, vocab_start=c.start,
            reduction="none")
        dense = fkd.vocab_parallel_fused_linear_divergence(
            leaf(h), leaf(w[c]), leaf(h), leaf(w[c].flip(1)), "js", vocab_start=c.start,
            reduction="none")
    finally:
        sparse_tp.cpu_chunk_rows, engine.default_chunk_size = saved
    ref = fk.fused_linear_sparse_divergence(h, w, ids, lp, "js", support_mask=mask,
                                            reduction="none")
    ref_dense = fk.fused_linear_divergence(h, w, h, w.flip(1), "js", reduction="none")
    ck.close(out, ref, TOL, "fused sparse, default chunks")
    ck.close(dense, ref_dense, TOL, "fused dense, default chunks")


@pytest.mark.parametrize("world,name", CASES.params())
def test_sharded_sparse(world, name):
    CASES.check(world, name)
