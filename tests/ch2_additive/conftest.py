"""A fixture shared by the chapter 2 method tests: a refused apply leaves the model exactly as it was."""

from collections.abc import Callable

import pytest
import torch.nn as nn

from tests.helpers import assert_model_unchanged, model_snapshot


@pytest.fixture
def refuses() -> Callable[..., None]:
    """refuses(model, apply, match): apply(model) raises (ValueError by default) and changes nothing."""

    def check(model: nn.Module, apply: Callable[[nn.Module], object], match: str,
              error: type[Exception] = ValueError) -> None:
        before = model_snapshot(model)
        with pytest.raises(error, match=match):
            apply(model)
        assert_model_unchanged(model, before)

    return check
