"""import_peft reads and checks adapter_config.json before it touches the model: each bad field is named."""

from __future__ import annotations

import json

import pytest
import torch

from chapters.ch4_low_rank.lora import apply_lora
from chapters.ch5_applications.interop import PEFT_CONFIG, export_peft, import_peft
from minimal.peft import mergeable_modules
from tests.helpers import tiny_gpt


@pytest.fixture
def lora_dir(tmp_path):
    model = tiny_gpt()
    apply_lora(model, r=4, alpha=8, targets=["c_attn"])
    return export_peft(model, tmp_path / "adapter")


def edit(directory, drop: tuple[str, ...] = (), **changes) -> None:
    path = directory / PEFT_CONFIG
    config = {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k not in drop}
    path.write_text(json.dumps({**config, **changes}), encoding="utf-8")


@pytest.mark.parametrize("drop, changes, error, message", [
    (("r",), {}, ValueError, "field 'r' is missing"),
    ((), {"r": "8"}, TypeError, r"field 'r' must be a json number \(int\), got '8' \(str\)"),
    ((), {"r": 0}, ValueError, "field 'r' must be > 0"),
    ((), {"lora_alpha": None}, TypeError, "field 'lora_alpha' must be a json number"),
    ((), {"target_modules": 3}, TypeError, "field 'target_modules' must be a str"),
])
def test_bad_config_fields_are_named_and_the_model_stays_plain(lora_dir, drop, changes, error, message) -> None:
    edit(lora_dir, drop, **changes)
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message) as err:
        import_peft(model, lora_dir)
    assert PEFT_CONFIG in str(err.value)
    assert not mergeable_modules(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_corrupt_config_is_a_value_error(lora_dir) -> None:
    (lora_dir / PEFT_CONFIG).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid json"):
        import_peft(tiny_gpt(), lora_dir)
