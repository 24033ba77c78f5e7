"""The benchmark's timing helper: alternation order, warm-up rounds dropped, medians (no real timing)."""

from __future__ import annotations

from minimal.benchmark import time_alternating


def test_time_alternating_alternates_drops_warmup_and_takes_medians() -> None:
    calls: list[str] = []
    fake = {"a": iter([100.0, 1.0, 3.0, 2.0]), "b": iter([100.0, 10.0, 30.0, 50.0])}

    def make(name: str):
        def step() -> float:
            calls.append(name)
            return next(fake[name])
        return step

    median = time_alternating({"a": make("a"), "b": make("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert median == {"a": 2.0, "b": 30.0}  # the warm-up 100s are not counted
