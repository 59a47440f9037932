"""The bench command and the info command run, and write what they promise."""

import json

import fdiv_kernels.bench.__main__ as bench
from fdiv_kernels.info import report

ROW_FIELDS = {"op", "backend", "shape", "dtype", "ms", "gbps", "bandwidth_fraction",
              "peak_mem_bytes"}


def test_bench_quick_saves_json_table_and_charts(tmp_path, capsys):
    # Interpreted Triton is a correctness path, far too slow to time: CPU backends only.
    # The torch backend (the spec, solving Sinkhorn one launch per half-iteration) would double
    # the run's time: the C++ backend alone times every family.
    assert bench.main(["--quick", "--kinds", "js", "--backends", "cpu",
                       "--out", str(tmp_path), "--name", "run"]) == 0
    data = json.loads((tmp_path / "run.json").read_text())
    assert {"device", "versions", "date", "command", "rows", "copy_bandwidth_gbps", "threads",
            "allocator", "absent"} <= set(data)
    assert data["copy_bandwidth_gbps"] > 0
    assert data["allocator"].startswith("THP_MEM_ALLOC_ENABLE=")
    assert "liger" in data["absent"]  # asked for by default, timed on CUDA only: said why
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
    # One chart per op family, and the full table.
    for fam in ("divergence", "softmax_stats", "fused_linear", "sinkhorn", "sparse"):
        assert (tmp_path / f"run-{fam}.png").stat().st_size > 1000, fam
    assert "| divergence:js" in (tmp_path / "run.md").read_text()
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert any("| divergence:js" in line and "x vs torch-eager" in line for line in table)
    assert max(map(len, table)) <= 130  # fits a terminal
    assert "absent from this run:" in out and "  liger:" in out


def test_bench_json_and_png_paths(tmp_path):
    assert bench.main(["--quick", "--ops", "divergence", "--kinds", "kl", "--backends", "cpu",
                       "--peers", "eager", "--no-save", "--json", str(tmp_path / "r.json"),
                       "--png", str(tmp_path / "r.png")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["rows"]
    assert (tmp_path / "r-divergence.png").stat().st_size > 1000
    assert not (tmp_path / "run.json").exists()


def test_bench_row_kinds_and_kind_parameters(tmp_path):
    """--kinds takes the row kinds and name=value parameters; each row's eager peer computes the
    same value as fk.divergence (checked here on the case's own inputs)."""
    import torch

    import fdiv_kernels as fk
    from fdiv_kernels.bench.divergence import kind_params, torch_pipeline

    kinds = "renyi=2,cauchy_schwarz,js=0.3"
    assert bench.main(["--quick", "--ops", "divergence", "--kinds", kinds, "--backends", "cpu",
                       "--peers", "eager", "--no-save", "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {r["op"] for r in rows} == {f"divergence:{k}" for k in kinds.split(",")}
    assert all(r["error"] is None for r in rows)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 300, generator=g) * 2, torch.randn(4, 300, generator=g) * 2
    for kind in kinds.split(","):
        name, params = kind_params(kind)
        torch.testing.assert_close(torch_pipeline(kind)(s, t),
                                   fk.divergence(s, t, name, backend="torch", **params),
                                   rtol=1e-5, atol=1e-6)


def test_case_cap_bounds_a_slow_provider():
    import time

    import torch

    from fdiv_kernels.bench.measure import capped_ms

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)

    ms, capped = capped_ms(slow, torch.device("cpu"), cap_s=0.12)
    assert capped and ms >= 50 and len(calls) <= 3   # uncapped: 2 warm-ups + >= 5 repeats
    ms, capped = capped_ms(lambda: None, torch.device("cpu"), cap_s=5.0)
    assert not capped


def test_run_name_and_charts_from_a_saved_run(tmp_path):
    import pathlib

    from fdiv_kernels.bench import report

    meta = {"device": "AMD EPYC 7B13 64-Core Processor (2 threads)", "device_type": "cpu",
            "threads": 2, "date": "2026-12-07T01:00:00+00:00"}
    assert report.run_name(meta) == "2026-12-07-cpu-amd-epyc-7b13-64-2t"
    root = pathlib.Path(__file__).resolve().parents[1]
    saved = root / "bench/results/2026-11-23-cpu-xeon-2t.json"
    assert report.main([str(saved), "--out-dir", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == [f"2026-11-23-cpu-xeon-2t-{f}.png"
                     for f in ("divergence", "fused_linear", "sinkhorn", "softmax_stats")]
    # One style per provider across every figure.
    assert report.provider_style("torch-eager") == report.provider_style("torch-eager")
    assert len({report.provider_style(p) for p in ("fdiv-cpu", "torch-eager", "torch-compile",
                                                   "liger", "pot-batch")}) == 5


def test_bench_rejects_bad_arguments(capsys):
    import pytest

    for argv in (["--kinds", "nope"], ["--kinds", "kl=2"], ["--kinds", "renyi=x"],
                 ["--shapes", "12"], ["--modes", "bwd"]):
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
                       "--peers", "eager", "--interleave", "2", "--no-save",
                       "--json", str(out_json)]) == 0
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
