"""TRL drop-ins: GKD's generalized JSD, ``selective_log_softmax``, log-probs with entropy, and
the fused LM head's kernel (``ChunkedLogProbFunction``).

Checked against TRL 1.16 (``tests/test_integrations_trl.py`` runs them beside TRL's own functions).
``apply_fk_to_trl()`` rebinds TRL's names to these; no file is edited.

``chunked_divergence_loss`` is the DistillationTrainer's loss from hidden states
(``trl.trainer.distillation_trainer._chunked_divergence_loss``) on
``fk.fused_linear_divergence``; ``apply_fk_to_trl(distillation=True)`` rebinds it.

What ``apply_fk_to_trl(logprobs=True)`` covers in TRL 1.16:

- hidden-state paths: DPO, GRPO, RLOO, KTO and SFT (and AsyncGRPO) take their per-token log-probs,
  entropy and metrics from ``add_fused_lm_head``, which calls
  ``trl.trainer.utils._ChunkedLogProbFunction``; the patch rebinds it (and
  ``trl.kernels[.chunked_logprob].ChunkedLogProbFunction``) to :class:`ChunkedLogProbFunction`
  on ``fk.fused_linear_token_logprobs``;
- logits paths: trainers and user code calling ``selective_log_softmax`` & co. on logits (ORPO,
  CPO, SDPO, SDFT, A2PO, TPO in ``trl.experimental``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

import fdiv_kernels as fk
from fdiv_kernels.integrations._patching import Patch, require
from fdiv_kernels.integrations.hf import logit_transform, tokenizer_vocab_size

__all__ = [
    "ChunkedLogProbFunction", "apply_fk_to_trl", "chunked_divergence_loss",
    "chunked_sparse_jsd_loss", "compute_topk_self_distillation_loss", "entropy_from_logits",
    "generalized_jsd_loss", "gkd_compute_loss", "gold_generalized_jsd_loss",
    "selective_log_softmax", "selective_log_softmax_and_entropy", "server_forward_kl_loss",
]

IGNORE_INDEX = -100  # hard-coded in TRL's GKD loss


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | float | Tensor | None = None,
) -> Tensor:
    r"""``GKDTrainer.generalized_jsd_loss`` on ``fk.divergence(kind="js")``: same signature and
    numbers.

    With q = softmax(student / T), p = softmax(teacher / T), m = beta p + (1 - beta) q, per row
    D = beta KL(p||m) + (1 - beta) KL(q||m); beta = 0 is KL(p||q) and beta = 1 is KL(q||p), TRL's
    two special cases (no T^2 factor, as in TRL). Rows whose label is -100 are dropped. Reduction,
    in TRL's order of precedence:

    - ``num_items_in_batch`` given (int or tensor, no host sync): sum over kept rows / it;
    - ``"batchmean"``: sum / max(kept rows, 1) with labels, else sum / ``student_logits.size(0)``
      (the batch size of a (B, T, V) input, not B*T, as TRL divides);
    - ``"sum"``: the sum; ``"mean"``: sum / (kept rows * V), NaN when no row is kept, as in TRL;
    - anything else (``"none"``): TRL's (rows, V) element tensor, which only exists
      materialized: TRL's own function runs (the elements are its contract).

    The loss is float32 (TRL's is in the logits' dtype, so under bf16 this one is the more
    accurate); gradients reach both logits in their dtypes.

    Args:
        student_logits, teacher_logits: (..., V) logits of the two models.
        labels: optional ids of the leading shape; rows equal to -100 are dropped.
        beta: the mixture weight of the teacher in m (TRL's ``beta``).
        temperature: T > 0, applied to both models' logits.
        reduction: "batchmean", "sum", "mean" or "none", as listed above.
        num_items_in_batch: the divisor when given (takes precedence over ``reduction``).
    """
    if num_items_in_batch is None and reduction not in ("batchmean", "sum", "mean"):
        return _trl_jsd("gkd")(student_logits, teacher_logits, labels, beta, temperature,
                               reduction, num_items_in_batch)
    per_row = fk.divergence(student_logits, teacher_logits, "js", beta=float(beta),
                            temperature=temperature, labels=labels, ignore_index=IGNORE_INDEX,
                            reduction="none")
    kept = None if labels is None else labels != IGNORE_INDEX
    total = per_row.sum()
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            return total / num_items_in_batch.to(device=total.device)
        return total / num_items_in_batch
    if reduction == "batchmean":
        if kept is None:
            return total / max(student_logits.size(0), 1)
        return total / kept.sum().clamp_min(1)
    if reduction == "sum":
        return total
    count = per_row.new_tensor(per_row.numel()) if kept is None else kept.sum()   # "mean"
    return total / (count * student_logits.shape[-1])


def gold_generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    logits_are_probs: bool = False,
    num_items_in_batch: int | float | Tensor | None = None,
) -> Tensor:
    r"""``GOLDTrainer.generalized_jsd_loss`` (``trl.experimental.gold``): GKD's loss with one more
    argument; on logits it is :func:`generalized_jsd_loss` (same numbers, same reductions).

    ``student_logits``, ``teacher_logits``, ``labels``, ``beta``, ``temperature``,
    ``reduction`` and ``num_items_in_batch`` as in :func:`generalized_jsd_loss`.
    ``logits_are_probs=True`` (probabilities, read by TRL as log(max(p, 1e-8)) and used without
    renormalizing) runs TRL's own function: fk's kernels take logits and renormalize them.
    """
    if logits_are_probs:
        return _trl_jsd("gold")(student_logits, teacher_logits, labels, beta, temperature,
                                reduction, logits_are_probs, num_items_in_batch)
    return generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
                                reduction, num_items_in_batch)


def gkd_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    r"""``GKDTrainer.compute_loss`` on the models' hidden states and lm heads
    (``fk.fused_linear_divergence(..., "js")``): neither model's (B, T, V) logits are formed.
    ``inputs`` is the trainer's batch (``input_ids``, ``attention_mask``, ``labels``), as TRL's.

    The same loss as TRL's ``compute_loss`` with :func:`generalized_jsd_loss` (beta =
    ``self.beta``, T = 1 as TRL calls it, labels shifted by one, sum / ``num_items_in_batch`` or
    the mean over kept tokens); each model's softcap / logit scale is read from its config. The
    padding columns of lm heads wider than the tokenizer (``len(self.processing_class)``) are
    excluded (``vocab_size=``). Under mixed precision (``bf16=True``, GKDConfig's default) the
    decoders run under the trainer's autocast as in TRL, and the logits are formed in fp32 where
    TRL rounds them to bf16: the loss then differs from TRL's by that rounding (fk's is the more
    accurate); in fp32 it is TRL's to ~1e-6. TRL's own ``compute_loss`` runs where this path
    cannot serve:
    ``return_outputs=True`` (evaluation reads the logits), a ``generalized_jsd_loss`` other than
    fk's (a subclass's own loss), DeepSpeed, or a model without ``get_decoder`` /
    ``get_output_embeddings`` (e.g. wrapped by DDP or FSDP).
    """
    fused_ok = (not return_outputs and type(self).generalized_jsd_loss is generalized_jsd_loss
                # ZeRO-3 partitions the heads and gathers them in the engines' own forward.
                and not getattr(self, "is_deepspeed_enabled", False))
    teacher = getattr(self, "teacher_model", None)
    for m in (model, teacher):
        fused_ok = fused_ok and all(hasattr(m, a) for a in ("get_decoder",
                                                            "get_output_embeddings"))
    if not fused_ok:
        return _trl_gkd_compute_loss()(self, model, inputs, return_outputs, num_items_in_batch)
    batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    # The decoders run under the autocast Accelerate wraps the models' forward in (bf16 / fp16
    # mixed precision); the heads' logits are then formed in fp32 by fk.
    accelerator = getattr(self, "accelerator", None)
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    teacher.eval()
    with autocast():
        hs, ws, bs = _decoder_hidden_and_head(model, batch)
        with torch.no_grad():
            ht, wt, bt = _decoder_hidden_and_head(teacher, batch)
    vocab = tokenizer_vocab_size(getattr(self, "processing_class", None), ws.shape[0],
                                 wt.shape[0])
    (s_scale, s_cap), (t_scale, t_cap) = logit_transform(model), logit_transform(teacher)
    nib = num_items_in_batch
    if isinstance(nib, Tensor):
        nib = nib.to(hs.device)
    with torch.autocast(hs.device.type, enabled=False):
        return fk.fused_linear_divergence(
            hs[:, :-1], ws, ht[:, :-1].detach(), wt.detach(), "js", beta=float(self.beta),
            student_bias=bs, teacher_bias=None if bt is None else bt.detach(),
            labels=inputs["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="mean",
            num_items_in_batch=nib, student_logit_scale=s_scale, student_softcap=s_cap,
            teacher_logit_scale=t_scale, teacher_softcap=t_cap, vocab_size=vocab)


def _decoder_hidden_and_head(model, batch) -> tuple[Tensor, Tensor, Tensor | None]:
    """(last hidden states, lm-head weight, lm-head bias) of a causal LM, without its logits."""
    head = model.get_output_embeddings()
    out = model.get_decoder()(**batch)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, head.weight, getattr(head, "bias", None)


def _trl_gkd_compute_loss():
    """TRL's own ``GKDTrainer.compute_loss``: saved when patched, else read from the class."""
    if "gkd_compute_loss" not in _TRL_ORIGINALS:
        mod = require(_JSD_TRAINERS["gkd"][0], "trl")
        current = getattr(mod, _JSD_TRAINERS["gkd"][1]).__dict__["compute_loss"]
        if current is gkd_compute_loss:
            raise RuntimeError("TRL's GKDTrainer.compute_loss was rebound before it was saved")
        _TRL_ORIGINALS["gkd_compute_loss"] = current
    return _TRL_ORIGINALS["gkd_compute_loss"]


def _patch_gkd_compute_loss(patch: Patch, mod) -> None:
    cls = getattr(mod, _JSD_TRAINERS["gkd"][1])
    if cls.__dict__["compute_loss"] is not gkd_compute_loss:
        _trl_gkd_compute_loss()
    patch.set(cls, "compute_loss", gkd_compute_loss)


# The trainers whose generalized_jsd_loss staticmethod the patch rebinds: module, class.
_JSD_TRAINERS = {"gkd": ("trl.experimental.gkd.gkd_trainer", "GKDTrainer"),
                 "gold": ("trl.experimental.gold.gold_trainer", "GOLDTrainer")}


def _trl_jsd(which: str):
    """TRL's own GKD / GOLD loss: saved when patched, else read from the (unpatched) class."""
    if which not in _TRL_ORIGINALS:
        module, cls = _JSD_TRAINERS[which]
        mod = require(module, "trl")
        _TRL_ORIGINALS[which] = getattr(mod, cls).__dict__["generalized_jsd_loss"].__func__
    return _TRL_ORIGINALS[which]


def _patch_jsd(which: str, ours, patch: Patch, mod) -> None:
    cls = getattr(mod, _JSD_TRAINERS[which][1])
    current = cls.__dict__["generalized_jsd_loss"]
    if getattr(current, "__func__", None) is not ours:
        _TRL_ORIGINALS.setdefault(which, current.__func__)
    patch.set(cls, "generalized_jsd_loss", staticmethod(ours))


def compute_topk_self_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    distillation_topk: int,
    distillation_alpha: float,
    distillation_add_tail: bool,
) -> Tensor:
    r"""TRL's ``compute_topk_self_distillation_loss`` (``trl.experimental.sdpo.loss_utils``, used by
    the SDPO and SDFT trainers) on ``fk.sparse_divergence``: same arguments, same per-row values.

    ``student_logits`` / ``teacher_logits``: (..., V); ``distillation_topk``: k;
    ``distillation_alpha``: the JSD's beta (below). The support is the student's top-k ids; the
    teacher's log-probs there come from
    ``fk.token_logprobs`` (no (N, V) log_softmax of the teacher). alpha is the generalized JSD's
    beta (0: KL(teacher || student), 1: KL(student || teacher)); ``distillation_add_tail`` keeps
    the off-support mass as one outcome (tail "bucket"), else both are renormalized on the support.
    Returns the (...) per-row divergences in float32; gradients reach both logits.
    """
    k = int(distillation_topk)
    ids = student_logits.detach().topk(k, dim=-1).indices
    teacher_lp = fk.token_logprobs(teacher_logits, ids)
    return fk.sparse_divergence(student_logits, ids, teacher_lp, "js",
                                beta=float(distillation_alpha),
                                tail="bucket" if distillation_add_tail else "renormalize",
                                reduction="none")


def server_forward_kl_loss(
    self,
    teacher_result: dict[str, Tensor],
    student_log_probs: Tensor,
    labels: Tensor,
) -> Tensor:
    r"""``ServerDistillationTrainer._compute_server_forward_kl_loss`` (TRL 1.16,
    ``trl.experimental.server_distillation``; IW-OPD has the same method) on
    ``fk.sparse_divergence``: a method with TRL's arguments, the same loss.

    ``teacher_result["topk_token_ids"]`` / ``["topk_logprobs"]`` (B, T, K): the served teacher's
    top-k, padding entries at -inf (TRL's ``valid = logprobs > -inf`` is fk's ``support_mask``).
    ``student_log_probs`` (B, T, V): the student's log_softmax(logits / T) (fk renormalizes it,
    which changes nothing in value, and the gradient through TRL's log_softmax is the same).
    ``labels`` (B, T): -100 drops a position. Forward KL(teacher || student) over the support,
    with the tail as one more outcome when ``self.loss_add_tail`` (tail "bucket"), else both
    renormalized on the support; TRL's batchmean over the kept positions (a kept position with
    no real entry adds 0 and is counted, as in TRL). The student's (B, T, K) gathers, masks and
    tail tensors are not formed; float32 result.
    """
    lp = teacher_result["topk_logprobs"]
    valid = lp > float("-inf")
    return fk.sparse_divergence(
        student_log_probs, teacher_result["topk_token_ids"], lp.masked_fill(~valid, 0.0), "kl",
        support_mask=valid, tail="bucket" if self.loss_add_tail else "renormalize",
        labels=labels, ignore_index=IGNORE_INDEX, reduction="mean")


def chunked_sparse_jsd_loss(
    hidden_valid: Tensor,
    lm_head_weight: Tensor,
    lm_head_bias: Tensor | None,
    logit_scale: float,
    final_logit_softcapping: float | None,
    target_ids: Tensor,
    teacher_target_logps: Tensor,
    valid_candidate_mask: Tensor,
    beta: float,
    temperature: float,
    add_tail_bucket: bool,
    teacher_id_idx: Tensor | None,
    num_teachers: int,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""TRL 1.16's ``_chunked_jsd_loss`` (``trl.experimental.async_distillation``, the asynchronous
    distillation trainer's loss from hidden states and a served sparse teacher) on
    ``fk.fused_linear_sparse_divergence(..., "js")``: same arguments, the same five results.

    z = c tanh(s (h W^T + b) / c) / T (h = ``hidden_valid``, the kept rows' hidden states; W =
    ``lm_head_weight``, b = ``lm_head_bias`` or None; s = ``logit_scale``, c =
    ``final_logit_softcapping``, T = ``temperature``); per row, the generalized JSD (beta as TRL's: 0 is KL(teacher || student), 1 the reverse)
    between the student's softmax and the teacher's log-probs ``teacher_target_logps`` (as
    given, not re-tempered) on the
    candidates ``target_ids`` where ``valid_candidate_mask`` (negative ids clamped to 0 as TRL
    does), with the tail as one more outcome when ``add_tail_bucket``, else both renormalized on
    the candidates. Returns ``(loss, jsd_sum, entropy_sum, teacher_entropy_sum,
    per_teacher_stats)``: the sum of the per-row JSDs (with gradients to hidden, weight and
    bias), the same sum detached, the sum of the student's full entropies, the sum of the
    teacher's entropies over the (tailed) support, and per teacher index (``teacher_id_idx``)
    [count, JSD sum, teacher entropy sum] for each of ``num_teachers`` (zeros without it), all
    as TRL's.

    No (chunk, V) logits are kept for the backward (TRL recomputes them under checkpoint): the
    gradients are formed in the forward. The student entropy (a metric, detached) is one more
    no-grad pass of ``fk.fused_linear_token_logprobs``. ``chunk_size`` is accepted; fk chunks rows
    by its own memory budget. Non-positive scales or softcaps run TRL's own function.
    """
    cap, scale = final_logit_softcapping, float(logit_scale)
    if scale <= 0 or (cap is not None and cap <= 0):
        return _trl_async_jsd()(hidden_valid, lm_head_weight, lm_head_bias, logit_scale, cap,
                                target_ids, teacher_target_logps, valid_candidate_mask, beta,
                                temperature, add_tail_bucket, teacher_id_idx, num_teachers,
                                chunk_size)
    ids = target_ids.clamp_min(0)
    mask = valid_candidate_mask.bool()
    t_lp = teacher_target_logps.masked_fill(~mask, 0.0)
    tail = "bucket" if add_tail_bucket else "renormalize"
    per_teacher = teacher_id_idx is not None
    with torch.autocast(hidden_valid.device.type, enabled=False):
        out = fk.fused_linear_sparse_divergence(
            hidden_valid, lm_head_weight, ids, t_lp, "js", beta=float(beta), tail=tail,
            temperature=temperature, support_mask=mask, student_bias=lm_head_bias,
            reduction="none" if per_teacher else "sum", student_logit_scale=scale,
            student_softcap=cap)
        loss = out.sum() if per_teacher else out
        with torch.no_grad():
            _, entropy = fk.fused_linear_token_logprobs(
                hidden_valid.detach(), lm_head_weight.detach(), ids[:, 0],
                bias=None if lm_head_bias is None else lm_head_bias.detach(),
                temperature=temperature, logit_scale=scale, softcap=cap, return_entropy=True)
    with torch.no_grad():
        t_ent = _sparse_entropy(t_lp, mask, add_tail_bucket)
        stats = loss.new_zeros(3 * num_teachers)
        if per_teacher:
            row = out.detach()
            stats = torch.stack([v for i in range(num_teachers) for v in (
                (teacher_id_idx == i).sum().float(), row[teacher_id_idx == i].sum(),
                t_ent[teacher_id_idx == i].sum())])
    return loss, loss.detach().clone(), entropy.sum(), t_ent.sum(), stats


def _sparse_entropy(logps: Tensor, mask: Tensor, add_tail: bool) -> Tensor:
    """Per-row -sum p log p of the teacher's entries (and the tail 1 - sum p when ``add_tail``),
    renormalized on them otherwise: TRL's ``teacher_entropy`` metric."""
    lp = logps.float().masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(lp, -1, keepdim=True)
    if add_tail:
        # TRL's _add_tail_bucket: log(1 - sum p), the sum kept below 1.
        lp = torch.cat([lp, torch.log(-torch.expm1(lse.clamp(max=-1e-7)))], -1)
    else:
        lp = lp - lse
    p = lp.exp()
    return torch.nan_to_num(-(p * lp.masked_fill(p == 0, 0.0)).sum(-1), nan=0.0)


def _trl_async_jsd():
    """TRL's own ``_chunked_jsd_loss``, found once (before any rebinding) and kept."""
    if "async" not in _TRL_ORIGINALS:
        mod = require(_ASYNC_MODULE, "trl")
        if mod._chunked_jsd_loss is chunked_sparse_jsd_loss:
            raise RuntimeError("TRL's _chunked_jsd_loss was rebound before it was saved")
        _TRL_ORIGINALS["async"] = mod._chunked_jsd_loss
    return _TRL_ORIGINALS["async"]


_ASYNC_MODULE = "trl.experimental.async_distillation.async_distillation_trainer"
# The trainers whose _compute_server_forward_kl_loss method the patch rebinds: module, class.
_SERVER_TRAINERS = (
    ("trl.experimental.server_distillation.server_distillation_trainer",
     "ServerDistillationTrainer"),
    ("trl.experimental.iw_opd.iw_opd_trainer", "IWOPDTrainer"),
)


def chunked_divergence_loss(
    student_hidden_states: Tensor,
    teacher_hidden_states: Tensor,
    student_lm_head_weight: Tensor,
    teacher_lm_head_weight: Tensor,
    completion_mask: Tensor,
    beta: float,
    num_items_in_batch: Tensor | int | None = None,
    student_lm_head_bias: Tensor | None = None,
    teacher_lm_head_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""TRL 1.16's ``_chunked_divergence_loss`` (DistillationTrainer) on
    ``fk.fused_linear_divergence(..., "js")``: same signature, same three results.

    Per model, z = h W^T + b, z <- scale z, z <- c tanh(z / c) (when the softcap c is set), then
    q = softmax(z_s / T), p = softmax(z_t / T) and, per completion position (``completion_mask !=
    0``), TRL's generalized JSD with m = beta p + (1 - beta) q: D = beta KL(p||m) + (1 - beta)
    KL(q||m), KL(p||q) at beta = 0 and KL(q||p) at beta = 1. Returns

    - ``loss``: sum of D over kept positions / ``num_items_in_batch`` (int or tensor, no host
      sync), or / max(kept, 1) without it;
    - ``entropy_sum``: sum over kept positions of -sum_j q_j log q_j (detached, for logging);
    - ``n_valid``: the count of kept positions (0-dim int64).

    Neither model's (N, V) logits exist: rows go through in chunks, masked positions are packed
    out before the GEMMs, and the student's gradients are formed in the forward. As in TRL, only
    the student gets gradients (the teacher's inputs are detached), the lm-head weights under
    FSDP2 (DTensor) are gathered once with ``full_tensor()``, ZeRO-3 heads are gathered around
    the call (fk computes the gradients in the forward, as TRL's helper requires), and a fully
    masked batch returns a zero that is part of the graph (zero, not None, gradients).
    Non-positive scales or softcaps, which fk does not take, run TRL's own function.

    Args:
        student_hidden_states, teacher_hidden_states: (..., H_s) and (..., H_t) final hidden
            states, the same leading shape.
        student_lm_head_weight, teacher_lm_head_weight: (V, H_s) and (V, H_t) lm heads (plain
            tensors or FSDP2 DTensors).
        completion_mask: the leading shape; positions where it is 0 are dropped.
        beta: the mixture weight of the teacher in m.
        num_items_in_batch: the divisor of the loss when given.
        student_lm_head_bias, teacher_lm_head_bias: optional (V,) biases.
        student_logit_scale, teacher_logit_scale: each model's logit scale (Cohere's).
        student_final_logit_softcapping, teacher_final_logit_softcapping: each model's softcap c
            (Gemma-2/3's), or None.
        temperature: T > 0, applied to both models' logits after the transforms.
    """
    ws, wt = student_lm_head_weight, teacher_lm_head_weight
    bs, bt = student_lm_head_bias, teacher_lm_head_bias
    s_scale, t_scale = float(student_logit_scale), float(teacher_logit_scale)
    s_cap, t_cap = student_final_logit_softcapping, teacher_final_logit_softcapping
    if min(s_scale, t_scale) <= 0 or any(c is not None and c <= 0 for c in (s_cap, t_cap)):
        return _trl_chunked_divergence()(
            student_hidden_states, teacher_hidden_states, ws, wt, completion_mask, beta,
            num_items_in_batch, bs, bt, student_logit_scale, teacher_logit_scale, s_cap, t_cap,
            temperature)
    # FSDP2: one all-gather per head (its backward reduce-scatters the weight gradient), with
    # the dtype cast TRL applies to the gathered fp32 master copy.
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", ())
    if isinstance(ws, dtensor):
        ws = ws.full_tensor().to(student_hidden_states.dtype)
        bs = bs.full_tensor() if bs is not None else None
    if isinstance(wt, dtensor):
        wt = wt.full_tensor().to(teacher_hidden_states.dtype)
        bt = bt.full_tensor() if bt is not None else None
    hs = student_hidden_states.reshape(-1, student_hidden_states.shape[-1])
    ht = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1]).detach()
    labels = torch.where(completion_mask.reshape(-1).to(hs.device) != 0, 0, IGNORE_INDEX)
    nib = num_items_in_batch
    if isinstance(nib, Tensor):
        nib = nib.to(hs.device)
    with _gather_lm_heads(ws, bs, wt, bt):
        loss, stats = fk.fused_linear_divergence(
            hs, ws, ht, wt.detach(), "js", beta=float(beta), temperature=temperature,
            student_bias=bs, teacher_bias=bt.detach() if bt is not None else None,
            labels=labels, reduction="mean", num_items_in_batch=nib,
            student_logit_scale=s_scale, student_softcap=s_cap,
            teacher_logit_scale=t_scale, teacher_softcap=t_cap, return_stats=True)
    return loss, stats.entropy_sum, stats.num_rows


def _gather_lm_heads(*params: Tensor | None):
    """TRL's ZeRO-3 gather of the lm heads for a direct read (a null context otherwise)."""
    return require("trl.trainer.utils", "trl").maybe_gather_lm_head_ctx(*params)


def _trl_chunked_divergence():
    """TRL's own ``_chunked_divergence_loss``, found once (before any rebinding) and kept."""
    if "divergence" not in _TRL_ORIGINALS:
        mod = require("trl.trainer.distillation_trainer", "trl")
        if mod._chunked_divergence_loss is chunked_divergence_loss:
            raise RuntimeError("TRL's _chunked_divergence_loss was rebound before it was saved")
        _TRL_ORIGINALS["divergence"] = mod._chunked_divergence_loss
    return _TRL_ORIGINALS["divergence"]


def _trl_out_dtype(logits: Tensor) -> torch.dtype:
    """What TRL 1.16's fused log-prob/entropy kernel returns (its path for one index per row on
    the GPU): float32 for 16-bit and fp32 logits; float64 stays float64 (its torch path)."""
    return torch.promote_types(logits.dtype, torch.float32)


def selective_log_softmax(
    logits: Tensor,
    index: Tensor,
    temperature: float = 1.0,
    row_mask: Tensor | None = None,
) -> Tensor:
    r"""TRL's ``selective_log_softmax``: log softmax(logits / T) gathered at ``index``.

    ``index`` is (...) (one token per row) or (..., K) (K tokens per row: one log-sum-exp per
    row, then a gather of the K logits); both are ``fk.token_logprobs``, one pass over the
    logits, no log_softmax. Rows where ``row_mask == 0`` give 0. The result has ``index``'s
    shape and is computed in fp32; its dtype is TRL's on the GPU on every device: float32 for
    16-bit logits with one index per row (TRL's fused kernel; TRL's CPU path returns the logits'
    dtype there), the logits' dtype with K indices per row (TRL's torch path everywhere).
    ``temperature`` is T > 0 (else ValueError).
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if index.dim() in (logits.dim() - 1, logits.dim()):
        out = fk.token_logprobs(logits, index, temperature=temperature)
    else:
        raise ValueError(f"index must have shape (...) or (..., K) for logits "
                         f"{tuple(logits.shape)}, got {tuple(index.shape)}")
    one_per_row = index.dim() == logits.dim() - 1
    out = out.to(_trl_out_dtype(logits) if one_per_row else logits.dtype)
    if row_mask is not None:
        out = out.masked_fill(row_mask == 0, 0.0)
    return out


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """TRL's ``entropy_from_logits``: -sum q log q per row (``fk.entropy``), float32 for 16-bit
    logits as TRL's GPU kernel returns it (TRL's CPU path returns the logits' dtype).

    ``chunk_size`` is accepted for the signature; the fused op never holds more than a row.
    """
    return fk.entropy(logits).to(_trl_out_dtype(logits))


def selective_log_softmax_and_entropy(
    logits: Tensor,
    index: Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""TRL's ``selective_log_softmax_and_entropy`` on logits: one ``fk.softmax_stats`` pass.

    Returns (log q[index], H(q)) per row with q = softmax(logits / T), both float32 for 16-bit
    logits (TRL's GPU kernel; its CPU path returns the logits' dtype) and 0 where ``row_mask ==
    0``. Gradients flow through both (the entropy's too, unless ``entropy_requires_grad=False``).
    ``index`` is (...), one token per row; ``temperature`` is T > 0 (else ValueError).
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    stats = fk.softmax_stats(logits, index, temperature=temperature)
    dtype = _trl_out_dtype(logits)
    logprobs, ent = stats.label_logprob.to(dtype), stats.entropy.to(dtype)
    if not entropy_requires_grad:
        ent = ent.detach()
    if row_mask is not None:
        logprobs = logprobs.masked_fill(row_mask == 0, 0.0)
        ent = ent.masked_fill(row_mask == 0, 0.0)
    return logprobs, ent


# TRL's default ``outputs``: every optional per-token field.
_TRL_OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


class ChunkedLogProbFunction:
    r"""Drop-in for TRL 1.16's ``trl.kernels.ChunkedLogProbFunction`` (what ``add_fused_lm_head``
    runs for DPO, GRPO, RLOO, KTO and SFT) on ``fk.fused_linear_token_logprobs``.

    ``ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size,
    final_logit_softcapping=None, logit_scale=1.0, outputs=OPTIONAL_OUTPUTS)`` with hidden (N, H),
    weight (V, H), bias (V,) or None, targets (N,) returns, as TRL's does,
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, each (N,) or None when not
    in ``outputs`` (``log_probs`` is always computed). With z = c tanh(s (h W^T + b) / c) (s =
    ``logit_scale``, c = ``final_logit_softcapping``, tanh skipped when None) and q = softmax(z/T):

        log_probs = z_t / T - log sum_j exp(z_j / T)      entropy = -sum_j q_j log q_j
        log_sum_sq_probs = log sum_j q_j^2                 mean_logits = mean_j z_j / T
        is_top1 = [argmax_j z_j == t]  (the first maximum, as TRL)

    Gradients reach hidden, weight and bias through ``log_probs`` and ``entropy`` (TRL 1.16's
    function differentiates its entropy too; the tests compare both gradients); the last three
    are detached, as in TRL. Differences, all documented choices:

    - the logits are formed in fp32 whatever the inputs and autocast (TRL rounds each vocabulary
      tile to the autocast / input dtype first), so under bf16 this is the more accurate;
    - ``chunk_size`` is TRL's vocabulary tile width; fk chunks rows by its own memory budget
      (O(chunk V)), so it is accepted and not used;
    - ``log_sum_sq_probs``, ``mean_logits`` and ``is_top1`` (KTO's and SFT's metrics) are not fk
      outputs: when requested they cost one more chunked no-grad pass over the logits;
    - outputs are float64 for float64 inputs (TRL's are always float32);
    - a target outside [0, V) other than -100 raises (TRL never passes one); -100 gives 0;
    - cases fk does not take run TRL's own function unchanged: ``logit_scale <= 0``, a
      non-positive softcap, and DeepSpeed ZeRO-3 partitioned weights (TRL re-gathers the head in
      its backward; fk's backward would see the partition).
    """

    @staticmethod
    def apply(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
              temperature: float, chunk_size: int, final_logit_softcapping: float | None = None,
              logit_scale: float = 1.0, outputs: tuple[str, ...] = _TRL_OPTIONAL_OUTPUTS,
              ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        trl_fn = _trl_chunked_logprob()
        cap = final_logit_softcapping
        if (logit_scale <= 0 or (cap is not None and cap <= 0)
                or getattr(weight, "ds_id", None) is not None):
            return trl_fn.apply(hidden, weight, bias, targets, temperature, chunk_size, cap,
                                logit_scale, outputs)
        want_entropy = "entropy" in outputs
        # fk forms the logits in fp32 itself; autocast would round its GEMMs to bf16/fp16.
        with torch.autocast(hidden.device.type, enabled=False):
            out = fk.fused_linear_token_logprobs(
                hidden, weight, targets, bias=bias, temperature=temperature,
                logit_scale=float(logit_scale), softcap=cap, ignore_index=IGNORE_INDEX,
                return_entropy=want_entropy)
        log_probs, entropy = out if want_entropy else (out, None)
        extras = _logit_extras(hidden, weight, bias, targets, temperature, cap,
                               float(logit_scale), outputs)
        return (log_probs, entropy, *extras)


def _trl_chunked_logprob() -> type:
    """TRL's own ``ChunkedLogProbFunction``, found once (before any rebinding) and kept."""
    if "fn" not in _TRL_ORIGINALS:
        _TRL_ORIGINALS["fn"] = require("trl.kernels.chunked_logprob", "trl").ChunkedLogProbFunction
    return _TRL_ORIGINALS["fn"]


_TRL_ORIGINALS: dict[str, type] = {}


@torch.no_grad()
def _logit_extras(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                  temperature: float, cap: float | None, scale: float,
                  outputs: tuple[str, ...]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """TRL's detached per-token metrics, log sum q^2, mean z/T and [argmax z == t], in row chunks
    of fp32 logits (O(chunk V) memory; nothing here needs a gradient)."""
    names = ("log_sum_sq_probs", "mean_logits", "is_top1")
    if not any(n in outputs for n in names):
        return None, None, None
    n, vocab = hidden.shape[0], weight.shape[0]
    # About 64 MiB of fp32 logits per chunk.
    chunk = max(1, (1 << 24) // max(vocab, 1))
    res = {k: torch.empty(n, device=hidden.device, dtype=dt) for k, dt in
           zip(names, (torch.float32, torch.float32, torch.bool)) if k in outputs}
    w = weight.float()
    for lo in range(0, n, chunk):
        rows = slice(lo, min(n, lo + chunk))
        z = hidden[rows].float() @ w.t()
        if bias is not None:
            z += bias.float()
        z.mul_(scale)
        if cap is not None:
            z = z.div_(cap).tanh_().mul_(cap)
        z.div_(temperature)
        if "log_sum_sq_probs" in res:
            res["log_sum_sq_probs"][rows] = torch.logsumexp(
                2 * (z - torch.logsumexp(z, -1, keepdim=True)), -1)
        if "mean_logits" in res:
            res["mean_logits"][rows] = z.mean(-1)
        if "is_top1" in res:
            # torch.argmax returns the first maximum, which is TRL's tie rule.
            res["is_top1"][rows] = z.argmax(-1) == targets[rows]
    return tuple(res.get(k) for k in names)


_LOGPROB_NAMES = {
    "selective_log_softmax": selective_log_softmax,
    "entropy_from_logits": entropy_from_logits,
    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
}


def apply_fk_to_trl(gkd: bool = True, distillation: bool = True, logprobs: bool = True,
                    gold: bool = True, sdpo: bool = True, server: bool = True,
                    async_distillation: bool = True, gkd_fused: bool = True) -> Patch:
    """Point TRL at fdiv_kernels; returns a :class:`Patch` whose ``undo()`` restores TRL.

    - ``gkd``: ``GKDTrainer.generalized_jsd_loss`` (a staticmethod, called through ``self``, so
      subclasses see it). ``trl.experimental`` is not imported for it: if GKD is not loaded yet,
      the swap is made when ``trl.experimental.gkd.gkd_trainer`` is first imported.
    - ``gkd_fused`` (with ``gkd``): ``GKDTrainer.compute_loss`` too, to
      :func:`gkd_compute_loss`: the loss from both models' hidden states and lm heads, no
      (B, T, V) logits (TRL's own runs for evaluation and for a subclass's own loss).
    - ``gold``: ``GOLDTrainer.generalized_jsd_loss`` (``trl.experimental.gold``), to
      :func:`gold_generalized_jsd_loss`, when that module is imported (as GKD's).
    - ``sdpo``: ``compute_topk_self_distillation_loss`` (``trl.experimental.sdpo.loss_utils``,
      called by SDPO, and SDFT's copy in ``trl.experimental.sdft.loss_utils``), to
      :func:`compute_topk_self_distillation_loss`, when imported.
    - ``logprobs``: ``selective_log_softmax``, ``entropy_from_logits`` and
      ``selective_log_softmax_and_entropy`` wherever a loaded module holds TRL's functions (
      ``trl.trainer.utils``, the trainers that imported them by name: DPO/ORPO/CPO/SDPO/..., and
      the user's ``from trl.trainer.utils import ...``); modules imported later copy the patched
      names from ``trl.trainer.utils``. Also TRL's ``ChunkedLogProbFunction`` under every name a
      loaded module holds it (``trl.trainer.utils._ChunkedLogProbFunction``, which
      ``add_fused_lm_head`` calls, and ``trl.kernels``), so the fused-head trainers (DPO, GRPO,
      RLOO, KTO, SFT) run on ``fk.fused_linear_token_logprobs``.
    - ``distillation``: ``_chunked_divergence_loss`` (DistillationTrainer's loss from hidden
      states, called by its global name) wherever a loaded module holds it, to
      :func:`chunked_divergence_loss`.
    - ``server``: the served teacher's top-k forward KL, the ``_compute_server_forward_kl_loss``
      method of ``ServerDistillationTrainer`` (``trl.experimental.server_distillation``) and of
      ``IWOPDTrainer`` (``trl.experimental.iw_opd``), to :func:`server_forward_kl_loss`, when
      each module is imported.
    - ``async_distillation``: ``_chunked_jsd_loss`` (``trl.experimental.async_distillation``,
      called by its global name) to :func:`chunked_sparse_jsd_loss`, when that module is imported.

    ``undo()`` restores every rebinding, those in modules imported while the patch was active
    included. Idempotent: a second call changes nothing (and its handle undoes nothing). Edits no
    file.
    """
    require("trl", "trl")
    patch = Patch()
    if gkd:
        patch.after_import(_JSD_TRAINERS["gkd"][0],
                           lambda mod: _patch_jsd("gkd", generalized_jsd_loss, patch, mod))
        if gkd_fused:
            patch.after_import(_JSD_TRAINERS["gkd"][0],
                               lambda mod: _patch_gkd_compute_loss(patch, mod))
    if gold:
        patch.after_import(_JSD_TRAINERS["gold"][0],
                           lambda mod: _patch_jsd("gold", gold_generalized_jsd_loss, patch, mod))
    if sdpo:
        # SDFT has its own copy of the function (trl.experimental.sdft.loss_utils).
        for module in ("trl.experimental.sdpo.loss_utils", "trl.experimental.sdft.loss_utils"):
            patch.after_import(module, lambda mod: patch.set_everywhere(
                mod.compute_topk_self_distillation_loss, compute_topk_self_distillation_loss))
    if logprobs:
        utils = require("trl.trainer.utils", "trl")
        for name, replacement in _LOGPROB_NAMES.items():
            original = getattr(utils, name, None)
            if original is not None and original is not replacement:
                patch.set_everywhere(original, replacement)
        # Under any name: trl.trainer.utils calls it as ``_ChunkedLogProbFunction``.
        patch.set_everywhere(_trl_chunked_logprob(), ChunkedLogProbFunction)
    if distillation:
        patch.set_everywhere(_trl_chunked_divergence(), chunked_divergence_loss)
    if server:
        for module, cls in _SERVER_TRAINERS:
            patch.after_import(module, lambda mod, cls=cls: patch.set(
                getattr(mod, cls), "_compute_server_forward_kl_loss", server_forward_kl_loss))
    if async_distillation:
        patch.after_import(_ASYNC_MODULE, lambda mod: patch.set_everywhere(
            _trl_async_jsd(), chunked_sparse_jsd_loss))
    return patch
