"""Fused linear + divergence cases: fk.fused_linear_divergence against the materialized eager
path (logits, log_softmax, loss) and, on a GPU with Liger-Kernel, Liger's fused linear JSD.

Each provider's student-hidden gradient is compared once with a float64 computation and the
relative error is reported (``grad_rel_err``)."""

from __future__ import annotations

import importlib.util
import sys

import torch

import fdiv_kernels as fk
from fdiv_kernels.bench.cases import Case, backward_step, our_backends


def _inputs(n, h, v, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    hs = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    ws = (torch.randn(v, h, generator=g) * h**-0.5).to(device=device, dtype=dtype)
    ht = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    wt = (torch.randn(v, h, generator=g) * h**-0.5).to(device=device, dtype=dtype)
    return hs, ws, ht, wt


def eager_js(hs, ws, ht, wt):
    """What a user writes: materialize both logits, two log_softmax, the JS loss."""
    lq = torch.log_softmax((hs @ ws.t()).float(), -1)
    lp = torch.log_softmax((ht @ wt.t()).float(), -1)
    lm = torch.logsumexp(torch.stack([lp, lq]), 0) - torch.log(torch.tensor(2.0))
    return 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1)).mean()


def _liger():
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers import LigerFusedLinearJSD

    crit = LigerFusedLinearJSD(jsd_beta=0.5)
    return lambda hs, ws, ht, wt: crit(hs, ws, ht, wt)


def _trl():
    """TRL's DistillationTrainer loss from hidden states (trl >= 1.16), JS(0.5), as TRL calls it."""
    if importlib.util.find_spec("trl") is None:
        print("--peers trl: TRL is not installed, its chunked distillation loss is skipped",
              file=sys.stderr)
        return None
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except ImportError as e:
        print(f"--peers trl: no trl.trainer.distillation_trainer._chunked_divergence_loss in "
              f"this TRL ({e}); skipped", file=sys.stderr)
        return None

    def run(hs, ws, ht, wt):
        mask = torch.ones(hs.shape[0], dtype=torch.long, device=hs.device)
        return _chunked_divergence_loss(hs, ht, ws, wt, mask, beta=0.5)[0]
    return run


def _grad_error(fn, args) -> float:
    """Relative L2 error of d loss / d student hidden against float64."""
    hs = args[0].detach().clone().requires_grad_(True)
    fn(hs, *args[1:]).backward()
    ref = args[0].detach().double().requires_grad_(True)
    eager_js(ref, *(a.double() for a in args[1:])).backward()
    return float((hs.grad.double() - ref.grad).norm() / ref.grad.norm())


def fused_linear_cases(shapes, dtype, device, peers=("eager", "liger"), backends=None):
    cases = []
    probe = torch.empty(1, dtype=torch.float32, device=device)
    ours = our_backends("divergence_fwd", probe, backends)
    for n, h, v in shapes:
        es = torch.empty(0, dtype=dtype).element_size()
        # read hidden + weights of both; write d hidden, d weight (student). The GEMMs dominate.
        nbytes = (2 * n * h + 2 * v * h) * es + (n * h + v * h) * es
        case = Case("fused_linear:js", "full", (n, h, v), dtype, device, nbytes)
        providers = {f"fdiv-{b}": (lambda hs, ws, ht, wt, b=b: fk.fused_linear_divergence(
            hs, ws, ht, wt, "js", backend=b)) for b in ours}
        case.ours = tuple(providers)
        if "eager" in peers:
            providers["torch-eager"] = eager_js
        liger = _liger() if device.type == "cuda" and "liger" in peers else None
        if liger is not None:
            providers["liger-fused-linear-jsd"] = liger
        trl = _trl() if "trl" in peers else None
        if trl is not None:
            providers["trl-chunked-divergence"] = trl
        for name, fn in providers.items():
            def setup(fn=fn, n=n, h=h, v=v):
                hs, ws, ht, wt = _inputs(n, h, v, dtype, device)
                return backward_step(fn, hs, ws, ht, wt, leaves=(hs, ws))

            case.providers[name] = setup
            case.extra[name] = (lambda fn=fn, n=n, h=h, v=v: {
                "grad_rel_err": _grad_error(fn, _inputs(min(n, 256), h, v, dtype, device)),
                "loss_rel_diff": _loss_diff(fn, _inputs(min(n, 256), h, v, dtype, device))})
        cases.append(case)
    return cases


def _loss_diff(fn, args) -> float:
    """|loss - fk's loss| / |fk's loss| on the same inputs (TRL's "same loss to 6 digits")."""
    with torch.no_grad():
        ref = fk.fused_linear_divergence(*args, "js").double()
        return float((fn(*args).double() - ref).abs() / ref.abs())


# The masked-rows target: a batch with 70% of its rows ignored (prompt tokens) against the same
# call with none ignored; packing should bring the time down to about 30%.
MASKED_FRACTION = 0.7


def fused_linear_masked_cases(shapes, dtype, device, backends=None):
    """fk.fused_linear_divergence (js) with 70% of the rows labelled ignore_index, against the
    same call with every row kept (the peer ``0%masked-fdiv-<backend>``): the ratio is the speedup
    from packing the ignored rows out of the GEMMs (target >= 1 / 0.45 = 2.2x)."""
    cases = []
    probe = torch.empty(1, dtype=torch.float32, device=device)
    for n, h, v in shapes:
        es = torch.empty(0, dtype=dtype).element_size()
        kept = n - int(MASKED_FRACTION * n)
        # read the kept rows' hidden states and both weights; write d hidden, d weight.
        nbytes = (2 * kept * h + 2 * v * h) * es + (n * h + v * h) * es
        pct = round(100 * MASKED_FRACTION)
        case = Case(f"fused_linear:js:{pct}%masked", "full", (n, h, v), dtype, device, nbytes)
        for b in our_backends("divergence_fwd", probe, backends):
            for frac, name in ((MASKED_FRACTION, f"fdiv-{b}"), (0.0, f"0%masked-fdiv-{b}")):
                def setup(b=b, frac=frac, n=n, h=h, v=v):
                    hs, ws, ht, wt = _inputs(n, h, v, dtype, device)
                    hs.requires_grad_(True)
                    ws.requires_grad_(True)
                    g = torch.Generator().manual_seed(2)
                    labels = torch.randint(0, v, (n,), generator=g)
                    # A prompt-like layout: the masked rows are spread, not one block.
                    labels[torch.randperm(n, generator=g)[: int(frac * n)]] = -100
                    labels = labels.to(device)

                    def run():
                        fk.fused_linear_divergence(hs, ws, ht, wt, "js", labels=labels,
                                                   backend=b).backward()
                        hs.grad = ws.grad = None
                    return run

                case.providers[name] = setup
            case.ours += (f"fdiv-{b}",)
        cases.append(case)
    return cases


def eager_token_logprobs(h, w, labels):
    """What a user writes: materialize the logits, log_softmax, gather, entropy from the probs."""
    lq = torch.log_softmax((h @ w.t()).float(), -1)
    lp = lq.gather(-1, labels[:, None]).squeeze(-1)
    return lp, -(lq.exp() * lq).sum(-1)


def fused_linear_logprobs_cases(shapes, dtype, device, peers=("eager",), backends=None):
    """fk.fused_linear_token_logprobs (with entropy) against the eager materialized path; the
    loss is sum(logprob) + sum(entropy), so both outputs' gradients are timed."""
    cases = []
    probe = torch.empty(1, dtype=torch.float32, device=device)
    ours = our_backends("softmax_stats_fwd", probe, backends)
    for n, h, v in shapes:
        es = torch.empty(0, dtype=dtype).element_size()
        # read hidden, weight; write d hidden, d weight. The GEMMs dominate.
        nbytes = 2 * (n * h + v * h) * es
        case = Case("fused_linear_logprobs", "full", (n, h, v), dtype, device, nbytes)
        providers = {f"fdiv-{b}": (lambda hs, ws, lab, b=b: fk.fused_linear_token_logprobs(
            hs, ws, lab, return_entropy=True, backend=b)) for b in ours}
        case.ours = tuple(providers)
        if "eager" in peers:
            providers["torch-eager"] = eager_token_logprobs
        for name, fn in providers.items():
            def setup(fn=fn, n=n, h=h, v=v):
                hs, ws, _, _ = _inputs(n, h, v, dtype, device)
                lab = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))

                def loss(hs, ws, lab, fn=fn):
                    lp, ent = fn(hs, ws, lab)
                    return lp.sum() + ent.sum()
                return backward_step(loss, hs, ws, lab.to(device), leaves=(hs, ws))

            case.providers[name] = setup
        cases.append(case)
    return cases
