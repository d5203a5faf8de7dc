"""Run configuration: pydantic models, presets, YAML files and ``--set`` overrides.

Overrides are applied to the raw dict before validation, so an error names the key the user typed.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sapt.errors import SaptError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(_Strict):
    epochs: int = Field(3, ge=1, description="Passes over each task's training data.")
    batch_size: int = Field(16, ge=1, description="Micro-batch size per Ray Train worker.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate, constant (as in the SAPT scripts).")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 turns it off.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 needs a GPU to pay off.")
    max_source_len: int = Field(512, ge=8)
    max_target_len: int = Field(50, ge=1)
    prompt_format: Literal["auto", "raw", "chat"] = Field(
        "auto", description="Decoder-only prompts in the tokenizer's chat template (chat), as they are (raw), "
        "or chat when the tokenizer has a template (auto: instruction-tuned models); encoder-decoders: raw.")
    log_every: int = Field(10, ge=1, description="Steps between progress lines.")


class PetConfig(_Strict):
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)


class EvalConfig(_Strict):
    batch_size: int = Field(64, ge=1, description="Generation batch per worker.")
    max_new_tokens: int = Field(50, ge=1, description="Greedy decoding length (SAPT: 50).")
    split: Literal["test", "val"] = Field(
        "test", description="Score the matrix on test, or on the validation items carved from train "
        "(what sweeps optimise: test is never used to choose a config).")


class MlflowConfig(_Strict):
    tracking_uri: str = Field("", description="Empty: $MLFLOW_TRACKING_URI, else a sqlite store under output_dir.")
    experiment: str = "sapt"
    register_pool: bool | None = Field(
        None, description="Register each task's blocks, shared state and finished model (the pool) in the "
        "model registry; null: yes (every method).")
    pool_name: str = Field("", description="The pool's registered-model name; empty: <method>-<order>.")

    @field_validator("pool_name")
    @classmethod
    def _registry_name(cls, value: str) -> str:
        if value and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,180}$", value):
            raise ValueError(f"{value!r} is not a registry name (a letter or digit first, then letters, digits, _ . -)")
        return value


class RayConfig(_Strict):
    address: str = Field("", description="Empty: start an embedded local Ray; else a cluster address.")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    max_failures: int = Field(0, ge=0, description="Worker-group restarts per run (each resumes from the last checkpoint).")
    storage_path: str = Field("", description="Shared storage for Train checkpoints; empty: output_dir/ray.")
    resource_wait_s: float = Field(600.0, gt=0, description="How long a run waits for its workers' CPUs/GPUs "
                                   "(a cluster's nodes starting, say) before it gives up.")


class RunConfig(_Strict):
    method: str = Field("seq-lora", description="A name from sapt.methods.METHODS.")
    method_args: dict[str, Any] = Field(default_factory=dict, description="Validated by the method's Config.")
    data_dir: str = Field("", description="CL_Benchmark root; empty: the embedded benchmark.")
    order: str | list[str] = Field("embedded", description="A named order or a list of task names.")
    backbone: str = Field("embedded:tiny-t5", description="embedded:<name>, a hub name or a local path.")
    max_train_per_task: int | None = Field(None, ge=1)
    max_eval_per_task: int | None = Field(None, ge=1)
    val_size: int = Field(50, ge=0, description="Validation items carved from train per task.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers, each running a DeepSpeed engine.")
    output_dir: str = "runs/demo"
    seed: int = 42
    single_results: str = Field("", description="results.json of a `single` run: enables FWT.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    pet: PetConfig = Field(default_factory=PetConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from sapt.methods import METHODS

        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; known: {', '.join(sorted(METHODS))}")
        return value


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("sapt.presets").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str) -> tuple[dict[str, Any], str]:
    """Reads a preset by name or a YAML file by path; returns (raw dict, where it came from)."""
    path = Path(source)
    if source in preset_names():
        text = resources.files("sapt.presets").joinpath(f"{source}.yaml").read_text()
        where = f"preset {source}"
    elif path.is_file():
        text = path.read_text()
        where = str(path)
    else:
        raise SaptError(
            f"no such config file or preset (presets: {', '.join(preset_names())})", source=source
        )
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise SaptError(f"invalid YAML: {err}", source=where) from None
    if not isinstance(raw, dict):
        raise SaptError("the top level must be a mapping of config keys", source=where)
    return raw, where


def set_dotted(raw: dict[str, Any], key: str, value: Any, *, where: str | None = None) -> None:
    """Sets a dotted key (``train.lr``) in a raw config dict in place, creating mappings on the way.

    Raises:
        SaptError: a part of the key names something that is not a mapping.
    """
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SaptError(f"{part!r} is not a mapping", source=where or key)
        node = child
    node[parts[-1]] = value


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Applies one ``KEY=VALUE`` (dotted key, YAML value) to the raw config dict in place."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise SaptError("expected KEY=VALUE", source=f"--set {assignment}")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as err:
        raise SaptError(f"value is not valid YAML: {err}", source=f"--set {key}") from None
    set_dotted(raw, key, parsed, where=f"--set {key}")


def validate(raw: dict[str, Any], where: str = "config") -> RunConfig:
    """Validates a raw dict, turning the first pydantic error into a SaptError naming the key.

    ``method_args`` is checked against the method's own Config here, once, and comes back with
    every value, defaults included (what the run logs and the registry stores).
    """
    from sapt.methods import validate_method_args

    try:
        run = RunConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown config key"
        raise SaptError(message, source=where, field=key) from None
    try:
        args = validate_method_args(run.method, run.method_args)
    except SaptError as err:
        raise SaptError(err.message, source=where, field=err.field) from None
    return run.model_copy(update={"method_args": args})


def load_config(source: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Loads a preset name or YAML path, applies ``--set`` overrides, validates.

    Raises:
        SaptError: unknown file or preset, bad YAML, unknown key or bad value.
    """
    raw, where = _read_yaml(source)
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate(raw, where)
