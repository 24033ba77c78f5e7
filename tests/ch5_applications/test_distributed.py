"""DDP LoRA fine-tuning: two gloo processes on localhost (torchrun) against one process on the joint batch."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chapters.ch5_applications.distributed import build_model, main, make_get_batch, parse_args, train_config
from minimal.peft import adapter_state_dict, load_adapter
from minimal.train import train

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--tiny", "--steps", "4", "--batch-size", "3", "--lr", "1e-2", "--warmup", "1", "--lora-r", "4",
         "--targets", "c_attn,mlp.c_fc", "--seed", "3", "--device", "cpu", "--log-every", "1"]


def single_process(shards: list[int]) -> dict[str, torch.Tensor]:
    """Train in this process on the concatenation of the given ranks' batches; return the LoRA tensors."""
    args = parse_args(FLAGS)
    model = build_model(args)
    rank_batch = make_get_batch(args, model.config.block_size)
    gens = [torch.Generator().manual_seed(args.seed + r) for r in shards]  # what rank r draws from

    def joint_batch(_gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [rank_batch(g) for g in gens]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])  # [N b, T] each

    train(model, joint_batch, dataclasses.replace(train_config(args, 0), log_every=0, progress=False))
    return adapter_state_dict(model)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "chapters.ch5_applications.distributed", *FLAGS, "--out", str(out), "--dump-rank-weights"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow  # starts torchrun and two Python processes
def test_both_ranks_end_bit_identical_and_moved(ddp_run) -> None:
    out, stdout = ddp_run
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert sorted(r0) == sorted(r1) == sorted(f"h.{i}.{m}.{p}" for i in range(2)
                                              for m in ("attn.c_attn", "mlp.c_fc") for p in "AB")
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    init = adapter_state_dict(build_model(parse_args(FLAGS)))
    assert all((r0[n] - init[n]).abs().max() > 1e-4 for n in r0)  # A and B both trained
    assert "world size 2 on cpu" in stdout and "mean over 2 ranks" in stdout


@pytest.mark.slow  # starts torchrun and two Python processes
def test_ddp_equals_one_process_on_the_concatenated_batch(ddp_run) -> None:
    out, _ = ddp_run
    ranks = load_file(str(out / "rank0.safetensors"))
    joint = single_process([0, 1])
    for name, value in ranks.items():
        torch.testing.assert_close(value, joint[name], rtol=0, atol=2e-5)
    # the comparison can fail: rank 0's shard alone (half the batch) trains to other weights
    alone = single_process([0])
    assert max((ranks[n] - alone[n]).abs().max().item() for n in ranks) > 1e-3


@pytest.mark.slow  # starts torchrun and two Python processes
def test_rank0_saves_the_adapter_with_save_adapter(ddp_run) -> None:
    out, _ = ddp_run
    model = build_model(parse_args(FLAGS))
    config = load_adapter(model, out)
    assert config["world_size"] == 2 and config["r"] == 4 and len(config["losses"]) == 4
    rank0 = load_file(str(out / "rank0.safetensors"))
    for name, value in adapter_state_dict(model).items():
        assert torch.equal(value, rank0[name])


def test_single_process_without_torchrun(tmp_path, monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    result = main(["--tiny", "--steps", "3", "--device", "cpu", "--out", str(tmp_path), "--log-every", "0"])
    assert len(result.history) == 3 and (tmp_path / "adapter.safetensors").is_file()


def test_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--dump-rank-weights"])  # needs --out
    with pytest.raises(ValueError, match="unknown target module"):
        build_model(parse_args(["--tiny", "--targets", "q_proj"]))
