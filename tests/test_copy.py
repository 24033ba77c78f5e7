"""Every method file can be copied into another project with exactly the files its `Copy:` line names.

The last line of a method file's module docstring is `Copy: <comma-separated repo-relative paths>`, the file
itself included. For each registered method's file, and for every chapters/ file whose docstring has a Copy
line, this test copies exactly those files into a fresh folder (keeping their relative paths; namespace
packages need no __init__.py), adds minimal/gpt.py as `usermodel.py` (the user's own model), and in a
subprocess that sees only that folder and site-packages:

- imports the module by its dotted name;
- for each method registered from it, builds a tiny GPT from `usermodel` (from `minimal.gpt` when the file
  lists minimal/gpt.py: its isinstance checks need that class), applies the method with the registry's
  keywords, and runs a forward pass (plus hooks.extra_loss) and a backward pass (no optimizer: building one
  imports torch._dynamo, seconds per subprocess);
- for a method file, fails if it imports tiktoken, regex, tqdm, safetensors, minimal.train / data / evaluate /
  tokenizer or chapters.registry (they are set to None in sys.modules before torch is imported, so importing
  one raises ImportError; torch.hub's optional tqdm falls back without it);
- fails if any module is imported from the repository itself.
Other files with a Copy line (applications such as tabllm, helpers such as interop) may need the training
loop, the tokenizer or safetensors: for them the test checks only that they stand alone with their list.

The subprocess runs `python -I -S`: -I ignores PYTHONPATH and the current folder, and -S skips the .pth files
of site-packages, among them the editable install's finder that maps `minimal` and `chapters` to this
repository; the script puts the folder and site-packages on sys.path itself.

Methods that read data (needs_task) get random token batches in the form their `data` argument takes (DATA).
"""

from __future__ import annotations

import ast
import functools
import inspect
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from chapters.registry import METHODS

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("tiktoken", "regex", "tqdm", "safetensors", "minimal.train", "minimal.data", "minimal.evaluate",
             "minimal.tokenizer", "chapters.registry")
# what `data` a needs_task method gets here: one (idx, labels) batch, a list of batches, or a sampler gen -> batch
DATA = {"fish-mask": "batch", "child-tuning-d": "batches", "sam": "batches", "lt-sft": "sampler", "fish-dip": "batch"}
FAST = {"n_samples": 8, "max_batches": 2, "n_batches": 2, "full_steps": 2}  # cheaper data settings, not counted
CONFIG = dict(vocab_size=2048, block_size=64, n_layer=2, n_head=2, n_embd=32)


def module_path(module: str) -> str:
    return module.replace(".", "/") + ".py"


def dotted(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def imports(path: Path) -> set[str]:
    """Every module a file imports at run time, at the top or inside a function (`from a.b import c` gives a.b
    and a.b.c); imports under `if TYPE_CHECKING:` (type hints only) do not count."""
    names, todo = set(), [ast.parse(path.read_text(encoding="utf-8"))]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        todo.extend(ast.iter_child_nodes(node))
    return names


def copy_lines(path: Path) -> list[str]:
    """The docstring lines that start with `Copy:`."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return [line for line in doc.splitlines() if line.startswith("Copy:")]


def registered() -> dict[str, list]:
    """file -> [(method name, apply function name, keywords)] for every registered method."""
    files: dict[str, list] = {}
    for name, method in sorted(METHODS.items()):
        fn = method.apply
        func, keywords = (fn.func, dict(fn.keywords)) if isinstance(fn, functools.partial) else (fn, {})
        files.setdefault(module_path(func.__module__), []).append((name, func, keywords))
    return files


REGISTERED = registered()
WITH_COPY = {p.relative_to(ROOT).as_posix() for p in (ROOT / "chapters").rglob("*.py") if copy_lines(p)}
FILES = sorted(set(REGISTERED) | WITH_COPY)

SCRIPT = r"""
import ast, importlib, sys
from pathlib import Path

spec = ast.literal_eval(sys.argv[1])
sys.path.insert(0, spec["folder"])
sys.path.append(spec["site"])
for name in spec["forbidden"]:
    sys.modules[name] = None  # `import name` now raises ImportError; importlib.util.find_spec says None
import torch  # noqa: E402  (torch.hub's optional tqdm falls back to its own progress bar)

module = importlib.import_module(spec["module"])
gpt = importlib.import_module("minimal.gpt" if spec["own_gpt"] else "usermodel")
V = spec["config"]["vocab_size"]


def batch(gen):
    idx = torch.randint(0, V, (4, 16), generator=gen)
    return idx, idx.clone()


for m in spec["methods"]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(**spec["config"]))
    data = {"batch": lambda: batch(gen), "batches": lambda: [batch(gen), batch(gen)],
            "sampler": lambda: batch}.get(m["data"])
    args = (data(),) if data else ()
    hooks = getattr(module, m["func"])(model, *args, **m["keywords"])
    model.train()
    idx, labels = batch(gen)
    loss = model(idx, labels=labels).loss
    extra = hooks.extra_loss(model)
    loss = loss if extra is None else loss + extra
    assert torch.isfinite(loss), (m["name"], loss)
    if any(p.requires_grad for p in model.parameters()):
        loss.backward()
    print("ran", m["name"], flush=True)

folder = Path(spec["folder"]).resolve()
root = Path(spec["root"]).resolve()
outside = [Path(p).resolve() for p in (sys.prefix, sys.base_prefix, spec["site"])]  # the venv may be in root
loaded, repo = [], []
for name, mod in list(sys.modules.items()):
    f = getattr(mod, "__file__", None)
    if not f:
        continue
    f = Path(f).resolve()
    if f.is_relative_to(folder):
        loaded.append(f.relative_to(folder).as_posix())
    elif f.is_relative_to(root) and not any(f.is_relative_to(o) for o in outside):
        repo.append(name)
forbidden = [n for n, mod in sys.modules.items() if mod is not None
             and any(n == f or n.startswith(f + ".") for f in spec["forbidden"])]
print("RESULT", repr({"forbidden": forbidden, "repo": repo, "loaded": sorted(loaded),
                      "path": sys.path}))
"""


def method_spec(name: str, func, keywords: dict) -> dict:
    method = METHODS[name]
    if method.needs_task:
        assert name in DATA, f"{name} reads data: say in DATA which form of `data` it takes"
        params = inspect.signature(method.apply).parameters
        keywords = {**keywords, **{k: v for k, v in FAST.items() if k in params}}
    assert ast.literal_eval(repr(keywords)) == keywords, f"{name}: registry keywords must be Python literals"
    return {"name": name, "func": func.__name__, "keywords": keywords, "data": DATA.get(name) if method.needs_task
            else None}


def test_every_registered_method_is_an_apply_function_of_a_method_file():
    for file, methods in REGISTERED.items():
        for name, func, _ in methods:
            assert file.startswith("chapters/") and file != "chapters/registry.py", f"{name}: defined in {file}"
            assert func.__name__.startswith("apply_"), f"{name}: registered {func.__name__}, not apply_*"


def prepare(file: str, folder: Path) -> tuple[list[str], dict]:
    """Check the Copy line, copy its files (and usermodel.py) into `folder`; return (the list, the run's spec)."""
    lines = copy_lines(ROOT / file)
    assert lines, f"{file} is a method file without a `Copy:` line at the end of its docstring"
    doc = ast.get_docstring(ast.parse((ROOT / file).read_text(encoding="utf-8")))
    last = len(lines) == 1 and doc.rstrip().splitlines()[-1] == lines[0]
    assert last, "the Copy line must be the docstring's last line, on one line (`# noqa: E501` after the quotes)"
    copy = [p.strip() for p in lines[0].removeprefix("Copy:").split(",") if p.strip()]
    assert file in copy, f"the Copy line must list the file itself ({file})"
    missing = [p for p in copy if not (ROOT / p).is_file()]
    assert not missing, f"listed but not in the repository: {missing}"
    heavy = [p for p in copy if dotted(p) in FORBIDDEN]
    assert not (heavy and file in REGISTERED), f"a method file may not need {heavy} (tiktoken/regex/tqdm, registry)"
    for p in copy:
        (folder / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / p, folder / p)
    shutil.copyfile(ROOT / "minimal" / "gpt.py", folder / "usermodel.py")
    methods = [method_spec(name, func, kw) for name, func, kw in REGISTERED.get(file, [])]
    return copy, {"folder": str(folder), "site": sysconfig.get_paths()["purelib"], "root": str(ROOT),
                  "module": dotted(file), "own_gpt": "minimal/gpt.py" in copy, "config": CONFIG,
                  "forbidden": FORBIDDEN if file in REGISTERED else (), "methods": methods}


def run_copied(spec: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-I", "-S", "-c", SCRIPT, repr(spec)], cwd=spec["folder"], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every file's subprocess, started at once on a pool as wide as the machine (each test waits for its own)."""
    out = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for i, file in enumerate(FILES):
            try:
                copy, spec = prepare(file, tmp_path_factory.mktemp(f"copy{i}"))
                out[file] = (copy, pool.submit(run_copied, spec))
            except AssertionError as e:
                out[file] = e
        yield out
        for entry in out.values():
            if not isinstance(entry, AssertionError):
                entry[1].cancel()


@pytest.mark.parametrize("file", FILES)
def test_copy_line_names_exactly_what_the_file_needs(file, launched):
    if isinstance(launched[file], AssertionError):
        raise launched[file]
    copy, future = launched[file]
    proc = future.result()
    blocked = "(an ImportError 'halted; None in sys.modules' is a forbidden import) " if "halted" in proc.stderr else ""
    assert proc.returncode == 0, f"copied with {copy} {blocked}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    result = ast.literal_eval(proc.stdout.split("RESULT ", 1)[1])
    assert str(ROOT) not in result["path"], result["path"]
    assert not result["forbidden"], f"imported {result['forbidden']}"
    assert not result["repo"], f"imported from the repository itself: {result['repo']}"
    imported = set().union(*(imports(ROOT / p) for p in copy if p.endswith(".py")))
    # minimal/gpt.py may be listed without an import: the method needs GPT's extension points (attn_out, ...)
    optional = {file, "minimal/gpt.py"}
    unneeded = [p for p in copy if p.endswith(".py") and p not in optional and dotted(p) not in imported]
    assert not unneeded, f"listed in Copy but imported by none of the listed files: {unneeded}"
