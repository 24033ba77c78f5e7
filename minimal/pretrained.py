"""The shipped base models: `base` (about 1M parameters, used by every notebook) and `small` (same
vocabulary, for proxy-tuning). Each lives in data/ as NAME.safetensors + NAME.json (config and training
record). They are built by `python -m minimal.pretrain`; loading never trains or downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from minimal.data import check_corpus_hash
from minimal.gpt import GPT, GPTConfig

DATA = Path(__file__).resolve().parent.parent / "data"
MODELS = ("base", "small")


def record(name: str = "base", data_dir: Path = DATA) -> dict:
    """The json beside the checkpoint: {"config": ..., "training": {steps, tokens, seconds, losses...}}."""
    if name not in MODELS:
        raise ValueError(f"unknown base model {name!r}; choose one of {MODELS}")
    path = Path(data_dir) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python -m minimal.pretrain --model {name}`")
    return json.loads(path.read_text(encoding="utf-8"))


def load_base(name: str = "base", data_dir: Path = DATA) -> GPT:
    """The pretrained model in eval mode, with every parameter trainable (methods freeze what they need)."""
    rec = record(name, data_dir)
    model = GPT(GPTConfig(**rec["config"]))
    model.load_state_dict(load_file(str(Path(data_dir) / f"{name}.safetensors")))
    check_corpus_hash(rec["training"].get("corpus_sha256"))
    return model.eval()
