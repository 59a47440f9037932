"""The chunk engine every fused-linear form runs on: lm heads + a per-row kernel, the (N, V) logits
never materialized.

What the forms (dense divergence, sparse teacher, token log-probs, vocabulary-parallel) share is
written once here:

* argument checks of the heads (hidden states, weights, biases) and of the row arguments
  (labels, ``ignore_index``, ``reduction``, ``num_items_in_batch``, ``ce_weight``, ``chunk_size``);
* the row weights that fold the reduction into the gradients (kept rows / the mean's denominator);
* kept-row packing: rows whose label is ``ignore_index`` are dropped before the GEMMs (one host
  sync for their count; not under ``torch.compile``), so a 70%-masked batch does 30% of the work;
* chunk sizing from a memory budget, and the chunk loop: per chunk the heads' logits are formed
  in fp32 (z = h W^T + b, autocast off), the form's callback runs its kernel on them and returns
  d loss / d z per head, already row-weighted, and the engine accumulates dh, dW, db in fp32.

A form is a callback ``step(rows, z) -> {head: dz}`` plus its own autograd.Function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from fdiv_kernels.core import _validation as V

# Bytes of fp32 (chunk, V) buffers per chunk (about four live at once: two logits, padding or a
# CE gradient, the divergence gradient). GPUs get more so the chunk GEMMs stay efficient.
CHUNK_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}
# batch_invariant=True: one fixed GEMM block per form, vocabulary and device. It is the form's
# budget chunk rounded down to a power of two (a power-of-two batch then fills whole blocks: at
# N=1024 a 1008-row cap padded the log-prob form to 1440 rows, 1.38x the default), at most
# INVARIANT_BLOCK_MAX rows (a small vocabulary's budget chunk is huge, and a short batch is padded
# up to the block). A block, or a user's chunk_size, is a whole number of INVARIANT_ROW_TILE
# rows: with 5 or 6 rows MKL runs the last rows in an edge tile and a row's result changes with
# its position in the block (measured; 16 covers the 4-, 8- and 16-row tiles of CPU and GPU
# GEMM kernels).
INVARIANT_BLOCK_MAX = 1024
INVARIANT_ROW_TILE = 16


def default_chunk_size(n: int, vocab: int, device: torch.device, budget: int | None = None,
                       buffers: int = 4) -> int:
    """Rows per chunk such that ``buffers`` fp32 (chunk, vocab) buffers fit ``budget`` bytes
    (default: the device's entry of ``CHUNK_BUDGET_BYTES``)."""
    if budget is None:
        budget = CHUNK_BUDGET_BYTES.get(device.type, CHUNK_BUDGET_BYTES["cpu"])
    return max(1, min(n, budget // (buffers * 4 * max(vocab, 1))))


def gemm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 (fp64 for fp64) result: bf16 logits would cost gradient accuracy."""
    if a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64):
        return a @ b
    if torch.float64 in (a.dtype, b.dtype):  # mixed with fp64: the fp64 result, not fp32's
        return a.double() @ b.double()
    if a.is_cuda:  # 16-bit operands, fp32 accumulation and output
        low = b.dtype if b.dtype in (torch.float16, torch.bfloat16) else a.dtype
        return torch.mm(a.to(low), b.to(low), out_dtype=torch.float32)
    return a.float() @ b.float()  # CPU has no fp32-output 16-bit GEMM


def operand(w: Tensor) -> Tensor:
    """The weight as the GEMMs use it: CPU 16-bit weights are widened once per call."""
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) and not w.is_cuda else w


# ---- argument checks ---------------------------------------------------------------------------


def check_weight(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (V, H), got shape {tuple(x.shape)}")
    return x


def check_head(hidden_name: str, hidden: object, weight_name: str, weight: object,
               bias_name: str, bias: object) -> tuple[Tensor, Tensor, Tensor | None]:
    """(hidden (..., H), weight (V, H), bias (V,) or None), checked, on one device."""
    h = V.check_logits(hidden_name, hidden)
    w = check_weight(weight_name, weight)
    if w.shape[1] != h.shape[-1]:
        raise ValueError(f"{weight_name} must be (V, {h.shape[-1]}) to match {hidden_name}, got "
                         f"{tuple(w.shape)}")
    return h, w, check_bias(bias_name, bias, w.shape[0])


def check_bias(name: str, bias: object, vocab: int) -> Tensor | None:
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (vocab,)):
        raise ValueError(f"{name} must be a tensor of shape ({vocab},), got "
                         f"{getattr(bias, 'shape', type(bias).__name__)}")
    return bias


def check_devices(*tensors: Tensor | None) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def check_chunk_size(chunk_size: object, name: str = "chunk_size") -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name} must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def check_ce_weight(ce_weight: object, labels: object) -> float:
    w = V.check_real("ce_weight", ce_weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], got {w}")
    if w and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    return w


def check_label_range(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Labels in [0, vocab) or ``ignore_index``: one host sync buys a clear error."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if not torch.compiler.is_compiling() and bool(bad.any()):
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}, "
                         f"got {labels[bad][0].item()}")


# ---- rows ----------------------------------------------------------------------------------------


@dataclass
class Rows:
    """The rows a fused form runs on, after packing.

    lead: the leading shape of the inputs; n: their row count. ``kept``: indices of the rows that
    run (None: all of them, in order); ``valid``: the mask of the rows that run, or None when
    every row that runs is kept (a mask is left only under ``torch.compile``, where rows are not
    packed). ``labels``: flat int64 labels of the rows that run (None without labels).
    ``weights``: fp32 (fp64) per-row weights, kept / denominator for "mean", kept for "sum" and
    "none". ``chunk``: rows per chunk. ``fixed``: batch-invariant mode, every chunk GEMM runs at
    ``chunk`` rows (the last one padded), ``chunk`` independent of the row count.
    """

    lead: torch.Size
    n: int
    kept: Tensor | None
    valid: Tensor | None
    labels: Tensor | None
    weights: Tensor
    reduction: str
    chunk: int
    fixed: bool = False

    @property
    def count(self) -> int:
        """Rows that run."""
        return self.weights.shape[0]

    def take(self, x: Tensor) -> Tensor:
        """The rows of a flat (n, ...) tensor that run."""
        return x if self.kept is None else x.index_select(0, self.kept)

    def scatter(self, per_row: Tensor) -> Tensor:
        """A per-row result of the rows that run, back in the leading shape (0 on dropped rows)."""
        if self.kept is not None:
            per_row = per_row.new_zeros(self.n).index_copy(0, self.kept, per_row)
        return per_row.reshape(self.lead)

    def keep_mask(self) -> Tensor:
        """A bool mask of the rows that run (all True once packed)."""
        if self.valid is not None:
            return self.valid
        return torch.ones(self.count, dtype=torch.bool, device=self.weights.device)


def kept_rows(valid: Tensor | None) -> Tensor | None:
    """Indices of the kept rows in order, or None when packing would gain nothing.

    The one host sync of the forms: the count of kept rows sets how many chunks run (TRL's
    trainer syncs the same way, through a boolean index). Under ``torch.compile`` rows are not
    packed (a data-dependent shape would break the graph): ignored rows then cost their GEMMs.
    """
    if valid is None or torch.compiler.is_compiling():
        return None
    kept = valid.nonzero().squeeze(1)
    return None if kept.numel() == valid.numel() else kept


def rows(lead: torch.Size, device: torch.device, acc: torch.dtype, *, labels: object,
         ignore_index: object, reduction: object, num_items_in_batch: object,
         chunk_size: object, vocab: int, pack: bool = True,
         chunk_of: Callable[[int], int] | None = None, batch_invariant: object = False) -> Rows:
    """Check the row arguments shared by every form and plan the rows: mask, packing, weights,
    chunks. ``chunk_of(n_rows)`` gives the default chunk for the rows that run.
    ``batch_invariant``: plan one fixed GEMM block (``invariant_block``) whatever the row count."""
    if not isinstance(batch_invariant, bool):
        raise TypeError(f"batch_invariant must be a bool, got {type(batch_invariant).__name__}")
    reduction = V.check_reduction(reduction)
    denom = V.check_num_items(num_items_in_batch)
    chunk = check_chunk_size(chunk_size)
    n = math.prod(lead)
    valid = V.row_mask(labels, ignore_index, lead, device)
    flat_labels = (V.check_labels(labels, ignore_index, lead, device).reshape(-1)
                   .to(torch.int64).contiguous() if labels is not None else None)
    keep = valid if valid is not None else torch.ones(n, dtype=torch.bool, device=device)
    # Row weights fold the reduction into the gradients: kept rows / denominator.
    weights = keep.to(acc)
    if reduction == "mean":
        if denom is None:
            denom = weights.sum().clamp(min=1)
        elif isinstance(denom, Tensor):
            denom = denom.to(device=device, dtype=acc)
        weights = weights / denom
    kept = kept_rows(valid) if pack else None
    if kept is not None:
        weights = weights.index_select(0, kept)
        if flat_labels is not None:
            flat_labels = flat_labels.index_select(0, kept)
    count = weights.shape[0]
    if chunk is None:
        chunk_of = chunk_of or (lambda m: default_chunk_size(m, vocab, device))
        chunk = invariant_block(chunk_of) if batch_invariant else chunk_of(count)
    return Rows(lead=lead, n=n, kept=kept, valid=valid if kept is None else None,
                labels=flat_labels, weights=weights, reduction=reduction, chunk=max(1, chunk),
                fixed=batch_invariant)


def invariant_block(chunk_of: Callable[[int], int]) -> int:
    """The chunk of batch-invariant mode: the form's budget chunk for an unbounded row count (so
    it depends on the vocabulary and device only), capped, a power of two of whole row tiles."""
    block = min(INVARIANT_BLOCK_MAX, chunk_of(1 << 40))
    return max(INVARIANT_ROW_TILE, 1 << (block.bit_length() - 1))


def chunks(n: int, chunk: int) -> Iterator[slice]:
    for lo in range(0, n, chunk):
        yield slice(lo, min(n, lo + chunk))


# ---- the chunk loop ------------------------------------------------------------------------------


@dataclass
class Head:
    """One model's lm head as the loop uses it: the (rows, H) hidden states that run, the
    weight and bias, and which of their gradients are wanted."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    need_h: bool = False
    need_w: bool = False
    need_b: bool = False

    @property
    def needs_grad(self) -> bool:
        return self.need_h or self.need_w or self.need_b


@dataclass
class Grads:
    """fp32 (fp64) accumulators of one head's gradients (None where not wanted)."""

    h: Tensor | None
    w: Tensor | None
    b: Tensor | None

    def out(self, head: Head, scale: Tensor | None = None) -> tuple:
        """(dh, dW, db) in each input's dtype, times ``scale`` (the upstream scalar) if given."""
        res = []
        for g, like in ((self.h, head.hidden), (self.w, head.weight), (self.b, head.bias)):
            if g is None:
                res.append(None)
                continue
            res.append((g if scale is None else g * scale).to(like.dtype))
        return tuple(res)


def new_grads(head: Head, acc: torch.dtype, zero_hidden: bool = False) -> Grads:
    h, w = head.hidden, head.weight
    make_h = h.new_zeros if zero_hidden else h.new_empty
    return Grads(make_h(h.shape, dtype=acc) if head.need_h else None,
                 w.new_zeros(w.shape, dtype=acc) if head.need_w else None,
                 h.new_zeros(w.shape[0], dtype=acc) if head.need_b and head.bias is not None
                 else None)


def padded(x: Tensor, block: int | None) -> Tensor:
    """``x`` with zero rows appended up to ``block`` rows (batch-invariant mode), else ``x``."""
    if block is None or x.shape[0] == block:
        return x
    return torch.cat([x, x.new_zeros((block - x.shape[0], *x.shape[1:]))])


def accumulate(gz: Tensor, h: Tensor, w: Tensor, grads: Grads, rows: slice,
               keep: Tensor | None, block: int | None = None) -> None:
    """Add a chunk's dh, dW, db (from its fp32 d loss / d z) into the accumulators. ``block``:
    run the dh GEMM at that many rows (zero-padded), as batch-invariant mode asks."""
    if grads.h is not None:
        grads.h[rows] = gemm_f32(padded(gz, block), w)[: gz.shape[0]]
    if grads.w is not None:
        if keep is not None:
            # Ignored rows are inert: their gz is 0, but 0 * a NaN hidden state would be NaN.
            h = torch.where(keep[:, None], h, torch.zeros((), dtype=h.dtype, device=h.device))
        if gz.dtype == h.dtype == grads.w.dtype:
            grads.w.addmm_(gz.t(), h)  # accumulated inside the GEMM: no (V, H) temporary
        else:
            grads.w += gemm_f32(gz.t(), h)
    if grads.b is not None:
        grads.b += gz.sum(0)


Step = Callable[[slice, dict], "dict[str, Tensor] | None"]


def run(heads: dict[str, Head], n: int, chunk: int, step: Step, *,
        keep: Tensor | None = None, acc: torch.dtype = torch.float32,
        reuse_logits: tuple[str, ...] = (), zero_hidden: bool = False,
        fixed: bool = False) -> dict[str, Grads]:
    """The chunk loop: for each chunk of ``chunk`` rows, the logits of every head (fp32, autocast
    off), ``step(rows, logits)`` -> {head: row-weighted d loss / d z}, accumulated into the
    heads' wanted gradients. ``keep``: the mask of inert rows' hidden states (only when rows
    were not packed). ``reuse_logits``: heads whose chunk logits go into one buffer for the whole
    loop (fp32 operands only), which ``step`` must not keep past its call. ``fixed``
    (batch-invariant mode): every GEMM that yields a row's result (the logits, dh) runs at exactly
    ``chunk`` rows rounded up to whole row tiles (``INVARIANT_ROW_TILE``), zero-padded, so the
    BLAS kernel and its reduction order are the same for every row whatever the row count, the
    row's chunk or its place in it; ``step`` still sees only the real rows.
    """
    block = -(-chunk // INVARIANT_ROW_TILE) * INVARIANT_ROW_TILE if fixed else None
    grads = {name: new_grads(head, acc, zero_hidden) for name, head in heads.items()}
    w_ops = {name: operand(head.weight) for name, head in heads.items()}
    bufs = {}
    for name in reuse_logits:
        h, w = heads[name].hidden, w_ops[name]
        if n and h.dtype == w.dtype and w.dtype in (torch.float32, torch.float64):
            bufs[name] = h.new_empty(block or min(n, chunk), w.shape[0], dtype=acc)
    for rows in chunks(n, chunk):
        # Autocast off: it would run these GEMMs in bf16/fp16 and round the logits, breaking the
        # fp32-logits contract (the gradients' accuracy); gemm_f32 picks the precision itself.
        with torch.no_grad(), torch.autocast(heads[next(iter(heads))].hidden.device.type,
                                             enabled=False):
            z = {}
            for name, head in heads.items():
                m = rows.stop - rows.start
                hr = padded(head.hidden[rows], block)
                if name in bufs:
                    out = torch.mm(hr, w_ops[name].t(), out=bufs[name][: hr.shape[0]])[:m]
                else:
                    out = gemm_f32(hr, w_ops[name].t())[:m]
                if head.bias is not None:
                    out = out.add_(head.bias.to(out.dtype)) if name in bufs else (
                        out + head.bias.to(out.dtype))
                z[name] = out
            dz = step(rows, z)
            del z
            if not dz:
                continue
            for name, gz in dz.items():
                if gz is None:
                    continue
                head = heads[name]
                accumulate(gz, head.hidden[rows], w_ops[name], grads[name], rows,
                           keep[rows] if keep is not None else None, block)
            del dz
    return grads


__all__ = ["Grads", "Head", "Rows", "accumulate", "check_ce_weight", "check_chunk_size",
           "check_bias", "check_devices", "check_head", "check_label_range", "check_weight",
           "chunks", "default_chunk_size", "gemm_f32", "invariant_block", "kept_rows", "operand",
           "padded", "rows", "run"]
