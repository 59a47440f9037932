"""One small and one large call of every CUDA kernel, to run under compute-sanitizer
(``scripts/gpu_check.sh``): the divergence forward and backward on both kernel paths (multi-pass
and cluster, forced with FDIV_CUDA_DIVERGENCE_PATH) and the softmax statistics forward and
backward. Small: 3 rows of 1000 (one block, odd tail); large: 2 rows of 262144 (the online loop,
past a cluster tile). Exits 0 with "no GPU" where torch sees none."""

import os
import sys

import torch

SHAPES = [(3, 1000), (2, 262144)]


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_cuda_calls: no GPU")
        return 0
    import fdiv_kernels as fk

    g = torch.Generator(device="cuda").manual_seed(0)
    for path in ("multipass", "cluster"):
        os.environ["FDIV_CUDA_DIVERGENCE_PATH"] = path
        for n, v in SHAPES:
            s = torch.randn(n, v, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
            t = torch.randn(n, v, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
            labels = torch.zeros(n, dtype=torch.long, device="cuda")
            labels[0] = -100  # an ignored row
            for kind in ("kl", "js"):
                loss = fk.divergence(s, t, kind, labels=labels, backend="cuda")
                loss.backward()
            print(f"  divergence {path} {n}x{v}: ok", flush=True)
    for n, v in SHAPES:
        x = torch.randn(n, v, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
        labels = torch.randint(0, v, (n,), device="cuda", generator=g)
        st = fk.softmax_stats(x, labels, backend="cuda")
        (st.lse.sum() + st.entropy.sum() + st.label_logprob.sum()).backward()
        print(f"  softmax_stats {n}x{v}: ok", flush=True)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
