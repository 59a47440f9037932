"""Softmax-statistics benchmark cases: fk.logsumexp and fk.token_logprobs per backend against
torch.logsumexp, the gather-minus-logsumexp pipeline (eager and compiled) and TRL's
selective log-softmax (a logsumexp per row chunk)."""

from __future__ import annotations

import importlib.util
import sys

import torch

import fdiv_kernels as fk
from fdiv_kernels.bench.cases import Case, our_backends


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The naive pipeline: full log_softmax, then gather."""
    return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def trl_selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL's memory-saving form: gather the label logit, subtract a per-row logsumexp."""
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
    lse = torch.stack([torch.logsumexp(row.float(), -1) for row in logits])
    return picked - lse


def _setup(fn, shape, dtype, device, grad, labels_needed):
    def setup():
        g = torch.Generator(device="cpu").manual_seed(0)
        x = (torch.randn(shape, generator=g) * 2).to(device=device, dtype=dtype)
        labels = torch.randint(0, shape[-1], shape[:-1], generator=g).to(device)
        args = (x, labels) if labels_needed else (x,)
        if not grad:
            def run():
                with torch.no_grad():
                    return fn(*args)
            return run
        x.requires_grad_(True)

        def run():
            fn(*args).sum().backward()
            x.grad = None
        return run

    return setup


def softmax_stats_cases(shapes, dtype, device, peers=("eager", "compile"), backends=None):
    cases = []
    probe = torch.empty(1, dtype=dtype, device=device)
    es = probe.element_size()
    ours = our_backends("softmax_stats_fwd", probe, backends)
    for shape in shapes:
        n, v = shape
        # logsumexp forward: read x once.
        lse = Case("logsumexp", "fwd", shape, dtype, device, n * v * es)
        for b in ours:
            lse.providers[f"fdiv-{b}"] = _setup(
                lambda x, b=b: fk.logsumexp(x, -1, backend=b), shape, dtype, device, False, False)
        lse.ours = tuple(lse.providers)
        if "eager" in peers:
            lse.providers["torch-eager"] = _setup(
                lambda x: torch.logsumexp(x, -1), shape, dtype, device, False, False)
        if "compile" in peers:
            compiled = torch.compile(lambda x: torch.logsumexp(x, -1), dynamic=False)
            lse.providers["torch-compile"] = _setup(compiled, shape, dtype, device, False, False)
        cases.append(lse)
        # token_logprobs forward + backward: read x (fwd), read x + write dx (bwd).
        tok = Case("token_logprobs", "full", shape, dtype, device, 3 * n * v * es)
        for b in ours:
            tok.providers[f"fdiv-{b}"] = _setup(
                lambda x, y, b=b: fk.token_logprobs(x, y, backend=b), shape, dtype, device,
                True, True)
        tok.ours = tuple(tok.providers)
        if "eager" in peers:
            tok.providers["torch-eager"] = _setup(gather_logprobs, shape, dtype, device, True, True)
            tok.providers["trl-selective"] = _setup(
                trl_selective_log_softmax, shape, dtype, device, True, True)
        if "trl" in peers:
            if importlib.util.find_spec("trl") is None:
                print("--peers trl: TRL is not installed, its selective_log_softmax is skipped",
                      file=sys.stderr)
            else:
                from trl.trainer.utils import selective_log_softmax   # the installed TRL's own

                tok.providers["trl-installed"] = _setup(
                    selective_log_softmax, shape, dtype, device, True, True)
        if "compile" in peers:
            compiled = torch.compile(gather_logprobs, dynamic=False)
            tok.providers["torch-compile"] = _setup(compiled, shape, dtype, device, True, True)
        cases.append(tok)
    return cases
