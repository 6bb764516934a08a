from pathlib import Path

import pytest

from shortened.config import (
    ConfigError,
    PrepareConfig,
    PruneConfig,
    RunConfig,
    TrainConfig,
    config_hash,
    load_config,
    save_config,
    value_sources,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_typed_config(tmp_path):
    path = write(tmp_path, "run_dir: out\ntrain:\n  max_tokens: 37e9\n  micro_batch_size: 2\noptim:\n  lr: 1e-4\n")
    config = load_config(RunConfig, path, ["train.max_steps=7", "optim.betas=[0.9, 0.95]", "resume=never"])
    assert config.train.max_tokens == 37_000_000_000 and isinstance(config.train.max_tokens, int)
    assert config.optim.lr == 1e-4
    assert config.optim.betas == (0.9, 0.95)
    assert config.train.max_steps == 7
    assert config.resume == "never"


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  max_tokens: 10\n  micro_bach_size: 2\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key 'train\.micro_bach_size'"):
        load_config(RunConfig, path)


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  max_tokens: 10\n  micro_batch_size: two\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*train\.micro_batch_size: expected an integer"):
        load_config(RunConfig, path)


def test_unknown_override_is_an_error(tmp_path):
    path = write(tmp_path, "train:\n  max_tokens: 10\n")
    with pytest.raises(ConfigError, match=r"overrides optim\.learning_rate=3.*unknown key 'optim\.learning_rate'"):
        load_config(RunConfig, path, ["optim.learning_rate=3"])


def test_post_init_validation_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  max_tokens: 10\n  global_batch_size: 7\n  micro_batch_size: 2\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*train\.global_batch_size: 7 is not a multiple"):
        load_config(RunConfig, path)


def test_literal_rejects_other_values(tmp_path):
    path = write(tmp_path, "train:\n  max_tokens: 10\noptim:\n  schedule: linear\n")
    with pytest.raises(ConfigError, match=r"optim\.schedule: 'linear' is not one of"):
        load_config(RunConfig, path)


def test_grad_accum_keeps_global_batch_on_any_dividing_world_size():
    train = TrainConfig(global_batch_size=512, micro_batch_size=2, max_tokens=1)
    assert [train.grad_accum_steps(w) for w in (1, 2, 8, 16)] == [256, 128, 32, 16]
    with pytest.raises(ConfigError, match="not divisible"):
        train.grad_accum_steps(3)


def test_saved_config_round_trips_with_same_hash(tmp_path):
    config = load_config(RunConfig, None, ["train.max_tokens=100", "eval.tasks=[piqa]"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(RunConfig, tmp_path / "config.yaml")
    assert again == config
    assert config_hash(again) == config_hash(config)


def test_value_sources_cover_whole_sections_and_lists(tmp_path):
    path = write(tmp_path, "train:\n  max_tokens: 10\noptim:\n  betas: [0.8, 0.9]\n")
    sources = value_sources(RunConfig, path, ["eval.tasks=[piqa]", "optim.lr=3e-4"])
    assert sources["train.max_tokens"] == "file" and sources["optim.betas"] == "file"
    assert sources["eval.tasks"] == "override" and sources["optim.lr"] == "override"
    assert sources["train.max_steps"] == "default" and sources["run_dir"] == "default"


def test_prepare_config_lives_with_the_others_and_keeps_its_old_import():
    from shortened.data.prepare import PrepareConfig as reexported

    assert reexported is PrepareConfig
    with pytest.raises(ConfigError, match="--unit-bytes must be 0"):
        PrepareConfig(input="i", tokenizer="t", output="o", unit_bytes=10)


@pytest.mark.parametrize("sizes, message", [
    ({"remove": 0}, r"prune\.remove: --remove 0: must be >= 1"),
    ({"keep_blocks": 0}, r"prune\.keep_blocks: --keep-blocks 0: must be >= 1"),
    ({"ratio": 1.0}, r"prune\.ratio: --ratio 1\.0: must lie strictly between 0 and 1"),
    ({}, "give exactly one of --remove, --ratio, --keep-blocks"),
    ({"remove": 2, "ratio": 0.2}, "give exactly one of --remove, --ratio, --keep-blocks"),
])
def test_prune_sizes_are_checked_once_in_the_config(sizes, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(model="m", out="o", calib="c", **sizes)
