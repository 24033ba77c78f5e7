"""Cheap static guards over the committed notebooks (nbval itself runs them in `make nbval`).

A training run's digits differ between machines, so a code cell that trains or evaluates and prints
decimals must carry `# NBVAL_IGNORE_OUTPUT`, and the conclusion the text draws must be asserted with
`claim(...)` (chapters/claims.py). These tests find cells that break that rule with a heuristic.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted(Path(__file__).resolve().parents[1].glob("notebooks/**/*.ipynb"))
# calls whose results depend on the digits of a training run or of an evaluation after one
RUN = re.compile(r"\b(train|train_one|fine_tune|finetune|run_one|run_method|evaluate_task|evaluate_kshot|perplexity|"
                 r"fit|pretrain|sweep|experiment)\w*\(")
DECIMALS = re.compile(r"(?<![\w.])-?\d+\.\d{2,}(?![\d])")  # 0.47, 2887.63, 1.98: not 1,071,872 or 0.5


def cells(nb: Path) -> list[dict]:
    return json.loads(nb.read_text(encoding="utf-8"))["cells"]


def text_outputs(cell: dict) -> str:
    out = []
    for o in cell.get("outputs", []):
        out.append("".join(o.get("text", "")))
        out.append("".join(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def ignored(cell: dict) -> bool:
    src = "".join(cell["source"])
    return "NBVAL_IGNORE_OUTPUT" in src or "NBVAL_SKIP" in src


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 12


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_cells_printing_training_digits_are_not_compared(nb):
    bad = []
    for i, c in enumerate(cells(nb)):
        if c["cell_type"] != "code" or ignored(c):
            continue
        src = "".join(c["source"])
        if RUN.search(src) and DECIMALS.search(text_outputs(c)):
            bad.append(f"cell {i}: {DECIMALS.search(text_outputs(c)).group(0)}")
    assert not bad, f"{nb.name}: compared cells print digits of a run; ignore their output and claim(...): {bad}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_that_train_assert_their_conclusions(nb):
    code = ["".join(c["source"]) for c in cells(nb) if c["cell_type"] == "code"]
    trains = any(RUN.search(s) for s in code)
    if trains:
        assert any("claim(" in s for s in code), f"{nb.name} trains but asserts no claim"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_with_outputs_and_no_errors(nb):
    code = [c for c in cells(nb) if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code if "".join(c["source"]).strip()), f"{nb.name}: unexecuted cells"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{nb.name} was committed with an error output"


def test_the_guard_flags_a_training_cell_that_prints_digits():
    cell = {"cell_type": "code", "source": ["res = train(model, batches, cfg)\n", "print(res.loss)"],
            "outputs": [{"output_type": "stream", "text": ["1.9834\n"]}]}
    assert RUN.search("".join(cell["source"])) and DECIMALS.search(text_outputs(cell)) and not ignored(cell)
    assert not DECIMALS.search("1,071,872 params, 0.5 of them")


RAN_IN = re.compile(r"notebook ran in (\d+) s")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_each_notebook_records_its_run_time_within_three_minutes(nb):
    code = [c for c in cells(nb) if c["cell_type"] == "code"]
    assert "T_START" in "".join(code[0]["source"]), f"{nb.name}: the first cell starts the clock (T_START)"
    found = RAN_IN.search(text_outputs(code[-1]))
    assert found, f"{nb.name}: the last cell prints 'notebook ran in N s'"
    assert int(found.group(1)) <= 180, f"{nb.name} ran in {found.group(1)} s, over the 3-minute budget"
