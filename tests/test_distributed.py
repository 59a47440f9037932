"""fdiv_kernels.distributed on 1-4 gloo processes (CPU) against the single-process ops.

Every rank builds the same full logits from a seed, takes its columns, runs the vocab-parallel
op, and compares values and its slice of the gradients with the plain op on the full logits.
Process start-up is the cost, so all cases of one world size run in ONE forked group of
processes (``spawned_ranks.Cases``), each case reported back as its own pytest item.
"""

from __future__ import annotations

import pytest
import spawned_ranks
import torch
import torch.distributed as dist
from conftest import GRAD_TOL, LOSS_TOL
from helpers import grad_tol
from reference import divergence_with_grads, logits
from spawned_ranks import Cases

import fdiv_kernels as fk
import fdiv_kernels.distributed as fkd
from fdiv_kernels import phases
from fdiv_kernels.distributed import _comm
from fdiv_kernels.distributed._vocab_divergence import FROM_LOSS

F32 = torch.float32
KIND_PARAMS = [("kl", {}), ("reverse_kl", {}), ("js", {"beta": 0.3}), ("tv", {}),
               ("hellinger", {}), ("chi2", {}), ("alpha", {"alpha": -0.5}),
               ("skew_kl", {"lam": 0.2}), ("skew_reverse_kl", {}), ("jeffreys", {}),
               ("soft_ce", {})]
LEAD, VOCAB, REAL = (2, 4), 48, 41  # columns REAL.. are -inf padding in the padded cases
N = LEAD[0] * LEAD[1]
# Shard boundaries per world size: uneven; world 3 has an empty shard, world 4 a shard that
# holds only padding columns in the padded cases.
CUTS = {1: [0, 48], 2: [0, 17, 48], 3: [0, 20, 20, 48], 4: [0, 3, 20, 41, 48]}
# Global label ids with a label in every shard of every world size, and two ignored rows.
LABELS = torch.tensor([[0, 5, 18, 25], [40, 45, -100, -100]])
LABELS_PADDED = torch.tensor([[0, 5, 18, 25], [40, 2, -100, -100]])  # no label on padding

CASES = Cases(lambda: Checks())  # the subclass below
case = CASES.case


def full_pair(pad: bool, seed: int = 0):
    s, t = logits((*LEAD, VOCAB), seed=seed + 1), logits((*LEAD, VOCAB), seed=seed + 2)
    if pad:
        s[..., REAL:] = float("-inf")
        t[..., REAL:] = float("-inf")
    return s, t


def cols(rank: int, world: int) -> slice:
    return slice(CUTS[world][rank], CUTS[world][rank + 1])


# fp32 results of sharded and single-process runs differ by summation order; chi2's teacher
# gradient (k - p sum k, sum k ~ 1e4 on these logits) shows it most. Held to twice the table's
# tolerance against each other and against the float64 reference (which the single-process
# fused op itself misses by up to 1.5x on reverse_kl here: h - q (D + 1) cancels).
PAIR_TOL = {"loss": tuple(2 * v for v in LOSS_TOL[F32]),
            "grad": tuple(2 * v for v in GRAD_TOL[F32])}


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


class Checks(spawned_ranks.Checks):
    """The shared checks plus the collectives a case issued."""

    def collectives(self, log, world, expected, what=""):
        """``expected``: [(op, shape)] of fp32 when world > 1, nothing otherwise."""
        got = [(c.op, c.shape, c.nbytes) for c in log]
        want = [(op, shape, 4 * torch.Size(shape).numel()) for op, shape in expected]
        self.true(got == (want if world > 1 else []), f"{what}: collectives {got}, expected {want}")


# ------------------------------------------------------------------------------------------
# Cases (run inside the spawned ranks)
# ------------------------------------------------------------------------------------------


@case(1, 2, 3, 4)
def divergence_every_kind(rank, world, ck):
    weights = 1.0 + 0.25 * logits(LEAD, seed=7)  # upstream per-row gradient: scaling checked
    for i, (kind, kw) in enumerate(KIND_PARAMS):
        for T in (1.0, 2.0):
            for pad in (False, True):
                s, t = full_pair(pad, seed=10 * i)
                labels = LABELS_PADDED if pad else LABELS
                ss, tt = leaf(s[..., cols(rank, world)]), leaf(t[..., cols(rank, world)])
                with fkd.count_collectives() as fwd:
                    loss = fkd.vocab_parallel_divergence(ss, tt, kind, temperature=T,
                                                         labels=labels, reduction="none", **kw)
                with fkd.count_collectives() as bwd:
                    (loss * weights).sum().backward()
                S, Tt = leaf(s), leaf(t)
                ref = fk.divergence(S, Tt, kind, temperature=T, labels=labels,
                                    reduction="none", **kw)
                (ref * weights).sum().backward()
                what = f"{kind} T={T} pad={pad}"
                if world == 1:  # the plain op, bit for bit
                    plain = fk.divergence(leaf(s), leaf(t), kind, temperature=T, labels=labels,
                                          reduction="none", **kw)
                    ck.true(torch.equal(loss, plain), what)
                c = cols(rank, world)
                ck.close(loss, ref, PAIR_TOL["loss"], what + " loss")
                ck.close(ss.grad, S.grad[..., c], grad_tol(PAIR_TOL["grad"], S.grad),
                         what + " student grad")
                ck.close(tt.grad, Tt.grad[..., c], grad_tol(PAIR_TOL["grad"], Tt.grad),
                         what + " teacher grad")
                # The float64 reference on the real columns; padding columns get zero gradient.
                keep = (labels != -100).double()
                real = slice(0, REAL if pad else VOCAB)
                param = next(iter(kw.values()), None)
                r64, gs64, gt64 = divergence_with_grads(s[..., real], t[..., real], kind, param,
                                                        T, weights * keep)
                ck.close(loss, r64 * keep, PAIR_TOL["loss"], what + " loss vs float64")
                for g, g64, who in ((ss.grad, gs64, "student"), (tt.grad, gt64, "teacher")):
                    g64 = torch.nn.functional.pad(g64, (0, VOCAB - g64.shape[-1]))
                    ck.close(g, g64[..., c], PAIR_TOL["grad"], f"{what} {who} grad vs float64")
                ncol = 1 if kind in FROM_LOSS else 3
                ck.collectives(fwd, world, [("all_gather", (2, N)), ("all_reduce", (N, ncol))],
                               what)
                ck.true(bwd == [], what + f" backward collectives {bwd}")


@case(2, 3)
def divergence_reductions_and_student_only(rank, world, ck):
    """mean with a tensor num_items_in_batch, sum; student-only gradients send 2 columns for js."""
    s, t = full_pair(pad=True, seed=3)
    c = cols(rank, world)
    for reduction, n_items in (("mean", torch.tensor(5.0)), ("mean", None), ("sum", None)):
        ss = leaf(s[..., c])
        tt = t[..., c].clone()  # teacher without grad
        with fkd.count_collectives() as fwd, HostSyncs() as syncs:
            loss = fkd.vocab_parallel_divergence(ss, tt, "js", temperature=2.0,
                                                 labels=LABELS_PADDED, reduction=reduction,
                                                 num_items_in_batch=n_items)
            loss.backward()
        ck.true(syncs.calls == [], f"{reduction}: host syncs {syncs.calls}")
        S = leaf(s)
        ref = fk.divergence(S, t, "js", temperature=2.0, labels=LABELS_PADDED,
                            reduction=reduction, num_items_in_batch=n_items)
        ref.backward()
        ck.close(loss, ref, LOSS_TOL[F32], reduction)
        ck.close(ss.grad, S.grad[..., c], GRAD_TOL[F32], reduction)
        ck.collectives(fwd, world, [("all_gather", (2, N)), ("all_reduce", (N, 2))], reduction)


def lockstep_gradcheck(fn, inputs, rank, world) -> bool:
    """gradcheck on each rank in turn while the others replay its forwards unperturbed (a rank
    perturbing its inputs at the same time would move the replicated output too). Before each
    forward the checking rank broadcasts 2 (grad mode on), 1 (off) or 0 (done)."""
    ok = True
    for checker in range(world):
        flag = torch.zeros(1)
        if rank == checker:
            def announced(*args):
                dist.broadcast(torch.tensor([2.0 if torch.is_grad_enabled() else 1.0]), checker)
                return fn(*args)
            ok = torch.autograd.gradcheck(announced, inputs, raise_exception=False)
            dist.broadcast(flag, checker)
            continue
        while True:
            dist.broadcast(flag, checker)
            if flag.item() == 0:
                break
            with torch.set_grad_enabled(flag.item() == 2):
                fn(*inputs)
    return ok


@case(2)
def gradcheck_float64(rank, world, ck):
    """Float64 gradcheck of the vocab-parallel Functions. Every rank perturbs its own inputs in
    lockstep, so the shards are even (one forward, hence one set of collectives, per element)."""
    c = slice(3 * rank, 3 * rank + 3)
    s, t = (logits((3, 3 * world), torch.float64, seed=90 + i)[:, c].requires_grad_()
            for i in (0, 1))
    labels = torch.tensor([1, -100, 3 * world - 2])
    for name, fn in [
        ("js", lambda a, b: fkd.vocab_parallel_divergence(
            a, b, "js", labels=labels, temperature=2.0, reduction="none", backend="torch")),
        ("alpha", lambda a, b: fkd.vocab_parallel_divergence(
            a, b, "alpha", alpha=1.5, reduction="none", backend="torch")),
        ("token_logprobs", lambda a, b: fkd.vocab_parallel_token_logprobs(
            a, labels, 2.0, vocab_start=3 * rank, backend="torch")),
    ]:
        ck.true(lockstep_gradcheck(fn, (s, t), rank, world), f"gradcheck {name}")


@case(2, 3)
def divergence_16_bit(rank, world, ck):
    """bf16 / fp16 logits: fp32 statistics, gradients in the input dtype, as the plain op."""
    c = cols(rank, world)
    for dtype in (torch.bfloat16, torch.float16):
        for kind in ("kl", "js"):
            s, t = (x.to(dtype) for x in full_pair(pad=True, seed=80))
            ss, tt = leaf(s[..., c]), leaf(t[..., c])
            loss = fkd.vocab_parallel_divergence(ss, tt, kind, labels=LABELS_PADDED,
                                                 temperature=2.0)
            loss.backward()
            S, Tt = leaf(s), leaf(t)
            ref = fk.divergence(S, Tt, kind, labels=LABELS_PADDED, temperature=2.0)
            ref.backward()
            what = f"{kind} {dtype}"
            ck.true(loss.dtype == torch.float32 and ss.grad.dtype == dtype, what + " dtypes")
            ck.close(loss, ref, LOSS_TOL[dtype], what + " loss")
            ck.close(ss.grad, S.grad[..., c], GRAD_TOL[dtype], what + " student grad")
            ck.close(tt.grad, Tt.grad[..., c], GRAD_TOL[dtype], what + " teacher grad")


@case(1, 2, 3, 4)
def softmax_statistics(rank, world, ck):
    c = cols(rank, world)
    weights = logits(LEAD, seed=8)
    starts = dict(vocab_start=CUTS[world][rank])
    for pad in (False, True):
        x = full_pair(pad, seed=20)[0]
        labels = LABELS_PADDED if pad else LABELS
        for T in (1.0, 2.0):
            ops = [
                ("logsumexp", 1, lambda z: fkd.vocab_parallel_logsumexp(z),
                 lambda z: fk.logsumexp(z, -1)),
                ("entropy", 2, lambda z: fkd.vocab_parallel_entropy(z, T),
                 lambda z: fk.entropy(z, T)),
                ("token_logprobs", 3,
                 lambda z: fkd.vocab_parallel_token_logprobs(z, labels, T, **starts),
                 lambda z: fk.token_logprobs(z, labels, T)),
            ]
            for name, floats, ours, plain in ops:
                # token_logprobs' all_gather also carries the ranks' layouts (2 numbers a piece)
                extra = 2 if name == "token_logprobs" else 0
                xs = leaf(x[..., c])
                with fkd.count_collectives() as fwd:
                    out = ours(xs)
                with fkd.count_collectives() as bwd:
                    (out * weights).sum().backward()
                X = leaf(x)
                ref = plain(X)
                (ref * weights).sum().backward()
                what = f"{name} T={T} pad={pad}"
                if world == 1:
                    ck.true(torch.equal(out, plain(leaf(x[..., c]))), what)
                ck.close(out, ref, LOSS_TOL[F32], what)
                ck.close(xs.grad, X.grad[..., c], GRAD_TOL[F32], what + " grad")
                ck.collectives(fwd, world, [("all_gather", (floats, N + extra))], what)
                ck.true(bwd == [], what + f" backward collectives {bwd}")


@case(2, 3)
def token_logprobs_label_nobody_owns_is_nan(rank, world, ck):
    x = full_pair(False, seed=21)[0]
    labels = LABELS.clone()
    labels[0, 0] = VOCAB + 3  # out of the global vocabulary: no rank owns it
    out = fkd.vocab_parallel_token_logprobs(x[..., cols(rank, world)], labels,
                                            vocab_start=CUTS[world][rank])
    ck.true(bool(torch.isnan(out[0, 0])) and not torch.isnan(out[0, 1:]).any(), "NaN row")
    try:  # every rank raises before any collective
        fkd.vocab_parallel_token_logprobs(x[..., cols(rank, world)], labels)
        ck.true(False, "vocab_start=None with several ranks must raise")
    except ValueError as e:
        ck.true("vocab_start is required" in str(e), str(e))


@case(2, 3)
def wrong_layout_raises_on_every_rank(rank, world, ck):
    """A vocab_start that overlaps another rank's columns (or leaves a gap) raises on every rank,
    from the layouts the op's all_gather already carries: no silently wrong log-prob."""
    x, t = full_pair(False, seed=22)
    c = cols(rank, world)
    wrong = c.start + (1 if rank == world - 1 else 0)  # the last rank shifted by one
    for name, call in [
        ("token_logprobs", lambda: fkd.vocab_parallel_token_logprobs(
            x[..., c], LABELS, vocab_start=wrong)),
        ("divergence", lambda: fkd.vocab_parallel_divergence(
            x[..., c], t[..., c], "kl", vocab_start=wrong)),
    ]:
        try:
            call()
            ck.true(False, f"{name}: a wrong vocab_start must raise")
        except ValueError as e:
            ck.true("do not tile" in str(e) and f"rank {world - 1}" in str(e), str(e))


@case(2)
def functional_collectives_path(rank, world, ck):
    """The torch.compile path (functional collectives), run eagerly on gloo."""
    s, t = full_pair(pad=True, seed=4)
    c = cols(rank, world)
    _comm.FUNCTIONAL = True
    try:
        ss, tt = leaf(s[..., c]), leaf(t[..., c])
        loss = fkd.vocab_parallel_divergence(ss, tt, "jeffreys", labels=LABELS_PADDED)
        loss.backward()
        lp = fkd.vocab_parallel_token_logprobs(s[..., c], LABELS_PADDED,
                                               vocab_start=CUTS[world][rank])
    finally:
        _comm.FUNCTIONAL = False
    S, Tt = leaf(s), leaf(t)
    ref = fk.divergence(S, Tt, "jeffreys", labels=LABELS_PADDED)
    ref.backward()
    ck.close(loss, ref, LOSS_TOL[F32], "loss")
    ck.close(ss.grad, S.grad[..., c], GRAD_TOL[F32], "student grad")
    ck.close(tt.grad, Tt.grad[..., c], GRAD_TOL[F32], "teacher grad")
    ck.close(lp, fk.token_logprobs(s, LABELS_PADDED), LOSS_TOL[F32], "token_logprobs")


@case(2)
def compiled_fullgraph(rank, world, ck):
    """torch.compile(fullgraph=True) traces the Function and its functional collectives (no
    graph break); dynamo's "eager" backend keeps the run short on CI's CPUs (aot_eager, which
    also traces the backward, passes too but takes ~2x longer)."""
    s, t = full_pair(pad=True, seed=70)
    c = cols(rank, world)

    def loss_fn(a, b):
        return fkd.vocab_parallel_divergence(a, b, "js", labels=LABELS_PADDED, backend="torch")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="eager")
    ss = leaf(s[..., c])
    loss = compiled(ss, t[..., c])
    loss.backward()
    S = leaf(s)
    ref = fk.divergence(S, t, "js", labels=LABELS_PADDED)
    ref.backward()
    ck.close(loss, ref, PAIR_TOL["loss"], "compiled loss")
    ck.close(ss.grad, S.grad[..., c], PAIR_TOL["grad"], "compiled student grad")


@case(1, 2, 3, 4)
def fused_linear_column_parallel(rank, world, ck):
    """Both lm heads sharded by vocabulary rows (padding: bias -inf), chunks of 3 rows."""
    Hs, Ht, chunk = 5, 7, 3
    hs, ht = logits((*LEAD, Hs), seed=40), logits((*LEAD, Ht), seed=41)
    ws, wt = logits((VOCAB, Hs), seed=42, scale=0.5), logits((VOCAB, Ht), seed=43, scale=0.5)
    bs, bt = logits((VOCAB,), seed=44), logits((VOCAB,), seed=45)
    bs[REAL:], bt[REAL:] = float("-inf"), float("-inf")
    c = cols(rank, world)
    weights = 1.0 + 0.25 * logits(LEAD, seed=46)
    chunks = [min(chunk, N - lo) for lo in range(0, N, chunk)]
    for kind, kw, T, reduction, reduce_dh, ce in [
        ("kl", {}, 1.0, "mean", True, 0.0), ("js", {"beta": 0.3}, 2.0, "sum", True, 0.0),
        ("jeffreys", {}, 1.0, "none", True, 0.0), ("skew_kl", {}, 2.0, "mean", False, 0.0),
        ("kl", {}, 2.0, "mean", True, 0.3), ("hellinger", {}, 1.0, "none", False, 0.6),
    ]:
        what = f"{kind} T={T} {reduction} reduce_hidden_grad={reduce_dh} ce_weight={ce}"
        mine = [leaf(x) for x in (hs, ws[c], bs[c], ht, wt[c], bt[c])]
        with fkd.count_collectives() as fwd:
            loss = fkd.vocab_parallel_fused_linear_divergence(
                mine[0], mine[1], mine[3], mine[4], kind, temperature=T,
                student_bias_shard=mine[2], teacher_bias_shard=mine[5], labels=LABELS_PADDED,
                reduction=reduction, chunk_size=chunk, reduce_hidden_grad=reduce_dh,
                ce_weight=ce, vocab_start=c.start, **kw)
        with fkd.count_collectives() as bwd:
            (loss * weights if reduction == "none" else loss).sum().backward()
        full = [leaf(x) for x in (hs, ws, bs, ht, wt, bt)]
        ref = fk.fused_linear_divergence(
            full[0], full[1], full[3], full[4], kind, temperature=T, student_bias=full[2],
            teacher_bias=full[5], labels=LABELS_PADDED, reduction=reduction, chunk_size=chunk,
            ce_weight=ce, **kw)
        (ref * weights if reduction == "none" else ref).sum().backward()
        if world == 1:
            ck.true(torch.equal(loss, ref), what + " bit-identical")
        ck.close(loss, ref, PAIR_TOL["loss"], what + " loss")
        for i, name in enumerate(("dh_s", "dW_s", "db_s", "dh_t", "dW_t", "db_t")):
            got, want = mine[i].grad, full[i].grad
            if name.startswith("dh") and not reduce_dh and world > 1:
                got = got.clone()
                dist.all_reduce(got)  # the caller's region op
            want = want if name.startswith("dh") else want[c]
            # dh sums V products over the ranks in another order: its fp32 error scales with the
            # largest element, not with each (an element near 0 was 8.6e-5 relative off).
            ck.close(got, want, grad_tol(PAIR_TOL["grad"], want), f"{what} {name}")
        ncol = 1 if kind in FROM_LOSS else 3
        # The first chunk's all_gather also carries the ranks' layouts (2 numbers a piece).
        per_chunk = [x for i, r in enumerate(chunks)
                     for x in (("all_gather", (5 if ce else 2, r + (2 if i == 0 else 0))),
                               ("all_reduce", (r, ncol)))]
        dh = [("all_reduce", (N, Hs)), ("all_reduce", (N, Ht))] if reduce_dh else []
        if reduction == "none":
            ck.collectives(fwd, world, per_chunk, what + " forward")
            ck.collectives(bwd, world, dh, what + " backward (dh only)")
        else:
            ck.collectives(fwd, world, per_chunk + dh, what + " forward")
            ck.true(bwd == [], what + f" backward collectives {bwd}")


@case(2, 3, 4)
def dtensor_shard_last_dim(rank, world, ck):
    """DTensors placed Shard(-1) (47 columns: uneven chunks) into the vocab-parallel ops, and
    fk.divergence / fk.token_logprobs / fk.entropy inside loss_parallel()."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    s, t = (x[..., :47].contiguous() for x in full_pair(pad=False, seed=50))
    weights = 1.0 + 0.25 * logits(LEAD, seed=51)

    def dt(x):
        return distribute_tensor(x, mesh, [Shard(2)]).requires_grad_(True)

    S, Tt = leaf(s), leaf(t)
    ref = fk.divergence(S, Tt, "js", labels=LABELS, temperature=2.0)
    ref.backward()
    X = leaf(s)
    ref_lp = fk.token_logprobs(X, LABELS, 2.0)
    (ref_lp * weights).sum().backward()
    ref_ent = fk.entropy(s, 2.0)

    for how in ("vocab_parallel", "loss_parallel"):
        sd, td, xd = dt(s), dt(t), dt(s)
        with fkd.count_collectives() as log:
            if how == "vocab_parallel":
                loss = fkd.vocab_parallel_divergence(sd, td, "js", labels=LABELS,
                                                     temperature=2.0)
                loss.backward()
                lp = fkd.vocab_parallel_token_logprobs(xd, LABELS, 2.0)
                (lp.to_local() * weights).sum().backward()
                ent = fkd.vocab_parallel_entropy(dt(s), 2.0)
            else:
                with fkd.loss_parallel():
                    loss = fk.divergence(sd, td, "js", labels=LABELS, temperature=2.0)
                    loss.backward()
                    lp = fk.token_logprobs(xd, LABELS, 2.0)
                    (lp.to_local() * weights).sum().backward()
                    ent = fk.entropy(dt(s), 2.0)
        what = how
        ck.collectives(log, world, [("all_gather", (2, N)), ("all_reduce", (N, 3)),
                                    ("all_gather", (3, N)), ("all_gather", (2, N))], what)
        ck.close(loss.full_tensor(), ref, PAIR_TOL["loss"], what + " divergence")
        ck.close(sd.grad.full_tensor(), S.grad, PAIR_TOL["grad"], what + " student grad")
        ck.close(td.grad.full_tensor(), Tt.grad, PAIR_TOL["grad"], what + " teacher grad")
        ck.close(lp.full_tensor(), ref_lp, PAIR_TOL["loss"], what + " token_logprobs")
        ck.close(xd.grad.full_tensor(), X.grad, PAIR_TOL["grad"], what + " token_logprobs grad")
        ck.close(ent.full_tensor(), ref_ent, PAIR_TOL["loss"], what + " entropy")
    # The student entropy of sharded rows is not computed under loss_parallel(): a clear error.
    with fkd.loss_parallel():
        try:
            fk.divergence(dt(s), dt(t), "js", return_stats=True)
            raised = ""
        except NotImplementedError as e:
            raised = str(e)
    ck.true("vocab_parallel_entropy" in raised, f"loss_parallel return_stats raises: {raised!r}")


class HostSyncs(torch.overrides.TorchFunctionMode):
    """Records the tensor-to-Python conversions (host syncs on a GPU) the wrappers make."""

    SYNCS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist,
             torch.Tensor.__int__, torch.Tensor.__float__}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@case(2)
def data_parallel_num_items_in_batch(rank, world, ck):
    """One global batch split over 2 ranks (rank 1's micro-batch fully masked), normalized by
    the all-reduced count of kept rows, summed gradients = the single-process gradient."""
    h, hw = logits((8, 6), seed=30), logits((11, 6), seed=31)
    t, tw = logits((8, 6), seed=32), logits((11, 6), seed=33)
    labels = torch.tensor([3, -100, 7, 1, 0, -100, -100, -100])
    rows = slice(0, 5) if rank == 0 else slice(5, 8)  # rank 1 holds only ignored rows
    count = (labels[rows] != -100).sum().to(torch.float32)
    dist.all_reduce(count)  # the global count, a tensor: no host sync below
    ops = {
        "divergence": lambda x, w, lab, n: fk.divergence(
            x @ w.T, t[rows] @ tw.T if n is not None else t @ tw.T, "js", labels=lab,
            num_items_in_batch=n),
        "fused_linear_divergence": lambda x, w, lab, n: fk.fused_linear_divergence(
            x, w, t[rows] if n is not None else t, tw, "js", labels=lab, num_items_in_batch=n),
    }
    for name, op in ops.items():
        w = leaf(hw)
        with HostSyncs() as syncs:
            loss = op(h[rows], w, labels[rows], count)
            loss.backward()
        ck.true(syncs.calls == [], f"{name}: host syncs {syncs.calls}")
        if rank == 1:
            ck.true(loss.requires_grad and loss.grad_fn is not None and float(loss.detach()) == 0.0,
                    f"{name}: a fully masked rank returns a graph-connected zero")
        grad = w.grad.clone()
        dist.all_reduce(grad)
        W = leaf(hw)
        op(h, W, labels, None).backward()
        ck.close(grad, W.grad, (0.0, 1e-6), name)


# ------------------------------------------------------------------------------------------
# The harness: one forked group of processes per world size, results per case.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world,name", CASES.params())
def test_vocab_parallel(world, name):
    CASES.check(world, name)


# ------------------------------------------------------------------------------------------
# In this process (no process group): the single-rank path and the column savings.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,kw", [(k, kw) for k, kw in KIND_PARAMS if k in FROM_LOSS]
                         + [("alpha", {"alpha": 2.5}), ("alpha", {"alpha": 0.3})])
def test_sums_that_follow_from_the_loss(kind, kw):
    """The identities that let these kinds all-reduce one column: sum h, sum k from D."""
    s, t = full_pair(pad=True, seed=60)
    s, t = s.reshape(N, VOCAB), t.reshape(N, VOCAB)
    lse_s, lse_t = phases.row_lse(s), phases.row_lse(t)
    sums = phases.partials(s, t, lse_s, lse_t, kind, backend="torch", **kw).double()
    param = next(iter(kw.values()), 0.0)
    h, k = FROM_LOSS[kind](sums[:, 0], param)
    torch.testing.assert_close(h, sums[:, 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, sums[:, 2], rtol=1e-5, atol=1e-5)


def test_one_rank_without_process_group_is_the_plain_op():
    assert not dist.is_initialized()
    s, t = full_pair(pad=True, seed=61)
    with fkd.count_collectives() as log:
        for kind, kw in KIND_PARAMS:
            a = fkd.vocab_parallel_divergence(s, t, kind, labels=LABELS_PADDED, temperature=2.0,
                                              reduction="none", **kw)
            b = fk.divergence(s, t, kind, labels=LABELS_PADDED, temperature=2.0,
                              reduction="none", **kw)
            assert torch.equal(a, b), kind
        assert torch.equal(fkd.vocab_parallel_logsumexp(s), fk.logsumexp(s, -1))
        assert torch.equal(fkd.vocab_parallel_entropy(s, 2.0), fk.entropy(s, 2.0))
        assert torch.equal(fkd.vocab_parallel_token_logprobs(s, LABELS_PADDED, 2.0),
                           fk.token_logprobs(s, LABELS_PADDED, 2.0))
        h, w = logits((N, 5), seed=62), logits((VOCAB, 5), seed=63)
        assert torch.equal(
            fkd.vocab_parallel_fused_linear_divergence(h, w, h, w.flip(0), "js", chunk_size=3),
            fk.fused_linear_divergence(h, w, h, w.flip(0), "js", chunk_size=3))
    assert log == []


def test_bad_arguments():
    s, t = full_pair(pad=False, seed=64)
    with pytest.raises(ValueError, match="group was given"):
        fkd.vocab_parallel_divergence(s, t, group=object())
    with pytest.raises(TypeError, match="vocab_start must be an int"):
        fkd.vocab_parallel_divergence(s, t, vocab_start=1.5)
    with pytest.raises(ValueError, match="vocab_start must be >= 0"):
        fkd.vocab_parallel_token_logprobs(s, LABELS, vocab_start=-1)
    with pytest.raises(TypeError, match="reduce_hidden_grad must be a bool"):
        fkd.vocab_parallel_fused_linear_divergence(s[0], t[0, :, :5].T, s[0], t[0, :, :5].T,
                                                   reduce_hidden_grad=1)
