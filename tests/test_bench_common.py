"""The benchmarks' shared re-timing of close calls (benchmarks/common.py), without a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"
_spec = importlib.util.spec_from_file_location("bench_common", _PATH)
common = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_common", common)  # dataclasses look their module up
_spec.loader.exec_module(common)


def test_alternating_rounds_reverse_the_order_every_other_round():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")}
    clock = iter(range(1, 100))

    def time_ms(fn):
        fn()
        return float(next(clock))

    times = common.alternating_rounds(fns, 3, time_ms)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    # each name's times in round order, from the calls it was timed in
    assert times == {"a": [1.0, 6.0, 7.0], "b": [2.0, 5.0, 8.0], "c": [3.0, 4.0, 9.0]}


def test_close_call_note_medians_ranges_and_overlap():
    nbytes = 1e9  # 1 GB: GB/s = 1000 / ms
    times = {"ours": [1.0, 0.9, 0.95], "peer": [2.0, 1.8, 2.5]}
    apart = common.close_call_note(times, "ours", "peer", nbytes)
    assert apart == ("3 alternating rounds: ours median 1,053 GB/s (1,000-1,111), peer 500 (400-556): "
                     "ahead by +110.5%, ranges apart")
    close = common.close_call_note({"ours": [1.0, 1.1, 1.2], "peer": [1.05, 0.95, 1.0]}, "ours", "peer",
                                   nbytes)
    assert close.endswith("BEHIND by -9.1%, ranges overlap")
    assert "ours median 909 GB/s (833-1,000), peer 1,000 (952-1,053)" in close


@pytest.mark.parametrize("rounds", [1, 4])
def test_alternating_rounds_counts(rounds):
    times = common.alternating_rounds({"x": lambda: None, "y": lambda: None}, rounds, lambda fn: 2.0)
    assert times == {"x": [2.0] * rounds, "y": [2.0] * rounds}


def test_recheck_close_call_times_ours_and_the_fastest_peer_only_when_close():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("ours", "slow", "fast", "floor")}
    rates = {"ours": 100.0, "slow": 50.0, "fast": 102.0, "floor": 101.0}
    note = common.recheck_close_call(rates, fns, "ours", lambda name: name != "floor", 2,
                                     lambda fn: fn() or 1.0, 1e9)
    assert calls == ["ours", "fast", "fast", "ours"]  # the floor is no peer, the slow peer not the best
    assert note.startswith("2 alternating rounds: ours median 1,000 GB/s") and "fast 1,000" in note
    calls.clear()
    far = common.recheck_close_call({"ours": 100.0, "fast": 110.0}, fns, "ours", lambda name: True, 2,
                                    lambda fn: fn() or 1.0, 1e9)
    assert far is None and calls == []
