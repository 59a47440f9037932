"""The Triton compile check fails on what only the real compiler rejects: a kernel reading a
non-constexpr global compiles under the interpreter but not for a GPU. One small compile each way
(sm_80, no GPU needed)."""

import pytest
import triton.language as tl
from triton.runtime.jit import JITFunction

from fdiv_kernels import triton_compile_check as check

SCALE = 2.0  # a plain global: Triton's compiler refuses it inside @triton.jit
SCALE_CONST = tl.constexpr(2.0)


def _bad(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * SCALE)


def _good(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * SCALE_CONST)


def _compile(fn):
    # JITFunction directly: conftest's TRITON_INTERPRET=1 would make @triton.jit an interpreter.
    kernel = JITFunction(fn)
    return check.compile_variant(kernel, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {(1,): 32},
                                 {}, {"num_warps": 1}, 80)


def test_non_constexpr_global_fails_the_check():
    r = _compile(_bad)
    assert not r["ok"]
    assert "Cannot access global variable SCALE" in r["error"]


@pytest.mark.skipif(not check.cuobjdump_path(), reason="Triton's cuobjdump not bundled")
def test_constexpr_global_compiles_with_resources():
    r = _compile(_good)
    assert r["ok"], r.get("error")
    assert r["regs"] > 0 and r["local_bytes"] == 0
