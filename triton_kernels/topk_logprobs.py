"""Each row's k largest transformed logits with the row's log-sum-exp, in one read of the row
(fk.topk_logprobs, the teacher's side of top-k distillation).

One program per row walks V in blocks. Each block feeds the online (max, sum) and, when it can
change the running top-k, is merged with it: k rounds of max-extraction over the k running slots
and the block, each round taking the best value left (ties: the lower id) into the next slot.
A block whose best value is not above the running k-th (and which comes after k values were
seen) cannot enter, since its ids are all larger: it costs only its max. With random logits
the running k-th quickly rises above almost every later block, so the merges, O(k BLOCK) each,
stay a few per row; a row sorted ascending merges every block (O(k V), still correct).

Ranking: larger value first, then the lower id; a NaN ranks as -inf (its row's statistics are
NaN). Outputs: ids (N, k) int64, values (N, k) float32 of a = f(x) / T, best first, and stats
(N, 2) = (m, log s), m = max a, s = sum exp(a - m). The statement of record is
topk_logprobs_fwd_torch in fdiv_kernels/backends/torch_ref.py.
"""

import torch
import triton
import triton.language as tl

from fdiv_kernels.triton_kernels.logit_transform import load_logits, transform_scalars
from fdiv_kernels.triton_kernels.online_softmax import online_update

MAX_BLOCK = 1024  # columns per block (at least the k slots' power of two); tests lower it
# Beyond every column id: "no entry left" in a round of the merge (a constexpr: the compiler
# rejects plain globals inside @triton.jit).
BIG_ID = tl.constexpr(2147483647)


@triton.jit
def _topk_logprobs_fwd_kernel(
    # data ptrs
    x_ptr, ids_ptr, values_ptr, stats_ptr,
    # sizes and strides
    V, K, stride_x,
    # scalars (k1, c2: the transform's, see logit_transform.transform_scalars)
    k1, c2,
    # features
    CAP: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    slot = tl.arange(0, KP)
    # The running top-k: values, ids and which slots hold an entry.
    run_v = tl.full([KP], float("-inf"), tl.float32)
    run_i = tl.zeros([KP], tl.int32)
    run_ok = slot < 0
    n_ok = tl.zeros([], tl.int32)
    thr = tl.full([], float("-inf"), tl.float32)  # the worst value kept, once n_ok == K
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        a, _ = load_logits(x_row, cols, V, k1, c2, CAP)
        m, s = online_update(m, s, a)
        blk_ok = cols < V
        key = tl.where(blk_ok & (a == a), a, float("-inf"))  # NaN ranks last
        if (n_ok < K) | (tl.max(key, 0) > thr):
            new_v = tl.full([KP], float("-inf"), tl.float32)
            new_i = tl.zeros([KP], tl.int32)
            new_ok = slot < 0
            for t in range(K):
                rk = tl.where(run_ok, run_v, float("-inf"))
                bk = tl.where(blk_ok, key, float("-inf"))
                mx = tl.maximum(tl.max(rk, 0), tl.max(bk, 0))
                rid = tl.min(tl.where(run_ok & (run_v == mx), run_i, BIG_ID), 0)
                bid = tl.min(tl.where(blk_ok & (key == mx), cols, BIG_ID), 0)
                pick = tl.minimum(rid, bid)
                run_ok = run_ok & (run_i != pick)
                blk_ok = blk_ok & (cols != pick)
                here = (slot == t) & (pick < BIG_ID)
                new_v = tl.where(here, mx, new_v)
                new_i = tl.where(here, pick, new_i)
                new_ok = new_ok | here
            run_v, run_i, run_ok = new_v, new_i, new_ok
            n_ok = tl.sum(run_ok.to(tl.int32), 0)
            thr = tl.min(tl.where(run_ok, run_v, float("inf")), 0)
    out = slot < K
    tl.store(ids_ptr + row * K + slot, run_i.to(tl.int64), mask=out)
    tl.store(values_ptr + row * K + slot, run_v, mask=out)
    # An all -inf row: s = 0, log s = -inf (no mass); a +inf logit or a NaN: NaN statistics.
    log_s = tl.where(m == float("inf"), float("nan"), tl.log(s))
    m = tl.where(log_s != log_s, float("nan"), m)
    tl.store(stats_ptr + row * 2, m)
    tl.store(stats_ptr + row * 2 + 1, log_s)


def topk_logprobs_fwd(x, k, inv_temperature, scale, softcap):
    """(ids (N, k) int64, values (N, k) float32, stats (N, 2) float32) for (N, V) contiguous x."""
    N, V = x.shape
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V] = [1, {V}], got {k}")
    f32 = dict(dtype=torch.float32, device=x.device)
    ids = torch.empty(N, k, dtype=torch.int64, device=x.device)
    values = torch.empty(N, k, **f32)
    stats = torch.empty(N, 2, **f32)
    if N == 0:  # an empty batch: nothing to launch
        return ids, values, stats
    kp = triton.next_power_of_2(k)
    block = max(min(triton.next_power_of_2(V), MAX_BLOCK), kp)
    _topk_logprobs_fwd_kernel[(N,)](
        x, ids, values, stats,
        V, k, x.stride(0),
        *transform_scalars(float(scale), float(softcap), float(inv_temperature))[:2],
        CAP=bool(softcap), KP=kp, BLOCK=block, num_warps=4,
    )
    return ids, values, stats


def launch_variants(widths=(1000, 128256), ks=(1, 64, 200),
                    dtypes=(torch.bfloat16, torch.float16, torch.float32)):
    """Every launch of the launcher per dtype, row width and k (the slots' power of two), plus
    the softcapped variant, as (labels, call) on one-row CPU inputs: see
    ``divergence.launch_variants``."""
    for V in widths:
        for dt in dtypes:
            for k in ks:
                def fwd(V=V, dt=dt, k=k):
                    topk_logprobs_fwd(torch.randn(1, V, dtype=dt), k, 1.0, 1.0, 0.0)
                yield {"dtype": str(dt).removeprefix("torch."), "V": V, "k": k}, fwd
    for dt in dtypes:
        def fwd_cap(dt=dt, V=widths[0]):
            topk_logprobs_fwd(torch.randn(1, V, dtype=dt), 64, 0.5, 0.0625, 30.0)
        yield {"dtype": str(dt).removeprefix("torch."), "V": widths[0], "k": 64,
               "softcap": 30.0}, fwd_cap
