"""The training config: one schema, unknown keys refused with the closest name, values checked."""
import json

import pytest

from fastclip.train import ConfigError, TrainConfig
from fastclip.train.config import OptimConfig


def _ok(**extra):
    d = {"data": {"train": "x.tar"}, "budget": {"steps": 10}}
    for k, v in extra.items():
        d.setdefault(k, {}).update(v)
    return d


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = TrainConfig.from_dict(_ok(optim={"lr": 1e-3}), ["model.overrides.vision_layers=3", "strategy.name=flip"])
    path = tmp_path / "run.yaml"
    cfg.save(str(path))
    again = TrainConfig.from_file(str(path))
    assert again == cfg
    assert again.optim.lr == 1e-3 and again.model.overrides == {"vision_layers": 3}
    assert "optim:" in cfg.to_yaml() and "lr: 0.001" in cfg.to_yaml()


def test_json_file_and_overrides(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_ok()))
    cfg = TrainConfig.from_file(str(path), ["optim.lr=2e-3", "budget.gflops=5e6", "log.progress=false"])
    assert cfg.optim.lr == 2e-3 and cfg.budget.gflops == 5e6 and cfg.log.progress is False
    assert isinstance(cfg.budget.gflops, float)


@pytest.mark.parametrize("key,hint", [("optim.lrr", "optim.lr"), ("budget.gflop", "budget.gflops"),
                                      ("strategy.mask_raito", "strategy.mask_ratio"), ("optimm.lr", "optim.lr")])
def test_unknown_keys_name_the_closest(key, hint):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'; did you mean '{hint}'"):
        TrainConfig.from_dict(_ok(), [f"{key}=1"])


def test_unknown_keys_in_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'data.batch_size'"):
        TrainConfig.from_dict({"data": {"batchsize": 3}})
    with pytest.raises(ConfigError, match="unknown config key 'trainer'"):
        TrainConfig.from_dict({"trainer": {}})


@pytest.mark.parametrize("override,match", [
    ("optim.lr=abc", "optim.lr must be a number"),
    ("data.batch_size=1.5", "data.batch_size must be an integer"),
    ("log.progress=maybe", "log.progress must be true or false"),
    ("optim", "must be key=value"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(_ok(), [override])


@pytest.mark.parametrize("section,values,match", [
    ("data", {"train": ""}, "data.train must name"),
    ("budget", {"steps": None}, "set at least one of budget"),
    ("budget", {"gflops": -1.0}, "budget.gflops must be a positive number"),
    ("data", {"batch_size": 10, "accum_steps": 3}, "must divide evenly"),
    ("optim", {"schedule": "linear"}, "optim.schedule must be"),
    ("optim", {"precision": "fp8"}, "optim.precision must be"),
    ("strategy", {"loss": "triplet"}, "strategy.loss must be clip or siglip"),
    ("strategy", {"unmasked_fraction": 1.0}, "strategy.unmasked_fraction"),
])
def test_validate_names_the_key(section, values, match):
    cfg = TrainConfig.from_dict(_ok(**{section: values}))
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_batch_must_divide_across_ranks():
    cfg = TrainConfig.from_dict(_ok(data={"batch_size": 6}))
    cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match="world_size=4"):
        cfg.validate(world_size=4)


def test_every_default_is_printed():
    text = TrainConfig().to_yaml()
    for f in OptimConfig.__dataclass_fields__:
        assert f"  {f}:" in text


def test_log_mfu_flag():
    cfg = TrainConfig.from_dict(_ok())
    assert cfg.log.mfu is True and "  mfu: true" in cfg.to_yaml()
    assert TrainConfig.from_dict(_ok(), ["log.mfu=false"]).log.mfu is False
    with pytest.raises(ConfigError, match="log.mfu must be true or false"):
        TrainConfig.from_dict(_ok(), ["log.mfu=sometimes"])
    with pytest.raises(ConfigError, match="did you mean 'log.mfu'"):
        TrainConfig.from_dict(_ok(), ["log.mfuu=false"])
