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


def test_softcapped_models_are_refused():
    student, teacher = tiny_lm(0), tiny_lm(1)
    student.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="softcap"):
        fk_hf.distillation_loss(student, teacher, _batch())


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
