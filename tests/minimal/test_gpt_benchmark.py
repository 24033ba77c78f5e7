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


def test_write_results_writes_json_and_markdown(tmp_path) -> None:
    import json

    from minimal.benchmark import write_results

    write_results(tmp_path / "new", "bench", {"ratio": 1.5}, "| a |\n")
    assert json.loads((tmp_path / "new" / "bench.json").read_text(encoding="utf-8")) == {"ratio": 1.5}
    assert (tmp_path / "new" / "bench.md").read_text(encoding="utf-8") == "| a |\n"
