"""Logit distillation from a frozen teacher in a Hugging Face ``transformers.Trainer``.

``distillation_loss`` runs both models' decoders to their last hidden states and takes the
divergence through ``fk.fused_linear_divergence`` on the lm heads, so neither model's (B, T, V)
logits exist. ``FkDistillationTrainer`` is a ``Trainer`` whose ``compute_loss`` is that loss.
``sparse_distillation_loss`` / ``FkTopKDistillationTrainer`` do the same from an offline teacher's
top-k ids and log-probs carried by the dataset (``fk.fused_linear_sparse_divergence``).

Gradient accumulation and data parallelism: the loss is the sum over kept tokens divided by
``num_items_in_batch``, the Trainer's count of label tokens over the whole accumulation window
(and over processes with ``average_tokens_across_devices``), kept a tensor (no host sync), so
batch 8 x accumulation 1 and batch 2 x accumulation 4 give the same gradient.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

import fdiv_kernels as fk
from fdiv_kernels.integrations._patching import require

__all__ = [  # noqa: F822 (the two trainers come from the module __getattr__)
    "FkDistillationTrainer", "FkTopKDistillationTrainer", "distillation_loss", "logit_transform",
    "sparse_distillation_loss", "tokenizer_vocab_size",
]

_NOT_MODEL_INPUTS = ("labels", "num_items_in_batch")


def logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """(logit scale, softcap) a causal LM ``model`` applies to ``lm_head(h)``, read from its config.

    Gemma 2 / 3: ``final_logit_softcapping`` c (z <- c tanh(z / c)); Cohere: ``logit_scale`` s
    (z <- s z); Granite: ``logits_scaling`` d (z <- z / d, a scale of 1 / d). Multimodal configs
    are read through their text config. Other models: (1.0, None).
    """
    config = getattr(model, "config", None)
    if config is None:
        return 1.0, None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    scale = 1.0 if scale is None else float(scale)
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None:
        scale /= float(divisor)
    return scale, None if softcap is None else float(softcap)


def tokenizer_vocab_size(processing_class: Any, *widths: int) -> int | None:
    """The ``vocab_size=`` to hand fk for lm heads of these ``widths`` (rows).

    ``len(processing_class)`` (the tokenizer's entries, added tokens included; a processor's
    ``.tokenizer``) when some head is padded wider than it, so the padding columns are excluded;
    None when nothing is padded, or when the tokenizer is larger than a head (a model whose
    embeddings were not resized: its heads are used whole, as the host uses them). Heads of
    different widths that no tokenizer size reconciles raise a ValueError naming the widths and
    ``vocab_size``.
    """
    tok = getattr(processing_class, "tokenizer", processing_class)   # processors wrap one
    try:
        size = len(tok) if tok is not None else None
    except TypeError:
        size = None
    if size is not None and size <= min(widths):
        return size if size < max(widths) else None
    if len(set(widths)) > 1:
        known = "no tokenizer size is known" if size is None else f"the tokenizer has {size}"
        raise ValueError(
            f"the lm heads have different widths {tuple(widths)} and {known}: pass the "
            "tokenizer as processing_class (its len() is used as vocab_size=, the padding "
            "columns are excluded) or use heads of one width")
    return None


def _hidden_and_head(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor,
                                                                         Tensor | None]:
    """(last hidden states, lm-head weight, lm-head bias) of a causal LM, without its logits."""
    head = model.get_output_embeddings()
    decoder = model.get_decoder()
    out = decoder(**{k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS})
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, head.weight, getattr(head, "bias", None)


def distillation_loss(
    model: nn.Module,
    teacher_model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    kind: str = "kl",
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    **kind_params: float,
) -> Tensor:
    r"""(1 - w) D(p_teacher || q_student) + w CE(student, labels), averaged over label tokens.

    ``inputs`` is a causal-LM batch with ``labels`` (-100 = ignored, unshifted as HF passes them):
    position i's hidden state predicts ``labels[:, i + 1]``. ``kind`` and ``kind_params``
    (``beta``, ``alpha``, ``lam``) and ``temperature`` are ``fk.divergence``'s; ``ce_weight`` = w.
    Divides by ``num_items_in_batch`` when given (the Trainer's token count, a tensor), else by
    the kept tokens of this batch. The teacher runs under ``no_grad``. Each model's logits are
    transformed as its own forward transforms them (softcap, scale: :func:`logit_transform`).

    Args:
        model: the student causal LM (decoder and output embeddings; it gets the gradients).
        teacher_model: the teacher, a causal LM with the same vocabulary.
        inputs: the batch as the Trainer passes it (``input_ids``, ``attention_mask``,
            ``labels``, ...).
        chunk_size: rows per chunk of the fused op (None: from a memory budget); no (N, V)
            logits are materialized for either model.
        vocab_size: the tokenizer's size when an lm head is padded wider (Qwen's 152064 rows
            for 151936 tokens): only the first ``vocab_size`` columns take part, and the two
            heads may then differ in width. Heads of different widths need it (ValueError).
    """
    labels = inputs["labels"]
    hs, ws, bs = _hidden_and_head(model, inputs)
    with torch.no_grad():
        ht, wt, bt = _hidden_and_head(teacher_model, inputs)
    s_scale, s_cap = logit_transform(model)
    t_scale, t_cap = logit_transform(teacher_model)
    return fk.fused_linear_divergence(
        hs[:, :-1], ws, ht[:, :-1].detach(), wt.detach(), kind, temperature=temperature,
        student_bias=bs, teacher_bias=None if bt is None else bt.detach(),
        labels=labels[:, 1:], reduction="mean", ce_weight=ce_weight, chunk_size=chunk_size,
        num_items_in_batch=num_items_in_batch, student_logit_scale=s_scale,
        student_softcap=s_cap, teacher_logit_scale=t_scale, teacher_softcap=t_cap,
        vocab_size=vocab_size, **kind_params)


def sparse_distillation_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    kind: str = "kl",
    tail: str = "bucket",
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    **kind_params: float,
) -> Tensor:
    r"""Distillation from an offline (or served) teacher's top-k: (1 - w) D + w CE per label token.

    ``inputs`` is a causal-LM batch with ``labels`` (unshifted, -100 ignored) and the teacher's
    ``teacher_ids`` / ``teacher_logprobs`` (B, T, K) aligned with the positions (entry t is the
    teacher's next-token distribution after position t, as its logits would be; the last
    position is unused), optionally ``teacher_mask`` (B, T, K) bool, True on real entries (else
    entries whose log-prob is -inf are padding). D is ``fk.sparse_divergence``'s ``kind`` with
    ``tail`` ("bucket", "renormalize", "none") on the student's hidden states through its lm head
    (``fk.fused_linear_sparse_divergence``: no (B, T, V) logits); the student's logit transform is
    read from its config. Divides by ``num_items_in_batch`` when given, else by the kept tokens.

    Args:
        model: the student (a causal LM whose last hidden states and lm head are read).
        inputs: the batch, as above.
        kind, tail, kind_params: the divergence (``fk.sparse_divergence``'s kind and tail).
        temperature: T of the student's softmax (the teacher's log-probs are used as stored).
        ce_weight: w, the weight of the cross-entropy on the labels.
        num_items_in_batch: the Trainer's token count for the mean, or None.
        chunk_size: rows per chunk of the fused form (default: from a memory budget).
        vocab_size: the tokenizer's size when the lm head is padded wider: the padding columns
            take no part (teacher ids must be below it).
    """
    labels = inputs["labels"]
    hs, ws, bs = _hidden_and_head(model, {k: v for k, v in inputs.items()
                                          if not k.startswith("teacher_")})
    ids, lps = inputs["teacher_ids"][:, :-1], inputs["teacher_logprobs"][:, :-1]
    mask = inputs.get("teacher_mask")
    mask = lps > float("-inf") if mask is None else mask[:, :-1].bool()
    scale, cap = logit_transform(model)
    return fk.fused_linear_sparse_divergence(
        hs[:, :-1], ws, ids, lps.to(torch.float32), kind, tail=tail, temperature=temperature,
        support_mask=mask, student_bias=bs, labels=labels[:, 1:], reduction="mean",
        ce_weight=ce_weight, chunk_size=chunk_size, num_items_in_batch=num_items_in_batch,
        student_logit_scale=scale, student_softcap=cap, vocab_size=vocab_size, **kind_params)


def _build_trainer_classes() -> dict[str, type]:
    base = require("transformers", "transformers").Trainer

    class _FkTrainer(base):
        """What both trainers share: the loss divides by the Trainer's token count, evaluation
        and prediction, the student's logits formed only for predictions."""

        def _init_loss(self, kind, temperature, ce_weight, kind_params, chunk_size) -> None:
            self.kind, self.temperature, self.ce_weight = kind, temperature, ce_weight
            self.kind_params, self.chunk_size = dict(kind_params or {}), chunk_size
            # compute_loss divides by num_items_in_batch itself: have the Trainer count it and
            # not divide again by the accumulation steps.
            self.model_accepts_loss_kwargs = True

        def _distillation_loss(self, model, inputs, num_items_in_batch) -> Tensor:
            raise NotImplementedError

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = self._distillation_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts every process's tokens; DDP averages grads (the
                # Trainer's own compute_loss scales the same way).
                loss = loss * self.accelerator.num_processes
            if not return_outputs:
                return loss
            # The evaluation loop reads the predictions from the outputs (prediction_step takes
            # the logits from them): the student's own forward, the only place its (B, T, V)
            # logits are formed, and only when predictions are asked for.
            outputs = model(**{k: v for k, v in inputs.items()
                               if k not in _NOT_MODEL_INPUTS and not k.startswith("teacher_")})
            return loss, outputs

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            if not prediction_loss_only or "labels" not in inputs:
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            # Loss only (evaluate() without compute_metrics): no logits at all. The count is the
            # one the Trainer's own prediction_step passes.
            inputs = self._prepare_inputs(inputs)
            count = getattr(self, "_get_num_items_in_batch", None)
            nib = count([inputs], self.args.device) if count is not None else None
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=nib)
            return loss.detach().mean(), None, None

    class FkDistillationTrainer(_FkTrainer):
        __doc__ = _DOC

        def __init__(self, *args, teacher_model: nn.Module, kind: str = "kl",
                     temperature: float = 1.0, ce_weight: float = 0.0,
                     kind_params: Mapping[str, float] | None = None,
                     chunk_size: int | None = None, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.teacher_model = teacher_model.eval().requires_grad_(False)
            self.teacher_model.to(self.args.device)
            self._init_loss(kind, temperature, ce_weight, kind_params, chunk_size)

        def _distillation_loss(self, model, inputs, num_items_in_batch):
            vocab = tokenizer_vocab_size(
                self.processing_class, model.get_output_embeddings().weight.shape[0],
                self.teacher_model.get_output_embeddings().weight.shape[0])
            return distillation_loss(
                model, self.teacher_model, inputs, kind=self.kind,
                temperature=self.temperature, ce_weight=self.ce_weight,
                num_items_in_batch=num_items_in_batch, chunk_size=self.chunk_size,
                vocab_size=vocab, **self.kind_params)

    class FkTopKDistillationTrainer(_FkTrainer):
        __doc__ = _TOPK_DOC

        def __init__(self, *args, kind: str = "kl", tail: str = "bucket",
                     temperature: float = 1.0, ce_weight: float = 0.0,
                     kind_params: Mapping[str, float] | None = None,
                     chunk_size: int | None = None, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.tail = tail
            self._init_loss(kind, temperature, ce_weight, kind_params, chunk_size)

        def _distillation_loss(self, model, inputs, num_items_in_batch):
            vocab = tokenizer_vocab_size(self.processing_class,
                                         model.get_output_embeddings().weight.shape[0])
            return sparse_distillation_loss(
                model, inputs, kind=self.kind, tail=self.tail, temperature=self.temperature,
                ce_weight=self.ce_weight, num_items_in_batch=num_items_in_batch,
                chunk_size=self.chunk_size, vocab_size=vocab, **self.kind_params)

    classes = {"FkDistillationTrainer": FkDistillationTrainer,
               "FkTopKDistillationTrainer": FkTopKDistillationTrainer}
    for cls in (_FkTrainer, *classes.values()):
        cls.__module__ = __name__
    return classes


_DOC = """A ``transformers.Trainer`` that distils a frozen ``teacher_model`` into ``model``.

    ``FkDistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
    train_dataset=..., kind="kl", temperature=1.0, ce_weight=0.0, kind_params={"beta": 0.5})``.
    Its ``compute_loss`` is :func:`distillation_loss` with the Trainer's ``num_items_in_batch``;
    ``evaluate()`` and ``predict()`` report the same loss (with the student's logits as the
    predictions unless ``prediction_loss_only``). Lm heads padded wider than the tokenizer
    (``processing_class``) have their padding columns excluded (``vocab_size=len(tokenizer)``),
    so the two heads may differ in width. A real subclass of ``transformers.Trainer``,
    built when first looked up (so importing this module does not import transformers): subclass
    it and override ``compute_loss`` & co. as with any Trainer. ``chunk_size``: rows per chunk of
    the fused form (default: from a memory budget).
    """

_TOPK_DOC = """A ``transformers.Trainer`` that distils an offline (or served) teacher's top-k into
    ``model``: the dataset carries ``teacher_ids`` and ``teacher_logprobs`` (T, K) per example
    (optionally ``teacher_mask``), no teacher model runs.

    ``FkTopKDistillationTrainer(model=student, args=TrainingArguments(...,
    remove_unused_columns=False), train_dataset=..., kind="kl", tail="bucket", temperature=1.0,
    ce_weight=0.0, kind_params=None)``. Its ``compute_loss`` is :func:`sparse_distillation_loss`
    with the Trainer's ``num_items_in_batch``; evaluation, prediction and subclassing as
    ``FkDistillationTrainer``. ``chunk_size``: rows per chunk of the fused form.
    """

_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    # PEP 562: the classes are made on first access (from ... import FkDistillationTrainer).
    if name in ("FkDistillationTrainer", "FkTopKDistillationTrainer"):
        if name not in _BUILT:
            _BUILT.update(_build_trainer_classes())
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
