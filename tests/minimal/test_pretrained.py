"""The shipped checkpoints load and reproduce their recorded validation loss on the fixed slice."""

import pytest
import torch

from minimal.data import check_corpus_hash, get_corpus
from minimal.pretrain import CONFIGS, validation_loss
from minimal.pretrained import MODELS, load_base, record


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_reproduces_recorded_validation_loss(name):
    model = load_base(name)
    rec = record(name)
    assert rec["config"] == CONFIGS[name].__dict__
    assert sum(p.numel() for p in model.parameters()) == rec["training"]["n_params"]
    assert validation_loss(model) == pytest.approx(rec["training"]["val_loss"], abs=1e-3)


def test_base_is_better_than_small_and_than_chance():
    base, small = (record(n)["training"]["val_loss"] for n in MODELS)
    assert base < small < torch.log(torch.tensor(2048.0)).item()


def test_models_share_the_vocabulary():
    assert CONFIGS["base"].vocab_size == CONFIGS["small"].vocab_size


def test_corpus_hash_mismatch_warns_instead_of_failing():
    assert check_corpus_hash(get_corpus("docs").sha256())
    with pytest.warns(UserWarning, match="numbers may move slightly"):
        assert not check_corpus_hash("0" * 64)


def test_unknown_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown base model"):
        record("huge")
    with pytest.raises(FileNotFoundError, match="minimal.pretrain"):
        load_base("base", data_dir=tmp_path)
