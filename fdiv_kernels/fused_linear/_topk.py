r"""``fk.fused_linear_topk_logprobs``: a teacher's top-k log-probs from its hidden states, without
the (N, V) logits.

Rows go through in chunks, and each chunk walks the vocabulary in tiles of the weight: per tile
the logits z = h W_tile^T + b_tile are formed in fp32 (``_engine.gemm_f32``), the top-k op
(``fdiv::topk_logprobs_fwd_<backend>``) returns the tile's best k transformed logits and its
(max, log-sum), and a running top-k per row is merged with them (a stable sort of 2k values:
the running entries come first and hold the lower ids, so ties still go to the lower id). The
tiles' (max, log-sum) pairs combine into the row's at the end. Memory: one (chunk, tile) fp32
buffer, never (N, V). Forward only: a teacher runs under ``torch.no_grad``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fdiv_kernels.core import _validation as V
from fdiv_kernels.core._ops import SoftmaxOps, select_ops
from fdiv_kernels.fused_linear import _engine as E
from fdiv_kernels.stats._topk import (
    TopKLogprobs,
    check_k,
    check_out_dtypes,
    check_scale,
    check_top_p,
    finish,
    logprobs_of,
)

# Vocabulary columns per tile, and the bytes of fp32 (chunk, tile) logits a chunk may hold (rows
# per chunk = budget / (4 tile)): large enough that the tile GEMMs stay efficient and each tile's
# fresh top-k is amortized over many columns, small next to the (N, V) logits eager code forms
# (1024 x 128256 fp32: 525 MB, twice with the log-softmax). Measured on the CPU (H = 256,
# V = 128256, K = 64, 2 shared threads): with 8192-column tiles (N = 256) the tile GEMMs took 2x
# the one full GEMM and the top-k kernel 2.7x its one pass over whole rows; with 32768-column
# tiles (N = 1024) the tile GEMMs took no longer than the full GEMM, which is then ~2/3 of the
# time.
VOCAB_TILE = {"cuda": 32768, "cpu": 32768}
CHUNK_BYTES = {"cuda": 512 << 20, "cpu": 128 << 20}


def _merge(run_v: Tensor | None, run_i: Tensor | None, v: Tensor, i: Tensor,
           k: int) -> tuple[Tensor, Tensor]:
    """The best k of the running entries and a tile's (both best first, the running ids lower)."""
    if run_v is None:
        return v, i
    v, i = torch.cat([run_v, v], 1), torch.cat([run_i, i], 1)
    # Stable: equal values keep their order, the running (lower) ids ahead of the tile's.
    v, order = torch.sort(v, dim=1, descending=True, stable=True)
    return v[:, :k], i.gather(1, order[:, :k])


def _row_stats(ms: list[Tensor], log_ss: list[Tensor]) -> Tensor:
    """(m, log s) of whole rows from the tiles' (m_t, log s_t): m = max m_t,
    log s = log sum_t exp(m_t - m + log s_t); -inf for rows with no mass, NaN stays NaN."""
    m_t, ls_t = torch.stack(ms), torch.stack(log_ss)
    m = m_t.amax(0)
    dead = m == -math.inf
    shifted = torch.where(dead, torch.zeros_like(m), m)
    log_s = torch.logsumexp((m_t - shifted) + ls_t, dim=0)
    log_s = torch.where(dead, torch.full_like(m, -math.inf), log_s)
    return torch.stack([m, log_s], 1)


def fused_linear_topk_logprobs(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    top_p: float | None = None,
    ids_dtype: torch.dtype = torch.int32,
    logprobs_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    backend: str = "auto",
) -> TopKLogprobs:
    r""":func:`fk.topk_logprobs` of the logits ``hidden @ weight.T + bias``, without forming them.

    With z = hidden W^T + b (fp32, as the fused forms), a = f(z) / T the transformed logits
    (f: z -> ``logit_scale`` z, then c tanh(z / c) with c = ``softcap``) and
    L = log sum_j exp(a_j) over all V:

        ids = argtopk_k(a)   (descending; ties: the lower id first)
        logprobs_i = a_{ids_i} - L

    and ``top_p`` masks as in :func:`fk.topk_logprobs`. The result equals
    ``fk.topk_logprobs(hidden @ weight.T + bias, k, ...)`` on fp32 logits. Rows are chunked
    (``chunk_size``) and each chunk walks the vocabulary in tiles of ``vocab_chunk_size``
    weight rows: per tile one fp32 GEMM and one top-k kernel launch, merged into a running
    top-k and log-sum-exp per row. Peak memory beyond the outputs is one (chunk, tile) fp32
    buffer (16-bit CPU weights are widened once per call, as in the other fused forms).

    Forward only: with grad enabled and an input that requires grad, it raises (a teacher runs
    under ``torch.no_grad``; use :func:`fk.topk_logprobs` on the logits for a gradient).

    Args:
        hidden: (..., H) hidden states (any leading shape, zero rows allowed).
        weight: (V, H) lm-head weight.
        k: entries per row, 1 <= k <= V.
        bias: (V,) or None.
        temperature: T > 0.
        logit_scale: the model's logit scale (finite, positive; None: 1).
        softcap: the model's final-logit softcap (finite, positive; None: none).
        top_p: None, or the nucleus mass in (0, 1] (see :func:`fk.topk_logprobs`).
        ids_dtype: torch.int32 (default) or torch.int64.
        logprobs_dtype: torch.float32, torch.float16, torch.bfloat16 or torch.float64; None:
            float32 (float64 for float64 inputs).
        chunk_size: rows per chunk (default: a memory budget per device).
        vocab_chunk_size: weight rows per vocabulary tile (default: 32768).
        backend: the top-k kernel's backend, "auto", "triton", "cpu" or "torch".

    Returns:
        :class:`TopKLogprobs` (ids, logprobs, support_mask), each (..., k).
    """
    h, weight, bias = E.check_head("hidden", hidden, "weight", weight, "bias", bias)
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    E.check_devices(h, weight, bias)
    k = check_k(k, vocab)
    acc = torch.promote_types(torch.promote_types(h.dtype, weight.dtype), torch.float32)
    inv_t = V.check_temperature(temperature, acc)
    scale, cap = check_scale(logit_scale, softcap)
    top_p = check_top_p(top_p)
    ids_dtype, lp_dtype = check_out_dtypes(ids_dtype, logprobs_dtype, acc)
    chunk = E.check_chunk_size(chunk_size)
    tile = E.check_chunk_size(vocab_chunk_size, "vocab_chunk_size")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (h, weight, bias)):
        raise RuntimeError("fused_linear_topk_logprobs is forward-only: call it under "
                           "torch.no_grad() (or pass detached tensors); for a gradient use "
                           "fk.topk_logprobs on the logits")
    dev = h.device
    tile = min(vocab, tile or VOCAB_TILE.get(dev.type, VOCAB_TILE["cpu"]))
    lead = h.shape[:-1]
    rows = h.reshape(-1, h.shape[-1])
    n = rows.shape[0]
    if chunk is None:
        budget = CHUNK_BYTES.get(dev.type, CHUNK_BYTES["cpu"])
        chunk = E.default_chunk_size(n, tile, dev, budget, buffers=1)
    probe = torch.empty(0, dtype=acc, device=dev)
    ops: SoftmaxOps = select_ops(backend, probe, "topk_logprobs_fwd", transforms=(scale, cap))
    w = E.operand(weight)
    ids = torch.empty(n, k, dtype=torch.int64, device=dev)
    lp = torch.empty(n, k, dtype=acc, device=dev)
    with torch.no_grad():
        for r in E.chunks(n, max(chunk, 1)):
            hc = rows[r]
            run_v = run_i = None
            ms, log_ss = [], []
            for v0 in range(0, vocab, tile):
                v1 = min(vocab, v0 + tile)
                z = E.gemm_f32(hc, w[v0:v1].t())
                if bias is not None:
                    z = z + bias[v0:v1].to(z.dtype)
                t_ids, t_v, t_stats = ops.topk_logprobs_fwd(z.contiguous(), min(k, v1 - v0),
                                                            inv_t, scale, cap)
                del z  # before the next tile's GEMM: one (chunk, tile) buffer alive, not two
                run_v, run_i = _merge(run_v, run_i, t_v, t_ids + v0, k)
                ms.append(t_stats[:, 0])
                log_ss.append(t_stats[:, 1])
            ids[r] = run_i
            lp[r] = logprobs_of(run_v, _row_stats(ms, log_ss))
    return finish(ids, lp, lead, top_p, ids_dtype, lp_dtype)


__all__ = ["fused_linear_topk_logprobs"]
