"""The embedded tiny backbones' warmed-up weights ship with the package: no warm-up on a fresh machine."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sapt.backbones import shipped
from sapt.backbones.tiny import TINY_SPECS, _settings, build_model, load_tiny


@pytest.mark.parametrize("name", sorted(TINY_SPECS))
def test_the_shipped_weights_fit_the_current_spec_and_rebuild_here(name):
    # Fails when a spec, the warm-up version or the benchmark's words change without regenerating
    # them (python -m sapt.backbones.shipped): every fresh machine would warm up again.
    spec = TINY_SPECS[name]
    model = shipped.load_shipped(name, _settings(spec), lambda: build_model(spec))
    assert model is not None
    fresh = build_model(spec)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert len(changed) > 10  # warmed-up weights, not the initial ones


def test_load_tiny_neither_warms_up_nor_writes_a_cache_entry(tmp_path):
    backbone = load_tiny("tiny-t5", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert shipped.state_digest(backbone.model) == json.loads((shipped.SHIPPED_DIR / "tiny-t5.json").read_text())["digest"]


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    folder = shutil.copytree(shipped.SHIPPED_DIR, tmp_path / "shipped")
    monkeypatch.setattr(shipped, "SHIPPED_DIR", folder)
    return folder


def test_a_changed_tensor_is_refused_by_its_digest(shipped_copy):
    path = shipped_copy / "tiny-t5.safetensors"
    tensors = load_file(str(path))
    key = min(tensors)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1e-3
    save_file(tensors, str(path))
    spec = TINY_SPECS["tiny-t5"]
    assert shipped.load_shipped("tiny-t5", _settings(spec), lambda: build_model(spec)) is None


def test_other_settings_do_not_use_them(shipped_copy):
    spec = TINY_SPECS["tiny-t5"]
    assert shipped.load_shipped("tiny-t5", {**_settings(spec), "warmup_version": 99}, lambda: build_model(spec)) is None
    # The torch version alone does not decide: the digest check does.
    assert shipped.load_shipped("tiny-t5", {**_settings(spec), "torch": "9.9.9"}, lambda: build_model(spec)) is not None
