"""Smoke test of an installed fdiv-kernels (run by scripts/check_wheel.sh inside a fresh virtual
environment, from a folder outside the source tree): the package imports from the environment,
``python -m fdiv_kernels.info`` runs, one op runs on every backend available here (the Triton
kernels under the interpreter) and agrees with the torch backend, and one integration imports."""

import os
import subprocess
import sys
import warnings

# Before Triton is imported: no GPU here, the kernels run under the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter evaluates masked-out lanes with numpy (e.g. log(0)): expected (pyproject.toml).
warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")

import torch  # noqa: E402

import fdiv_kernels as fk  # noqa: E402

tree = os.environ.get("FDIV_SOURCE_TREE")
where = os.path.dirname(os.path.abspath(fk.__file__))
print(f"fdiv_kernels {fk.__version__} from {where}")
if tree and os.path.commonpath([where, os.path.abspath(tree)]) == os.path.abspath(tree):
    sys.exit(f"imported the source tree's package ({where}), not the installed wheel")

info = subprocess.run([sys.executable, "-m", "fdiv_kernels.info"], capture_output=True,
                      text=True, check=True).stdout
print(info)
if "fdiv_kernels._C: loaded" not in info:
    sys.exit("the installed package has no working C++ extension")

g = torch.Generator().manual_seed(0)
s = torch.randn(3, 5, 301, generator=g).requires_grad_()
t = torch.randn(3, 5, 301, generator=g)
labels = torch.randint(0, 301, (3, 5), generator=g)
labels[0, :2] = -100
ref = fk.divergence(s, t, "js", labels=labels, backend="torch")
(ref_grad,) = torch.autograd.grad(ref, s)
ran = []
for backend in ("cpu", "triton", "torch"):
    reasons = fk.not_supported_reasons(backend, s)
    if reasons:
        print(f"{backend}: not available here ({'; '.join(reasons)})")
        continue
    loss = fk.divergence(s, t, "js", labels=labels, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=2e-5, atol=1e-7)
    lp = fk.token_logprobs(s.detach(), labels, backend=backend)
    torch.testing.assert_close(lp, fk.token_logprobs(s.detach(), labels, backend="torch"))
    ran.append(backend)
print("ran:", ", ".join(ran))
# The CPU wheel must carry both compiled paths: the C++ extension and the Triton kernels.
if not {"cpu", "triton"} <= set(ran):
    sys.exit(f"expected the cpu and triton backends to run, ran {ran}")

from fdiv_kernels.integrations import trl as fk_trl  # noqa: E402

loss = fk_trl.generalized_jsd_loss(s, t, labels, beta=0.5)
assert torch.isfinite(loss), loss
print("smoke test passed")
