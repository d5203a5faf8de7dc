"""The pyfunc model of a registered pool, block or state version ("models from code": MLflow stores
this file with each version and runs it at load time; it ends with ``set_model``).

    pool    greedy answers of the method's finished model (every block so far and its shared
            state), exactly as the run's evaluation decodes them, plus the block weights of each
            input for methods that route (empty for the others)
    block   one task block alone on the bare backbone (a LoRA block: the plain PEFT adapter)
    state   the shared state alone, for methods whose state routes inputs (SAPT's router):
            only the block weights of each input

Input: a DataFrame with a column ``input``, the raw prompts as the run builds them (template
applied). No task id anywhere. The installed ``sapt`` package rebuilds the model: the method named
in version.json, with its recorded ``method_args`` and ``pet``. The backbone is loaded by spec,
never stored in the version, and must have the identity recorded at registration. Only
safetensors and JSON are read (verified against the sha256 list in version.json first).

Load-time overrides (``mlflow.pyfunc.load_model(uri, model_config={...})``): ``device``,
``cache_dir`` (embedded backbones' warm-up cache), ``data_dir`` (embedded:minilm-t5's corpus).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import torch

from sapt.errors import SaptError


def _remap(err: SaptError, rebuilt: Path, artifacts: dict[str, Path]) -> SaptError:
    """The same error, naming the registered artifact instead of the temporary rebuilt state folder."""
    source = err.source or ""
    if source.startswith(str(rebuilt)):
        source = str(artifacts["meta"].parent) + source[len(str(rebuilt)):]
    return SaptError(f"registered pool does not load: {err.message}", source=source, field=err.field)


class SaptPoolModel(mlflow.pyfunc.PythonModel):
    """A registered pool, block or state version, servable with ``mlflow.pyfunc.load_model``."""

    def load_context(self, context) -> None:
        """Verifies the artifacts, loads and checks the backbone, and rebuilds the exact inference model.

        Raises:
            SaptError: artifacts that are not safetensors/JSON or differ from those registered, a
                backbone whose identity differs, or blocks that do not fit it.
        """
        from sapt.backbones import load_backbone
        from sapt.data.collate import Collator
        from sapt.registry import pool_store

        artifacts = {key: Path(path) for key, path in context.artifacts.items()}
        meta = pool_store.verify_artifacts(artifacts)  # before anything else reads them
        overrides = dict(context.model_config or {})
        spec = meta["backbone"]
        args = dict(spec.get("args", {}))
        if "data_dir" in overrides:
            args["data_dir"] = overrides["data_dir"]
        backbone = load_backbone(spec["spec"], cache_dir=overrides.get("cache_dir"), **args)
        if backbone.identity != spec["identity"]:
            raise SaptError(f"backbone {spec['spec']!r} loaded as {backbone.identity!r}, but this version was "
                            f"trained on {spec['identity']!r}: its blocks would not fit those weights",
                            source=str(artifacts["meta"]), field="backbone.identity")
        self.kind = meta["kind"]
        self.meta = meta
        self.device = torch.device(overrides.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        from sapt.config import PetConfig
        from sapt.methods import build_method

        self.method = build_method(meta["method"], meta["method_args"], PetConfig(**meta["pet"]))
        if self.kind == "pool":
            model = self._pool(backbone, artifacts, meta)
        elif self.kind == "block":
            model = self.method.load_block(backbone, artifacts["block"])
        else:
            model = self.method.load_shared(backbone, artifacts["state"], meta["blocks"])
        self.model = model.to(self.device).eval()
        generation = meta["generation"]
        # Versions registered before prompt_format existed were all trained on raw prompts.
        self.collator = Collator.for_backbone(backbone, generation["max_source_len"], generation["max_target_len"],
                                              generation.get("prompt_format", "raw"))

    def _pool(self, backbone, artifacts: dict[str, Path], meta: dict):
        from sapt.registry.pool_store import rebuild_state

        with tempfile.TemporaryDirectory(prefix="sapt-pool-") as tmp:
            state = rebuild_state(artifacts, meta, Path(tmp))
            try:
                return self.method.load_finished(backbone, state)
            except SaptError as err:
                raise _remap(err, state, artifacts) from None
            except (ValueError, RuntimeError) as err:  # torch's own shape errors (prompt sizes)
                raise SaptError(f"registered pool does not fit the backbone: {err}",
                                source=str(artifacts["meta"].parent)) from None

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params=None):
        """Greedy answers and block weights, one row per prompt.

        Args:
            model_input: a DataFrame with a string column ``input``.

        Returns:
            A DataFrame: ``answer`` (pool and block versions) and ``block_weights`` (a list per row).
        """
        if not isinstance(model_input, pd.DataFrame) or "input" not in model_input.columns:
            raise SaptError("expected a DataFrame with a column 'input' (the prompts)", source="model_input",
                            field="input")
        sources = [str(s) for s in model_input["input"].tolist()]
        generation = self.meta["generation"]
        answers: list[str] = []
        weights: list[list[float]] = []
        for start in range(0, len(sources), generation["batch_size"]):
            chunk = sources[start : start + generation["batch_size"]]
            if self.kind != "state":
                answers += _answers(self.model, self.collator, chunk, generation["max_new_tokens"], self.device)
            weights += self._weights(chunk)
        columns = {"block_weights": weights}
        return pd.DataFrame({"answer": answers, **columns} if self.kind != "state" else columns)

    def _weights(self, sources: list[str]) -> list[list[float]]:
        """Each input's weights over the blocks: [1.0] for a block alone, [] for methods that do not route."""
        if self.kind == "block":
            return [[1.0] for _ in sources]
        batch = {k: v.to(self.device) for k, v in self.collator.generation_batch(sources).items()}
        weights = self.method.attention(self.model, batch)
        return [[] for _ in sources] if weights is None else weights.float().cpu().tolist()


def _answers(model, collator, sources, max_new_tokens, device) -> list[str]:
    from sapt.evaluation.generate import generate_answers

    return generate_answers(model, collator, sources, max_new_tokens=max_new_tokens, device=device)


mlflow.models.set_model(SaptPoolModel())
