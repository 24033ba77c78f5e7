import pytest

from chapters.claims import ClaimError, claim


def test_claim_prints_the_sentence_when_it_holds(capsys):
    claim(0.8 > 0.3 + 0.1, "LoRA learns the task")
    assert capsys.readouterr().out == "claim holds: LoRA learns the task\n"


def test_claim_raises_naming_the_sentence_and_the_numbers():
    with pytest.raises(ClaimError, match=r"'LoRA learns the task'.*\(0.31 vs 0.30\)"):
        claim(0.31 > 0.30 + 0.1, "LoRA learns the task", "0.31 vs 0.30")


def test_claim_is_an_assertion_so_pytest_and_nbval_report_it_as_one():
    with pytest.raises(AssertionError):
        claim(False, "x")


def test_claim_needs_a_sentence():
    with pytest.raises(ValueError, match="sentence"):
        claim(True, "  ")
