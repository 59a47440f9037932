"""``python -m fdiv_kernels.info``: what was built and what each backend can do here."""

from __future__ import annotations

import torch

from fdiv_kernels import __version__
from fdiv_kernels.core._dispatch import BACKENDS, FLOAT_DTYPES, TABLE, load_error, triton_interpret


def report() -> str:
    """What ``python -m fdiv_kernels.info`` prints: the versions, whether the C++ extension and
    Triton loaded (or why not), ``TRITON_INTERPRET``, and for CPU (and CUDA when present) tensors
    which dtypes each backend can take, or its reasons when it can take none."""
    lines = [f"fdiv_kernels {__version__}, torch {torch.__version__}"]
    for module in ("fdiv_kernels._C", "triton"):
        err = load_error(module)
        lines.append(f"  {module}: {'loaded' if err is None else 'unavailable - ' + err}")
    lines.append(f"  TRITON_INTERPRET={'1' if triton_interpret() else '0'}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        lines.append(f"backends for {device} tensors:")
        for name in BACKENDS:
            ok = [str(d).replace("torch.", "") for d in FLOAT_DTYPES + (torch.float64,)
                  if not TABLE[name].reasons(device, d)]
            reasons = TABLE[name].reasons(device, torch.float32)
            state = f"yes ({', '.join(ok)})" if ok else "no - " + "; ".join(reasons)
            lines.append(f"  {name:7s} {state}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
