"""Spot-check that a tree computes the same numbers as another, bit for bit, on the cpu backend.

Run once per tree, then compare:

    PYTHONPATH=OLD_TREE python tools/spotcheck.py save /tmp/old.pt
    PYTHONPATH=NEW_TREE python tools/spotcheck.py save /tmp/new.pt
    python tools/spotcheck.py compare /tmp/old.pt /tmp/new.pt

(run from outside both trees, so the PYTHONPATH tree is the one imported). Covers a spread of
kinds of fk.divergence (fp32 / bf16 inputs, ignored rows, a softcap), the softmax statistics,
the sparse teacher (three tails), the three fused-linear forms and a Sinkhorn solve: losses and
gradients.
"""

import sys

import torch


def _cases():
    import fdiv_kernels as fk

    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32, scale=3.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    out = {}
    n, v = 37, 1031
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    for dtype in (torch.float32, torch.bfloat16):
        s0, t0 = rnd(n, v, dtype=dtype), rnd(n, v, dtype=dtype)
        for kind, kw in [("kl", {}), ("reverse_kl", {}), ("js", {"beta": 0.3}), ("tv", {}),
                         ("alpha", {"alpha": 0.7}), ("skew_kl", {"lam": 0.2}),
                         ("jeffreys", {}), ("renyi", {"alpha": 0.5}), ("cauchy_schwarz", {}),
                         ("soft_ce", {})]:
            s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
            loss = fk.divergence(s, t, kind, labels=labels, temperature=1.5, backend="cpu", **kw)
            loss.backward()
            key = f"div/{kind}/{dtype}"
            out[key] = (loss.detach(), s.grad, t.grad)
        s = s0.clone().requires_grad_()
        loss = fk.divergence(s, t0, "js", student_softcap=20.0, backend="cpu")
        loss.backward()
        out[f"div/js-softcap/{dtype}"] = (loss.detach(), s.grad)
        x = s0.clone().requires_grad_()
        st = fk.softmax_stats(x, labels, temperature=0.7, backend="cpu")
        (st.lse.sum() + st.entropy.sum() + st.label_logprob.sum()).backward()
        out[f"stats/{dtype}"] = (st.lse.detach(), st.entropy.detach(),
                                 st.label_logprob.detach(), x.grad)
    k = 16
    s0 = rnd(n, v)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    tlp = torch.log_softmax(rnd(n, k), -1) - 0.1
    for tail in ("bucket", "none", "renormalize"):
        s = s0.clone().requires_grad_()
        lp = tlp.clone().requires_grad_()
        loss = fk.sparse_divergence(s, ids, lp, "kl", tail=tail, labels=labels, backend="cpu")
        loss.backward()
        out[f"sparse/{tail}"] = (loss.detach(), s.grad, lp.grad)
    h, H = 29, 24
    hs, ws, bs = rnd(h, H, scale=1.0), rnd(v, H, scale=0.3), rnd(v, scale=0.5)
    ht, wt = rnd(h, H + 3, scale=1.0), rnd(v, H + 3, scale=0.3)
    lab = torch.randint(0, v, (h,), generator=g)
    lab[1::4] = -100
    for red in ("mean", "none"):
        p = [x.clone().requires_grad_() for x in (hs, ws, bs, ht, wt)]
        loss = fk.fused_linear_divergence(p[0], p[1], p[3], p[4], "js", student_bias=p[2],
                                          labels=lab, reduction=red, ce_weight=0.3,
                                          chunk_size=7, backend="cpu")
        loss.sum().backward()
        out[f"fused/dense/{red}"] = (loss.detach(), *[x.grad for x in p])
        p = [x.clone().requires_grad_() for x in (hs, ws, bs)]
        ids_h = ids[:h]
        loss = fk.fused_linear_sparse_divergence(p[0], p[1], ids_h, tlp[:h], "kl",
                                                 student_bias=p[2], reduction=red,
                                                 chunk_size=7, backend="cpu")
        loss.sum().backward()
        out[f"fused/sparse/{red}"] = (loss.detach(), *[x.grad for x in p])
    p = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    lp_, ent = fk.fused_linear_token_logprobs(p[0], p[1], lab.clamp(min=0), bias=p[2],
                                              return_entropy=True, chunk_size=7, backend="cpu")
    (lp_.sum() + ent.sum()).backward()
    out["fused/logprobs"] = (lp_.detach(), ent.detach(), *[x.grad for x in p])
    a = torch.softmax(rnd(3, 11), -1)
    b = torch.softmax(rnd(3, 13), -1)
    x, y = rnd(3, 11, 2, scale=1.0), rnd(3, 13, 2, scale=1.0)
    r = fk.sinkhorn(x=x, y=y, a=a, b=b, epsilon=0.1, cost_fn="sqeuclidean", backend="cpu")
    out["sinkhorn"] = tuple(v for v in vars(r).values() if isinstance(v, torch.Tensor))
    return out


def main() -> None:
    if sys.argv[1] == "save":
        torch.save(_cases(), sys.argv[2])
        return
    old, new = torch.load(sys.argv[2]), torch.load(sys.argv[3])
    bad = 0
    for key in old:
        same = key in new and len(old[key]) == len(new[key]) and all(
            (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape
                                          and torch.equal(a, b))
            for a, b in zip(old[key], new[key]))
        bad += not same
        print(f"{'same' if same else 'DIFFERENT'}  {key}")
    print(f"{len(old) - bad} of {len(old)} cases bit-identical")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
