"""The kind and cost ids: one set of values for Python (fdiv_kernels.core._ids), Triton
(triton_kernels/ids.py) and C++ (csrc/common/ids.h, parsed here)."""

import re
from pathlib import Path

from fdiv_kernels.core import _ids
from fdiv_kernels.kinds._registry import DIVERGENCES
from fdiv_kernels.transport._costs import COST_KINDS

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "common" / "ids.h"


def _enum(name: str) -> dict[str, int]:
    body = re.search(rf"enum {name} : int \{{(.*?)\}};", HEADER.read_text(), re.S).group(1)
    return {k: int(v) for k, v in re.findall(r"(\w+)\s*=\s*(\d+)", body)}


def _const(name: str) -> int:
    return int(re.search(rf"constexpr int {name} = (\d+);", HEADER.read_text()).group(1))


def test_cpp_enums_match_python():
    assert _enum("Base") == _ids.BASES
    assert _enum("Cost") == _ids.COSTS
    assert _const("kNumKinds") == _ids.NUM_BASES == len(_ids.BASES)
    assert _const("kNumCosts") == _ids.NUM_COSTS == len(_ids.COSTS)
    assert _enum("Tail") == _ids.TAIL_IDS
    assert _const("kNumTails") == _ids.NUM_TAILS == len(_ids.TAIL_IDS)


def test_triton_constexprs_match_python():
    from fdiv_kernels.triton_kernels import ids as tids

    for name, value in {**_ids.BASES, **_ids.COSTS, **_ids.TAIL_IDS}.items():
        assert getattr(tids, name).value == value, name


def test_registries_use_the_ids():
    assert {d.base for d in DIVERGENCES.values()} == set(_ids.BASES.values())
    assert sorted(COST_KINDS.values()) == sorted(_ids.COSTS.values())
    assert COST_KINDS["l1"] == _ids.L1 and COST_KINDS["cosine"] == _ids.COSINE
