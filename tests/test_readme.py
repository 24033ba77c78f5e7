"""The README is true about what exists: every file, `make` target and `python -m` command it names, and
its own-text recipe runs as written."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
# names the README gives to files that commands write (outputs, not shipped files)
WRITTEN_BY_COMMANDS = {
    "adapter_config.json", "adapter_model.safetensors",  # the peft format, written by export_peft
    "results/kernels/lora_kernels.json",  # written by the GPU benchmark; the README says none is committed yet
    "runs/leaderboard/", "runs/pretrain/",  # outputs of partial leaderboard runs and of pretraining
}
PATH = re.compile(r"[\w./-]+\.(py|md|json|png|ipynb|txt|yml|toml|safetensors|tiktoken|cu|cfg|sh)|[\w.-]+/([\w.-]+/)*")


def named_paths() -> list[str]:
    return sorted({t for t in re.findall(r"`([^`\n]+)`", README) if PATH.fullmatch(t)} - WRITTEN_BY_COMMANDS)


def test_every_file_the_readme_names_exists() -> None:
    paths = named_paths()
    assert len(paths) > 50  # the chapter map, the method files, the notebooks, results/ ...
    # a bare file name (`lora.py` in a chapter's paragraph) must exist in minimal/ or in a chapter folder
    missing = [p for p in paths if not (ROOT / p).exists() and not (ROOT / "minimal" / p).exists()
               and not any((ROOT / "chapters").glob(f"**/{p}"))]
    assert missing == []


def test_every_make_target_the_readme_names_exists() -> None:
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))
    named = set(re.findall(r"\bmake ([a-z][a-z-]*)", README))
    assert {"run", "test", "pretrain"} <= named
    assert named - targets == set()


def test_every_python_m_command_the_readme_names_exists() -> None:
    modules = set(re.findall(r"python -m ([\w.]+)", README)) - {"pytest"}
    assert "chapters.leaderboard" in modules and "minimal.pretrain" in modules
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        assert 'if __name__ == "__main__":' in Path(spec.origin).read_text(encoding="utf-8"), name


def test_readme_states_no_longer_false_claims() -> None:
    assert "not written yet" not in README
    requirements = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    for section in re.findall(r'README "([^"]+)"', requirements):
        assert re.search(rf"^#+ {re.escape(section)}$", README, re.M), section
    oracles = {p.stem.removeprefix("test_peft_") for p in (ROOT / "tests" / "oracle").glob("test_peft_*.py")}
    tests_section = README.split("## Tests", 1)[1]
    names = {"lora": "LoRA", "dora": "DoRA", "pissa": "PiSSA", "adalora": "AdaLoRA", "ia3": "IA3",
             "prompt_tuning": "prompt tuning", "prefix_tuning": "prefix"}
    assert {names[o] for o in oracles if o in names and names[o] not in tests_section} == set()
    assert "TORCH_INDEX=<url>" in README and 'VENV="$CONDA_PREFIX"' in README


def test_own_text_recipe_runs_as_written(capsys) -> None:
    block = README.split("<!-- own-text recipe", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = "\n".join(line.removeprefix("  ") for line in block.splitlines())
    namespace: dict = {}
    exec(compile(code, "README.md (own-text recipe)", "exec"), namespace)  # noqa: S102 (our own README)
    corpus = namespace["corpus"]
    from minimal.data import get_tokenizer

    enc = get_tokenizer()
    assert corpus.tokens("train").tolist() == enc.encode("<|endoftext|>".join(namespace["documents"][:240]),
                                                         allowed_special={"<|endoftext|>"})
    out = capsys.readouterr().out
    before, after = (float(x) for x in re.findall(r"([\d.]+)", out.split("perplexity", 1)[1])[:2])
    assert after < before  # it learned the user's text
    assert isinstance(namespace["model"].wte.weight, torch.nn.Parameter)


@pytest.mark.parametrize("name", ["docs", "code"])
def test_own_corpus_named_like_a_shipped_one_still_reads_its_own_documents(name) -> None:
    from minimal.data import LMCorpus, get_tokenizer

    corpus = LMCorpus(name, {"train": ["just these few words"]})
    assert corpus.tokens("train").tolist() == get_tokenizer().encode("just these few words")
