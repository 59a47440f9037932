"""Bad input gets a clear ValueError/TypeError naming the argument, before any kernel runs."""

import pytest
import torch
from reference import logits

import fdiv_kernels as fk

S = logits((4, 10), seed=0)
T = logits((4, 10), seed=1)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((S, T.numpy()), {}, TypeError, "teacher_logits must be a torch.Tensor"),
        ((S.long(), T), {}, TypeError, "student_logits must be floating point"),
        ((S, T[:, :9]), {}, ValueError, "vocabulary size"),
        ((S, T[:3]), {}, ValueError, "same shape"),
        ((S[:, :0], T[:, :0]), {}, ValueError, r"non-empty last dim \(V >= 1\)"),
        ((S, T), {"temperature": 1e-39}, ValueError, r"temperature must be in \[2.939e-39"),
        ((S, T), {"temperature": 5e-324}, ValueError, "its reciprocal must be finite"),
        ((S, T), {"labels": torch.zeros(4, dtype=torch.uint8)}, TypeError,
         "cannot hold ignore_index=-100"),
        ((S, T), {"num_items_in_batch": torch.tensor([2.0, 3.0])}, ValueError,
         "one-element tensor"),
        ((S, T), {"num_items_in_batch": torch.tensor([2.0, 3.0]), "reduction": "sum"},
         ValueError, "one-element tensor"),
        ((S, T), {"num_items_in_batch": "4"}, TypeError, "num_items_in_batch must be a real"),
        ((S[0, 0], T[0, 0]), {}, ValueError, "at least one dim"),
        ((S, T, "kld"), {}, ValueError, "kind must be one of"),
        ((S, T, "js"), {"beta": 1.5}, ValueError, r"beta must be in \[0, 1\]"),
        ((S, T, "js"), {"beta": "0.5"}, TypeError, "beta must be a real number"),
        ((S, T, "kl"), {"beta": 0.5}, ValueError, "beta= does not apply"),
        ((S, T, "skew_kl"), {"lam": 1.0}, ValueError, r"lam must be in \[0, 1\)"),
        ((S, T, "alpha"), {"alpha": float("nan")}, ValueError, "alpha must be a finite"),
        ((S, T), {"temperature": 0.0}, ValueError, "temperature must be a finite positive"),
        ((S, T), {"temperature": -1.0}, ValueError, "temperature"),
        ((S, T), {"temperature": float("inf")}, ValueError, "temperature"),
        ((S, T), {"temperature": None}, TypeError, "temperature must be a real number"),
        ((S, T), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        ((S, T), {"labels": torch.zeros(4)}, TypeError, "labels must be an integer tensor"),
        ((S, T), {"labels": torch.zeros(5, dtype=torch.long)}, ValueError, "leading shape"),
        ((S, T), {"labels": [1, 2, 3, 4]}, TypeError, "labels must be a torch.Tensor"),
        ((S, T), {"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ((S, T), {"num_items_in_batch": 0}, ValueError, "num_items_in_batch"),
        ((S, T), {"backend": "tpu"}, ValueError, "backend must be 'auto' or one of"),
        ((S, T), {"backend": 3}, TypeError, "backend must be a str"),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fk.divergence(*args, **kwargs)


def test_devices_must_match():
    meta = logits((4, 10), seed=2).to("meta")
    with pytest.raises(ValueError, match="one device"):
        fk.divergence(S, meta)


def test_unavailable_backend_names_what_is_missing():
    with pytest.raises(fk.BackendUnavailableError, match="cuda: .*needs a CUDA device"):
        fk.divergence(S, T, backend="cuda")


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("FDIV_BACKEND", "cuda")
    with pytest.raises(fk.BackendUnavailableError, match="cuda"):
        fk.divergence(S, T)
    monkeypatch.setenv("FDIV_BACKEND", "torch")
    assert torch.isfinite(fk.divergence(S, T))


def test_double_backward_raises(backend):
    s = S.clone().requires_grad_(True)
    loss = fk.divergence(s, T, "js", backend=backend)
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_second_backward_through_retained_graph_raises(backend):
    s = S.clone().requires_grad_(True)
    loss = fk.divergence(s, T, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_repeated_backward_without_inplace(backend):
    s = S.clone().requires_grad_(True)
    loss = fk.divergence(s, T, backend=backend, inplace_backward=False)
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    (g2,) = torch.autograd.grad(2 * loss, s)
    torch.testing.assert_close(g2, 2 * g1)


def test_missing_extension_is_reported_not_fatal(monkeypatch):
    """Without the C++ extension the package works on the torch backend and says why."""
    from fdiv_kernels.core import _dispatch as dispatch

    real = dispatch.load_error

    def fake(module):
        return "ImportError: pretend it was not built" if module == "fdiv_kernels._C" else real(module)

    monkeypatch.setattr(dispatch, "load_error", fake)
    with pytest.raises(fk.BackendUnavailableError, match="fdiv_kernels._C is not built"):
        fk.divergence(S, T, backend="cpu")
    monkeypatch.delenv("FDIV_BACKEND", raising=False)
    assert dispatch.select("auto", S, "divergence_fwd") == "torch"
    assert "cpu" in fk.describe(S) and fk.describe(S)["cpu"]
