"""Checkers for the notebooks' exercises: `check("ch4.lora_merge", merge)` tests a student's function.

Each chapter has modules here (`ch0.py` ... `ch5.py`, and `ch4_*.py` for a chapter with several notebooks)
that register their checkers with `@checker(name)`; names are "chN.something".
A checker receives the student's function, compares it with the library's implementation on random inputs,
and raises `Mismatch` with what differs and where. `check` runs it and prints one line:

- "not implemented yet" when the stub still raises NotImplementedError (so an unfilled notebook runs clean),
- "passed" when it agrees with the library,
- "not yet: <what differs>" otherwise.

It returns True only on a pass, so a solutions notebook can `assert check(...)`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

CHAPTERS = ("ch0", "ch1", "ch2", "ch3", "ch4", "ch5")
CHECKERS: dict[str, Callable[[Any], None]] = {}


class Mismatch(AssertionError):
    """The student's answer differs from the library's; the message says how."""


def checker(name: str) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Register `fn(answer)` as the checker of exercise `name` ("chN.something")."""
    def register(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        if name in CHECKERS:
            raise ValueError(f"exercise {name!r} is registered twice")
        CHECKERS[name] = fn
        return fn
    return register


def _load(name: str) -> Callable[[Any], None]:
    chapter = name.split(".", 1)[0]
    if chapter not in CHAPTERS:
        raise ValueError(f"unknown exercise {name!r}: names start with one of {', '.join(CHAPTERS)}")
    for module in pkgutil.iter_modules(__path__):
        if module.name == chapter or module.name.startswith(chapter + "_"):
            importlib.import_module(f"chapters.exercises.{module.name}")
    if name not in CHECKERS:
        known = sorted(k for k in CHECKERS if k.startswith(chapter + "."))
        raise ValueError(f"unknown exercise {name!r}; {chapter} has: {', '.join(known)}")
    return CHECKERS[name]


def check(name: str, answer: Any) -> bool:
    """Run exercise `name`'s checker on `answer`, print the verdict, return True on a pass."""
    run = _load(name)
    try:
        run(answer)
    except NotImplementedError:
        print(f"{name}: not implemented yet (replace the `raise NotImplementedError` with your code)")
        return False
    except Mismatch as err:
        print(f"{name}: not yet: {err}")
        return False
    print(f"{name}: passed")
    return True


def tiny_gpt(shape: tuple[int, int, int], seed: int = 0, block_size: int = 16):
    """A small random GPT of the given (n_layer, n_embd, n_head), the same for the same seed."""
    import torch

    from minimal.gpt import GPT, GPTConfig

    n_layer, n_embd, n_head = shape
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=40, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd))


def predicted(answer: Any, what: str = "the answer") -> int:
    """A predicted int; None or ... (the unfilled `answer = None`) means not answered yet."""
    if answer is None or answer is ...:
        raise NotImplementedError
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise Mismatch(f"{what} should be an int, got {answer!r}")
    return answer


def run(fn: Callable[..., Any], *args: Any, what: str) -> Any:
    """Call the student's function; an exception other than NotImplementedError becomes a Mismatch."""
    try:
        return fn(*args)
    except (NotImplementedError, Mismatch):
        raise
    except Exception as err:  # noqa: BLE001 - report any crash of the student's code as what differs
        raise Mismatch(f"{what} raised {type(err).__name__}: {err}") from err


def close(got: Any, want: Any, what: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Raise Mismatch unless two tensors (or numbers) agree; the message names `what` and the largest gap."""
    import torch

    got_t, want_t = torch.as_tensor(got), torch.as_tensor(want)
    if got_t.shape != want_t.shape:
        raise Mismatch(f"{what}: shape {tuple(got_t.shape)}, expected {tuple(want_t.shape)}")
    got_t, want_t = got_t.double(), want_t.double()
    if not torch.allclose(got_t, want_t, atol=atol, rtol=rtol):
        gap = (got_t - want_t).abs()
        where = tuple(int(i) for i in torch.nonzero(gap == gap.max())[0]) if gap.dim() else ()
        raise Mismatch(f"{what}: largest difference {gap.max().item():.3g} at index {where}")


def equal(got: Any, want: Any, what: str) -> None:
    """Raise Mismatch unless two plain values (ints, strings, lists, sets) are equal."""
    if got != want:
        raise Mismatch(f"{what}: got {got!r}, expected {want!r}")
