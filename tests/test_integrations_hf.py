"""fdiv_kernels.integrations.hf: the fused distillation loss against eager logits, and the
Trainer's gradient under accumulation (batch 8 x 1 vs 2 x 4) against transformers 5."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fdiv_kernels as fk  # noqa: E402
from fdiv_kernels.integrations import hf as fk_hf  # noqa: E402
from tiny_lm import collate, lm_batches, tiny_lm  # noqa: E402


def _batch(n=4, length=12, vocab=96):
    return collate(lm_batches(n, length, vocab))


@pytest.mark.parametrize("kind,params,ce_weight", [("kl", {}, 0.0), ("js", {"beta": 0.3}, 0.2),
                                                   ("reverse_kl", {}, 0.0)])
def test_distillation_loss_matches_eager_logits(kind, params, ce_weight):
    student, teacher = tiny_lm(0).double(), tiny_lm(1, hidden=48, layers=2).double()
    batch = _batch()
    nib = torch.tensor(29.0, dtype=torch.float64)
    loss = fk_hf.distillation_loss(student, teacher, batch, kind=kind, temperature=2.0,
                                   ce_weight=ce_weight, num_items_in_batch=nib, **params)
    loss.backward()
    fused = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    # Eager: full logits, then the same divergence and cross-entropy over the shifted labels.
    s = student(input_ids=batch["input_ids"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    div = fk.divergence(s, t, kind, temperature=2.0, labels=labels, reduction="none",
                        inplace_backward=False, **params)
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, 96), labels.reshape(-1),
                                           reduction="none").reshape(labels.shape)
    eager = ((1 - ce_weight) * div + ce_weight * ce).sum() / nib
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-9, atol=1e-12)
    for a, p in zip(fused, student.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-7, atol=1e-10)
    assert all(p.grad is None for p in teacher.parameters())


def _transformed_pair(family):
    """A tiny random student/teacher pair of a family whose forward transforms its logits."""
    kw = dict(vocab_size=96, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
              tie_word_embeddings=False)
    if family == "gemma2":
        cfg = [transformers.Gemma2Config(hidden_size=32, final_logit_softcapping=c, **kw)
               for c in (3.0, 5.0)]
        cls = transformers.Gemma2ForCausalLM
    elif family == "gemma3":
        cfg = [transformers.Gemma3TextConfig(hidden_size=32, final_logit_softcapping=c, **kw)
               for c in (2.0, None)]
        cls = transformers.Gemma3ForCausalLM
    else:
        cfg = [transformers.CohereConfig(hidden_size=32, logit_scale=s, **kw)
               for s in (0.25, 4.0)]
        cls = transformers.CohereForCausalLM
    models = []
    for seed, c in enumerate(cfg):
        torch.manual_seed(seed)
        model = cls(c).double().eval()
        with torch.no_grad():      # logits of a few units, which a softcap of 2 to 5 bends
            model.get_output_embeddings().weight.mul_(30.0)
        models.append(model)
    return models


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "cohere"])
def test_softcapped_and_scaled_models_match_their_logits(family, monkeypatch):
    student, teacher = _transformed_pair(family)
    scale, cap = fk_hf.logit_transform(student)
    assert (cap is not None) if family.startswith("gemma") else (scale != 1.0)
    batch = _batch()
    loss = fk_hf.distillation_loss(student, teacher, batch, kind="js", beta=0.4, temperature=1.5,
                                   ce_weight=0.2)
    loss.backward()
    fused = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    # The models' own logits (softcap / scale applied by their forward).
    s = student(input_ids=batch["input_ids"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    div = fk.divergence(s, t, "js", beta=0.4, temperature=1.5, labels=labels, reduction="none",
                        inplace_backward=False)
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, 96), labels.reshape(-1),
                                           reduction="none").reshape(labels.shape)
    eager = (0.8 * div + 0.2 * ce).sum() / (labels != -100).sum()
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-9, atol=1e-12)
    for a, p in zip(fused, student.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-7, atol=1e-10)
    # The transform matters: read as a plain model, the loss is another number.
    monkeypatch.setattr(fk_hf, "logit_transform", lambda model: (1.0, None))
    plain = fk_hf.distillation_loss(student, teacher, batch, kind="js", beta=0.4,
                                    temperature=1.5, ce_weight=0.2)
    assert not torch.allclose(plain, eager, rtol=1e-3)


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=kw.pop("batch_size", 2),
        per_device_eval_batch_size=4, max_steps=kw.pop("max_steps", 1), learning_rate=1e-3,
        max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no", seed=0,
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, **kw)


def _trainer(tmp_path, cls=None, **kw):
    from datasets import Dataset

    cls = cls or fk_hf.FkDistillationTrainer
    return cls(model=tiny_lm(0), teacher_model=tiny_lm(1, hidden=48, layers=2),
               args=_args(tmp_path, **kw), train_dataset=Dataset.from_list(lm_batches(4, 12, 96)),
               eval_dataset=Dataset.from_list(lm_batches(4, 12, 96, seed=1)), data_collator=collate,
               kind="js", kind_params={"beta": 0.5}, ce_weight=0.1)


@pytest.mark.parametrize("loss_only", [True, False])
def test_evaluate_and_predict(tmp_path, loss_only):
    trainer = _trainer(tmp_path, prediction_loss_only=loss_only)
    batch = collate(lm_batches(4, 12, 96, seed=1))
    with torch.no_grad():
        expected = fk_hf.distillation_loss(trainer.model, trainer.teacher_model, batch,
                                           kind="js", beta=0.5, ce_weight=0.1)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)
    pred = trainer.predict(trainer.eval_dataset)
    assert pred.metrics["test_loss"] == pytest.approx(expected.item(), rel=1e-5)
    if loss_only:
        assert pred.predictions is None
    else:   # the student's logits, as a plain Trainer predicts them
        with torch.no_grad():
            logits = trainer.model(input_ids=batch["input_ids"]).logits
        torch.testing.assert_close(torch.as_tensor(pred.predictions), logits, rtol=1e-5,
                                   atol=1e-5)
        assert torch.equal(torch.as_tensor(pred.label_ids), batch["labels"])


def test_evaluate_during_training(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1)
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and evals[0] != evals[1]


def test_subclass_override_runs(tmp_path):
    calls = []

    class Doubled(fk_hf.FkDistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            calls.append(return_outputs)
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return (2 * out[0], out[1]) if return_outputs else 2 * out

    plain = _trainer(tmp_path / "plain")
    doubled = _trainer(tmp_path / "doubled", cls=Doubled)
    assert type(doubled) is Doubled and isinstance(doubled, transformers.Trainer)
    a, b = plain.evaluate()["eval_loss"], doubled.evaluate()["eval_loss"]
    assert calls and b == pytest.approx(2 * a, rel=1e-6)
    calls.clear()
    doubled.train()
    assert calls == [False]


def _accumulated_grad(tmp_path, batch_size, accum):
    from datasets import Dataset

    grads = {}

    class Grab(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accum, max_steps=1, learning_rate=1e-3, max_grad_norm=0.0,
        report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False)
    trainer = fk_hf.FkDistillationTrainer(
        model=tiny_lm(0), teacher_model=tiny_lm(1, hidden=48, layers=2), args=args,
        train_dataset=Dataset.from_list(lm_batches(8, 12, 96)), data_collator=collate,
        kind="js", kind_params={"beta": 0.5}, ce_weight=0.1, callbacks=[Grab()])
    assert isinstance(trainer, transformers.Trainer)
    trainer.train()
    return grads


def test_trainer_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = _accumulated_grad(tmp_path / "big", 8, 1)
    acc = _accumulated_grad(tmp_path / "acc", 2, 4)
    assert big.keys() == acc.keys() and len(big) > 0
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=0, atol=1e-6, msg=name)
    assert max(g.abs().max().item() for g in big.values()) > 1e-4


# ---- offline teacher: top-k ids and log-probs in the dataset -------------------------------------


def _topk_rows(n=4, length=12, vocab=96, k=5, seed=2):
    """lm_batches rows plus a teacher's top-k (T, K) per example, two entries padded (-inf)."""
    rows = lm_batches(n, length, vocab, seed=seed)
    teacher = tiny_lm(1, hidden=48, layers=2)
    with torch.no_grad():
        lp = teacher(input_ids=torch.tensor([r["input_ids"] for r in rows])).logits.log_softmax(-1)
    top = lp.topk(k, dim=-1)
    vals = top.values.clone()
    vals[:, 3, -2:] = float("-inf")                 # a server that returned fewer than K
    for r, ids, v in zip(rows, top.indices, vals):
        r["teacher_ids"], r["teacher_logprobs"] = ids.tolist(), v.tolist()
    return rows


@pytest.mark.parametrize("tail,kind,params", [("bucket", "kl", {}), ("renormalize", "js",
                                                                     {"beta": 0.3})])
def test_sparse_distillation_loss_matches_eager_logits(tail, kind, params):
    student = tiny_lm(0).double()
    batch = collate(_topk_rows())
    loss = fk_hf.sparse_distillation_loss(student, batch, kind=kind, tail=tail, temperature=1.5,
                                          ce_weight=0.2, **params)
    loss.backward()
    fused = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    s = student(input_ids=batch["input_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    lps = batch["teacher_logprobs"][:, :-1]
    div = fk.sparse_divergence(s, batch["teacher_ids"][:, :-1], lps, kind, tail=tail,
                               temperature=1.5, support_mask=lps > float("-inf"), labels=labels,
                               reduction="none", **params)
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, 96), labels.reshape(-1),
                                           reduction="none").reshape(labels.shape)
    eager = (0.8 * div + 0.2 * ce).sum() / (labels != -100).sum()
    eager.backward()
    torch.testing.assert_close(loss, eager.to(loss.dtype), rtol=1e-6, atol=1e-8)
    for a, p in zip(fused, student.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-8)


def test_topk_trainer_trains_and_evaluates(tmp_path):
    from datasets import Dataset

    rows = _topk_rows()
    trainer = fk_hf.FkTopKDistillationTrainer(
        model=tiny_lm(0), args=_args(tmp_path, max_steps=2), data_collator=collate,
        train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows),
        kind="kl", tail="bucket")
    before = trainer.evaluate()["eval_loss"]
    with torch.no_grad():
        expected = fk_hf.sparse_distillation_loss(trainer.model, collate(rows))
    assert before == pytest.approx(expected.item(), rel=1e-5)
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before


def test_trainers_exclude_padded_head_columns_with_the_tokenizer_size(tmp_path):
    """Student head 100 rows, teacher 104, one tokenizer of 96: the trainer hands fk
    ``vocab_size=len(tokenizer)``; the loss is the eager one on logits sliced to the tokenizer
    by hand, the padding rows of the head get exactly zero gradient; no tokenizer: an error
    naming both widths and vocab_size."""
    from datasets import Dataset

    from tiny_lm import tiny_tokenizer

    student, teacher = tiny_lm(0, vocab=100), tiny_lm(1, hidden=48, layers=2, vocab=104)
    batch = _batch()

    def trainer(tok):
        return fk_hf.FkDistillationTrainer(
            model=student, teacher_model=teacher, args=_args(tmp_path), data_collator=collate,
            train_dataset=Dataset.from_list(lm_batches(4, 12, 96)), processing_class=tok,
            kind="js", kind_params={"beta": 0.5}, ce_weight=0.1)

    tr = trainer(tiny_tokenizer(96))
    loss = tr.compute_loss(student, batch)
    loss.backward()
    grad = student.lm_head.weight.grad.clone()
    student.zero_grad()
    s = student(input_ids=batch["input_ids"]).logits[:, :-1, :96]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"]).logits[:, :-1, :96]
    labels = batch["labels"][:, 1:]
    div = fk.divergence(s, t, "js", beta=0.5, labels=labels, reduction="none",
                        inplace_backward=False)
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, 96), labels.reshape(-1),
                                           reduction="none").reshape(labels.shape)
    eager = (0.9 * div + 0.1 * ce).sum() / (labels != -100).sum()
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, student.lm_head.weight.grad, rtol=1e-4, atol=1e-7)
    assert torch.all(grad[96:] == 0) and grad[:96].abs().max() > 0
    with pytest.raises(ValueError, match=r"different widths \(100, 104\).*vocab_size"):
        trainer(None).compute_loss(student, batch)

    # The top-k trainer: the student's head padded to 100 rows, the tokenizer's 96.
    rows = _topk_rows()
    topk = fk_hf.FkTopKDistillationTrainer(
        model=student, args=_args(tmp_path), data_collator=collate,
        train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer(96), kind="kl")
    b = collate(rows)
    student.zero_grad()
    loss = topk.compute_loss(student, b)
    loss.backward()
    assert torch.all(student.lm_head.weight.grad[96:] == 0)
    s = student(input_ids=b["input_ids"]).logits[:, :-1, :96]
    lps = b["teacher_logprobs"][:, :-1]
    eager = fk.sparse_divergence(s, b["teacher_ids"][:, :-1], lps, "kl",
                                 support_mask=lps > float("-inf"), labels=b["labels"][:, 1:])
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-7)
