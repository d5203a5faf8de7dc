"""The pyfunc model of a registered SAPT pool, block or router version ("models from code": MLflow
stores this file with each version and runs it at load time; it ends with ``set_model``).

    pool    greedy answers of the whole pool (router + every block so far), exactly as the run's
            evaluation decodes them, plus the block weights of each input
    block   one block alone: sapt-lora as the plain PEFT adapter on the bare backbone
    router  only the block weights of each input

Input: a DataFrame with a column ``input``, the raw prompts as the run builds them (template
applied). No task id anywhere. The backbone is loaded by spec, never stored in the version, and
must have the identity recorded at registration. Only safetensors and JSON are read (verified
against the sha256 list in version.json first); nothing unpickles.

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
    if source.startswith(str(rebuilt / "blocks")):
        source = str(artifacts["blocks"]) + source[len(str(rebuilt / "blocks")):]
    elif source.startswith(str(rebuilt)):
        source = str(artifacts["router"]) + source[len(str(rebuilt)):]
    return SaptError(f"registered pool does not load: {err.message}", source=source, field=err.field)


class SaptPoolModel(mlflow.pyfunc.PythonModel):
    """A registered pool, block or router version, servable with ``mlflow.pyfunc.load_model``."""

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
        if self.kind == "pool":
            model = self._pool(backbone, artifacts, meta)
        elif self.kind == "block":
            model = self._block(backbone, artifacts["block"], meta)
        else:
            model = self._router(backbone, artifacts["router"], meta)
        self.model = model.to(self.device).eval()
        generation = meta["generation"]
        self.collator = Collator(backbone.tokenizer, backbone.is_encoder_decoder, generation["max_source_len"],
                                 generation["max_target_len"])

    @staticmethod
    def _pool(backbone, artifacts: dict[str, Path], meta: dict):
        from sapt.config import PetConfig
        from sapt.methods import build_method
        from sapt.registry.pool_store import rebuild_state

        method = build_method(meta["method"], meta["method_args"], PetConfig(**meta["pet"]))
        with tempfile.TemporaryDirectory(prefix="sapt-pool-") as tmp:
            state = rebuild_state(artifacts, meta, Path(tmp))
            try:
                return method.load_finished(backbone, state)
            except SaptError as err:
                raise _remap(err, state, artifacts) from None
            except (ValueError, RuntimeError) as err:  # torch's own shape errors (prompt sizes)
                raise SaptError(f"registered pool does not fit the backbone: {err}",
                                source=str(artifacts["blocks"])) from None

    @staticmethod
    def _block(backbone, folder: Path, meta: dict):
        """sapt-lora: the PEFT adapter on the bare backbone. sapt-prompt: the prompt alone, prepended."""
        if meta["method"] == "sapt-lora":
            from peft import PeftModel

            try:
                return PeftModel.from_pretrained(backbone.model, str(folder))
            except Exception as err:  # PEFT reports shape mismatches as RuntimeError
                raise SaptError(f"block does not fit the backbone: {err}", source=str(folder)) from None
        from safetensors.torch import load_file

        from sapt.pet.lora_pool import Routing
        from sapt.pet.prompt_pool import PromptPool
        from sapt.pet.routed_model import RoutedModel
        from sapt.pet.router import SharedAttention

        prompt = load_file(str(folder / "prompt.safetensors"))["prompt"]  # (P, d)
        embedding = backbone.model.get_input_embeddings().weight
        if prompt.dim() != 2 or prompt.shape[1] != embedding.shape[1]:
            raise SaptError(f"prompt of shape {tuple(prompt.shape)} for embeddings of size {embedding.shape[1]}",
                            source=str(folder / "prompt.safetensors"))
        pool = PromptPool(embedding, prompt.shape[0], 0, torch.Generator().manual_seed(0))
        with torch.no_grad():
            pool.prompt.copy_(prompt)
        # One block: any router gives it weight 1.
        return RoutedModel(backbone.model, SharedAttention(embedding.shape[1]), Routing(),
                           is_encoder_decoder=backbone.is_encoder_decoder, prompts=pool)

    @staticmethod
    def _router(backbone, folder: Path, meta: dict):
        """The router on the bare backbone: only its block weights are used."""
        from sapt.pet import pool_files
        from sapt.pet.lora_pool import Routing
        from sapt.pet.routed_model import RoutedModel
        from sapt.pet.router import SharedAttention

        def load(root: Path) -> SharedAttention:
            config = pool_files.read_router_config(root)
            router = SharedAttention(config["dim"], config["hidden"], config["temperature"], config["layout"],
                                     config["masked_pooling"])
            router.old_keys = torch.zeros(meta["blocks"], config["dim"])
            pool_files.load_router_into(router, root)  # all n keys land in old_keys
            with torch.no_grad():
                router.new_key.copy_(router.old_keys[-1:])
            router.old_keys = router.old_keys[:-1].clone()
            return router

        ablation = meta.get("ablation", "none")
        selector = load(folder / "selector") if ablation == "no-alignment" else None
        return RoutedModel(backbone.model, load(folder), Routing(), is_encoder_decoder=backbone.is_encoder_decoder,
                           selection={"no-sa": "top1", "no-alignment": "selector"}.get(ablation, "attention"),
                           selector=selector)

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
            if self.kind != "router":
                answers += _answers(self.model, self.collator, chunk, generation["max_new_tokens"], self.device)
            weights += self._weights(chunk)
        columns = {"block_weights": weights}
        return pd.DataFrame({"answer": answers, **columns} if self.kind != "router" else columns)

    def _weights(self, sources: list[str]) -> list[list[float]]:
        if self.kind == "block":
            return [[1.0] for _ in sources]
        batch = {k: v.to(self.device) for k, v in self.collator.generation_batch(sources).items()}
        return self.model.block_weights(batch["input_ids"], batch["attention_mask"]).float().cpu().tolist()


def _answers(model, collator, sources, max_new_tokens, device) -> list[str]:
    from sapt.evaluation.generate import generate_answers

    return generate_answers(model, collator, sources, max_new_tokens=max_new_tokens, device=device)


mlflow.models.set_model(SaptPoolModel())
