from importlib import resources

import pytest

from sapt.config import load_config, preset_names
from sapt.errors import SaptError


def test_every_shipped_preset_validates():
    names = preset_names()
    assert "demo" in names
    shipped = [p.name for p in resources.files("sapt.presets").iterdir() if p.name.endswith(".yaml")]
    assert len(names) == len(shipped)
    for name in names:
        assert load_config(name).method


def test_set_values_are_parsed_as_yaml():
    run = load_config("demo", ["order=[sst2,agnews,rte]", "train.lr=3e-4", "num_workers=3", "data_dir=/x"])
    assert run.order == ["sst2", "agnews", "rte"]
    assert run.train.lr == pytest.approx(3e-4)
    assert run.num_workers == 3
    assert run.data_dir == "/x"


def test_yaml_file_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: single\norder: [a, b]\ntrain: {epochs: 2}\n")
    run = load_config(str(path))
    assert (run.method, run.order, run.train.epochs) == ("single", ["a", "b"], 2)


@pytest.mark.parametrize(
    "override, key",
    [
        ("colour=red", "colour"),
        ("train.epochz=3", "train.epochz"),
        ("num_workers=0", "num_workers"),
        ("train.zero_stage=5", "train.zero_stage"),
        ("method=ewc-magic", "method"),
        ("max_train_per_task=lots", "max_train_per_task"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(SaptError) as caught:
        load_config("demo", [override])
    assert caught.value.field == key
    assert key in str(caught.value)


def test_missing_config_file_is_named():
    with pytest.raises(SaptError, match="no-such.yaml"):
        load_config("no-such.yaml")


def test_malformed_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: [unclosed\n")
    with pytest.raises(SaptError, match="bad.yaml"):
        load_config(str(path))
