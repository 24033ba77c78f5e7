"""`claim`: the notebooks' way to state, in code, what their text concludes from a training run.

The digits of a training run differ from one CPU to another (another reduction order, another BLAS kernel,
another thread count), so a notebook shows them under `# NBVAL_IGNORE_OUTPUT` and asserts the conclusion
instead, with a margin that holds on every machine and fails when the conclusion is false:

    claim(lora_acc > zero_shot + 0.1, "LoRA learns the task: at least 0.1 above zero-shot")

On success it prints the sentence (identical on every machine, so nbval compares it); on failure it raises
`ClaimError` naming the sentence that the numbers contradict.
"""

from __future__ import annotations


class ClaimError(AssertionError):
    """A notebook's text says something that this run's numbers contradict."""


def claim(holds: bool, text: str, detail: str = "") -> None:
    """Assert what the text says; `detail` (for example the numbers compared) is shown only on failure."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("claim needs the sentence it checks, as a non-empty string")
    if not bool(holds):
        raise ClaimError(f"the text says {text!r}, but this run contradicts it" + (f" ({detail})" if detail else ""))
    print(f"claim holds: {text}")
