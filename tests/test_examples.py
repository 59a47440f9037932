"""Each example in examples/ runs in its smoke mode (seconds), in-process so imports are shared."""

import importlib.util
import os
import sys

import pytest

pytest.importorskip("transformers")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _main(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod        # loaded as a script is: a module in sys.modules
    spec.loader.exec_module(mod)
    return mod.main


def test_distill_tiny_smoke(tmp_path):
    out = _main("distill_tiny")(["--smoke", "--out", str(tmp_path)])
    assert len(out["losses"]) == 4 and all(x > 0 for x in out["losses"])
    with open(out["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_dpo_f_divergence_smoke():
    out = _main("dpo_f_divergence")(["--smoke"])
    assert set(out) == {"reverse_kl", "forward_kl", "js", "alpha"}
    for r in out.values():
        assert r["losses"][0] == pytest.approx(0.6931, abs=1e-3)   # log 2: policy == reference
        assert r["margin"] > 0                                       # chosen pulled up


def test_gkd_trl_smoke():
    pytest.importorskip("trl")
    out = _main("gkd_trl")(["--smoke"])
    assert any("generalized_jsd_loss" in t for t in out["patched"])
    assert any("GKDTrainer.compute_loss" in t for t in out["patched"])    # the fused path
    assert len(out["plain"]) == len(out["swapped"]) == 3 and len(set(out["plain"])) == 3
    # Same models, same data, fp32: TRL's and fk's losses agree step by step.
    assert out["plain"] == pytest.approx(out["swapped"], rel=1e-4)


def test_liger_jsd_smoke():
    pytest.importorskip("liger_kernel.chunked_loss")
    out = _main("liger_jsd")(["--smoke"])
    assert any("LigerFusedLinearJSDLoss" in t for t in out["patched"])
    assert any(t.startswith("example_liger_jsd.") for t in out["patched"])   # the script's import
    assert len(out["plain"]) == len(out["swapped"]) == 3
    # Same models, same data: Liger's and fk's losses agree step by step.
    assert out["plain"] == pytest.approx(out["swapped"], rel=1e-4)


def test_torchtune_kd_smoke():
    out = _main("torchtune_kd")(["--smoke"])
    assert len(out["swapped"]) == 3 and len(set(out["swapped"])) == 3
    if out["plain"] is not None:
        assert out["plain"] == pytest.approx(out["swapped"], rel=1e-4)
