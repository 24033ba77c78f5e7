"""For the low-rank method tests: a refused apply raises and leaves the model exactly as it was (atomic apply)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch.nn as nn

from tests.helpers import assert_model_unchanged, model_snapshot


def assert_refuses(model: nn.Module, apply: Callable[[nn.Module], object], match: str,
                   error: type[Exception] = ValueError) -> None:
    """apply(model) raises `error` matching `match`; modules, flags, hooks, attributes and values are unchanged."""
    before = model_snapshot(model)
    with pytest.raises(error, match=match):
        apply(model)
    assert_model_unchanged(model, before)
