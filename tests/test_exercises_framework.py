import pytest

from chapters import exercises
from chapters.exercises import Mismatch, check, checker, close, equal


@pytest.fixture
def toy():
    @checker("ch0._toy_square")
    def _check(fn):
        for x in (0, 1, 3):
            equal(fn(x), x * x, f"square({x})")
    yield "ch0._toy_square"
    exercises.CHECKERS.pop("ch0._toy_square")


def test_a_right_answer_passes(toy, capsys):
    assert check(toy, lambda x: x * x)
    assert capsys.readouterr().out == f"{toy}: passed\n"


def test_a_wrong_answer_says_what_differs(toy, capsys):
    assert not check(toy, lambda x: 2 * x)
    assert "square(1): got 2, expected 1" in capsys.readouterr().out


def test_an_unfilled_stub_reports_not_implemented_and_does_not_raise(toy, capsys):
    def stub(x):
        raise NotImplementedError
    assert not check(toy, stub)
    assert "not implemented yet" in capsys.readouterr().out


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="names start with"):
        check("ch9.x", print)


def test_close_names_the_largest_gap():
    import torch
    with pytest.raises(Mismatch, match=r"merged weight: largest difference 2 at index \(1, 0\)"):
        close(torch.tensor([[0.0, 0], [2, 0]]), torch.zeros(2, 2), "merged weight")
    with pytest.raises(Mismatch, match="shape"):
        close(torch.zeros(2), torch.zeros(3), "x")
