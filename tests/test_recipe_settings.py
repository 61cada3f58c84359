"""Config checks the recipe runs before it loads anything."""

import pytest
from omegaconf import OmegaConf

from mol_tune.recipes.mol_finetune import check_loop_settings, find_earlier_checkpoints

VALID = {
    "max_steps": 10,
    "gradient_accumulation_steps": 1,
    "log_every_n_steps": 1,
    "eval_every_n_steps": 0,
    "save_every_n_steps": 5,
    "data": {"seq_len": 128},
    "model": {"max_seq_len": 256},
}


def settings(**changes):
    config = OmegaConf.create(VALID)
    for key, value in changes.items():
        OmegaConf.update(config, key, value)
    return config


def test_valid_settings_pass():
    check_loop_settings(settings())


@pytest.mark.parametrize(
    "key, value",
    [("gradient_accumulation_steps", 0), ("max_steps", -1), ("log_every_n_steps", 0), ("save_every_n_steps", 1.5)],
)
def test_invalid_loop_setting_names_key(key, value):
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        check_loop_settings(settings(**{key: value}))


def test_seq_len_longer_than_model():
    with pytest.raises(ValueError, match="data.seq_len: 512 is longer than model.max_seq_len"):
        check_loop_settings(settings(**{"data.seq_len": 512}))


def test_earlier_checkpoints_found(tmp_path):
    (tmp_path / "step_3").mkdir()
    (tmp_path / "step_3" / "mol_config.json").write_text("{}")
    (tmp_path / "step_7").mkdir()
    assert find_earlier_checkpoints(tmp_path) == [tmp_path / "step_3"]
