"""The delta-tuning taxonomy: three non-empty families, each method in exactly one, and its drawing."""

from __future__ import annotations

from collections import Counter

import pytest
from matplotlib.figure import Figure

from chapters.ch1_introduction.taxonomy import FAMILIES, NOTES, TAXONOMY, draw_taxonomy, family_of


def test_three_families_all_non_empty() -> None:
    assert tuple(TAXONOMY) == FAMILIES == ("addition", "specification", "reparameterisation")
    for family, methods in TAXONOMY.items():
        assert methods, family


def test_no_method_in_two_families() -> None:
    counts = Counter(m.lower() for methods in TAXONOMY.values() for m in methods)
    assert [m for m, c in counts.items() if c > 1] == []


@pytest.mark.parametrize("method,family", [("LoRA", "reparameterisation"), ("bitfit", "specification"),
                                           ("Prefix tuning", "addition"), ("AdaLoRA", "reparameterisation"),
                                           ("FISH mask", "specification"), ("Houlsby adapter", "addition")])
def test_family_of_known_methods(method: str, family: str) -> None:
    assert family_of(method) == family


def test_unknown_method_is_an_error() -> None:
    with pytest.raises(ValueError, match="not in the taxonomy"):
        family_of("Full fine-tuning")


def test_notes_refer_to_placed_methods() -> None:
    for method in NOTES:
        family_of(method)


def test_drawing_shows_every_family_and_method() -> None:
    fig = draw_taxonomy()
    assert isinstance(fig, Figure)
    texts = {t.get_text().rstrip("*") for ax in fig.axes for t in ax.texts}
    for family, methods in TAXONOMY.items():
        assert f"{family} ({len(methods)})" in texts
        assert set(methods) <= texts
    small = draw_taxonomy({"a": ("x",), "b": ("y", "z")})
    assert {"a (1)", "b (2)", "x", "y", "z"} <= {t.get_text() for t in small.axes[0].texts}


def test_every_placed_method_links_to_an_existing_file():
    from pathlib import Path

    from chapters.ch1_introduction.taxonomy import FILES, TAXONOMY

    root = Path(__file__).resolve().parents[2]
    placed = {m for methods in TAXONOMY.values() for m in methods}
    assert placed == set(FILES)
    for method, path in FILES.items():
        assert (root / path).is_file(), f"{method}: {path} does not exist"
