"""The harness of the distributed test files: cases registered per world size run inside forked
gloo ranks (one group of processes per world size: start-up is the cost), each reported back to
the parent as its own pytest item."""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import traceback
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close


class Checks:
    """Comparisons that record failures and raise at the end of a case: a rank that stopped at
    its first failure would desynchronize the collectives of the others."""

    def __init__(self):
        self.failures: list[str] = []

    def close(self, actual, expected, tol, what):
        try:
            assert_close(actual, expected, tol, what)
        except AssertionError as e:
            self.failures.append(str(e))

    def true(self, cond, what):
        if not cond:
            self.failures.append(what)

    def done(self):
        assert not self.failures, "\n".join(self.failures[:5])


class Cases:
    """A test file's cases: ``@cases.case(1, 2)`` registers ``fn(rank, world, ck)`` for those
    world sizes; ``cases.params()`` are the (world, name) items and ``cases.check(world, name)``
    asserts one of them passed on every rank."""

    def __init__(self, checks: Callable[[], Checks] = Checks):
        self.cases: dict[str, tuple] = {}
        self.checks = checks
        self._results: dict[int, list[dict]] = {}

    def case(self, *worlds):
        def register(fn):
            self.cases[fn.__name__] = (fn, worlds)
            return fn
        return register

    def params(self) -> list[tuple[int, str]]:
        return [(w, n) for n, (_, ws) in self.cases.items() for w in ws]

    def check(self, world: int, name: str) -> None:
        for rank, results in enumerate(self._run_world(world)):
            assert name in results, f"rank {rank} did not run {name}"
            assert results[name] is None, f"rank {rank}/{world}:\n{results[name]}"

    def _run_world(self, world: int) -> list[dict]:
        if world not in self._results:
            with socket.socket() as sock:  # a free port on the loopback only
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            with tempfile.TemporaryDirectory() as out_dir:
                # fork: the ranks inherit the imported modules (spawn re-imports torch per rank).
                mp.start_processes(_worker, args=(world, port, out_dir, self), nprocs=world,
                                   start_method="fork")
                self._results[world] = []
                for r in range(world):
                    with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                        self._results[world].append(json.load(f))
        return self._results[world]


def _worker(rank: int, world: int, port: int, out_dir: str, cases: Cases) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, (fn, worlds) in cases.cases.items():
            if world not in worlds:
                continue
            try:
                ck = cases.checks()
                fn(rank, world, ck)
                ck.done()
                results[name] = None
            except Exception:  # reported per case by the parent
                results[name] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
