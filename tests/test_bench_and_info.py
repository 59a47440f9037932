"""The bench command and the info command run, and write what they promise."""

import json

import fdiv_kernels.bench.__main__ as bench
from fdiv_kernels.info import report

ROW_FIELDS = {"op", "backend", "shape", "dtype", "ms", "gbps", "bandwidth_fraction",
              "peak_mem_bytes"}


def test_bench_quick_writes_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    # Interpreted Triton is a correctness path, far too slow to time: CPU backends only.
    assert bench.main(["--quick", "--kinds", "js", "--backends", "cpu,torch",
                       "--json", str(out_json), "--png", str(out_png)]) == 0
    data = json.loads(out_json.read_text())
    assert {"device", "versions", "date", "command", "rows", "copy_bandwidth_gbps"} <= set(data)
    assert data["copy_bandwidth_gbps"] > 0
    ops = {r["op"] for r in data["rows"]}
    assert {"divergence:js", "logsumexp", "token_logprobs", "fused_linear:js"} <= ops
    assert any(op.startswith("sinkhorn") for op in ops)
    for row in data["rows"]:
        assert ROW_FIELDS <= set(row)
        assert row["error"] is None, row
        assert row["ms"] > 0 and 0 < row["bandwidth_fraction"]
    ours = [r for r in data["rows"] if r["backend"].startswith("fdiv-")]
    assert {r["op"] for r in ours} == ops  # every op family times at least one of our backends
    assert all(r["ratios"] for r in ours)  # ... against at least one peer of the same run
    assert out_png.stat().st_size > 1000
    table = capsys.readouterr().out
    assert "| divergence:js" in table and "vs torch-eager" in table


def test_bench_rejects_bad_arguments(capsys):
    import pytest

    for argv in (["--kinds", "nope"], ["--shapes", "12"], ["--modes", "bwd"]):
        with pytest.raises(SystemExit):
            bench.main(argv)


def test_info_lists_every_backend():
    text = report()
    for name in ("triton", "cuda", "cpu", "torch"):
        assert f"  {name}" in text


def test_installed_top_level_name_is_only_fdiv_kernels():
    """Our Triton folder installs as fdiv_kernels.triton_kernels only: a top-level
    ``triton_kernels`` would collide with Triton's own package."""
    import importlib.metadata

    import pytest

    try:
        dist = importlib.metadata.distribution("fdiv-kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fdiv-kernels is not installed (running from the source tree)")
    assert (dist.read_text("top_level.txt") or "").split() == ["fdiv_kernels"]


def test_bench_interleaved_masked_rows_case(tmp_path):
    """--interleave times a case's providers in alternating rounds; the masked-rows case puts
    the 70%-masked call against the unmasked one in the same run."""
    out_json = tmp_path / "r.json"
    assert bench.main(["--quick", "--ops", "fused_linear_masked", "--backends", "cpu",
                       "--peers", "eager", "--interleave", "2", "--json", str(out_json)]) == 0
    rows = {r["backend"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert set(rows) == {"fdiv-cpu", "0%masked-fdiv-cpu"}
    assert all(r["error"] is None and r["ms"] > 0 for r in rows.values())
    assert set(rows["fdiv-cpu"]["ratios"]) == {"0%masked-fdiv-cpu"}


def test_sparse_interleaved_runner():
    """python -m fdiv_kernels.bench.sparse_divergence: every provider gets a fastest round and a
    median ratio to ours (1 for ours), on a tiny shape."""
    from fdiv_kernels.bench.sparse_divergence import interleaved

    res = interleaved(n=8, v=300, k=4, tail="bucket", reps=3)
    assert set(res) == {"fk.sparse_divergence", "eager", "fk.token_logprobs"}
    assert res["fk.sparse_divergence"]["ratio"] == 1.0
    assert all(r["min"] > 0 and r["ratio"] > 0 for r in res.values())
