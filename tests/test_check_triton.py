"""The Triton compile check fails on what only the real compiler rejects: a kernel reading a
non-constexpr global compiles under the interpreter but not for a GPU. One small compile each way
(sm_80, no GPU needed), each in a fresh process as scripts/check_triton.sh runs it: in this one
the interpreter (conftest's TRITON_INTERPRET=1) has already patched triton.language, which
changes the compiler's error messages."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TOOLS = str(Path(__file__).resolve().parents[1] / "tools")
sys.path.insert(0, TOOLS)
import triton_compile_check as check  # noqa: E402  (developer tooling, not in the package)

KERNELS = textwrap.dedent('''
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    SCALE = 2.0  # a plain global: Triton's compiler refuses it inside @triton.jit
    SCALE_CONST = tl.constexpr(2.0)


    def _bad(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) * SCALE)


    def _good(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) * SCALE_CONST)
''')

DRIVER = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[3])
    import kernels
    from triton.runtime.jit import JITFunction
    import triton_compile_check as check

    fn = getattr(kernels, sys.argv[2])
    r = check.compile_variant(JITFunction(fn), {"x_ptr": "*fp32", "BLOCK": "constexpr"},
                              {(1,): 32}, {}, {"num_warps": 1}, 80)
    print(json.dumps({k: v for k, v in r.items() if isinstance(v, (str, int, float, bool))}))
''')


def _compile(tmp_path, name):
    (tmp_path / "kernels.py").write_text(KERNELS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), name, TOOLS], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_non_constexpr_global_fails_the_check(tmp_path):
    r = _compile(tmp_path, "_bad")
    assert not r["ok"]
    assert "Cannot access global variable SCALE" in r["error"]


@pytest.mark.skipif(not check.cuobjdump_path(), reason="Triton's cuobjdump not bundled")
def test_constexpr_global_compiles_with_resources(tmp_path):
    r = _compile(tmp_path, "_good")
    assert r["ok"], r.get("error")
    assert r["regs"] > 0 and r["local_bytes"] == 0
