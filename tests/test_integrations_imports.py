"""The integrations stay out of the core, and a missing host is named with its pip package."""

import subprocess
import sys

import pytest


def test_core_imports_no_integration_and_no_host():
    code = ("import sys, fdiv_kernels; bad = [m for m in sys.modules if m.startswith("
            "('fdiv_kernels.integrations', 'trl', 'transformers', 'liger_kernel'))]; "
            "assert not bad, bad; "
            # The HF module too: its trainers are built on first access (module __getattr__).
            "import fdiv_kernels.integrations.hf as h; assert 'transformers' not in sys.modules; "
            "h.FkDistillationTrainer; assert 'transformers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_host_modules_import_no_host():
    """Importing a host module (or making a patch whose modules are not loaded) imports nothing
    of the host: the axolotl and verl swaps wait for the host's own import."""
    code = ("import sys\n"
            "import fdiv_kernels.integrations.trl, fdiv_kernels.integrations.axolotl as a\n"
            "import fdiv_kernels.integrations.verl as v\n"
            "pa, pv = a.apply_fk_to_axolotl(), v.apply_fk_to_verl()\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('trl', 'transformers', 'axolotl', 'verl', 'ray')]\n"
            "assert not bad, bad\n"
            "pa.undo(); pv.undo()\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("module,call,pip_name", [
    ("trl", lambda: __import__("fdiv_kernels.integrations.trl", fromlist=["x"]).apply_fk_to_trl(),
     "trl"),
    ("liger_kernel.transformers",
     lambda: __import__("fdiv_kernels.integrations.liger", fromlist=["x"]).apply_fk_to_liger(),
     "liger-kernel"),
    ("transformers",
     lambda: __import__("fdiv_kernels.integrations.hf", fromlist=["x"]).FkDistillationTrainer(),
     "transformers"),
    ("axolotl.integrations.kd.topk_logprob.forward_kl",
     lambda: __import__("fdiv_kernels.integrations.axolotl",
                        fromlist=["x"]).axolotl_topk_kd_loss(), "axolotl"),
    ("verl.trainer.distillation.fsdp.losses",
     lambda: __import__("fdiv_kernels.integrations.verl",
                        fromlist=["x"]).forward_kl_topk(None, None, None, None, "thd"), "verl"),
])
def test_missing_host_names_its_pip_package(monkeypatch, module, call, pip_name):
    import fdiv_kernels.integrations.hf as hf

    import fdiv_kernels.integrations.axolotl as ax

    monkeypatch.setattr(hf, "_BUILT", {})                # forget a built subclass
    monkeypatch.setattr(ax, "_ORIGINALS", {})           # and a host function found before
    monkeypatch.setitem(sys.modules, module, None)      # import of module now fails
    with pytest.raises(ImportError, match=f"pip install {pip_name}"):
        call()
