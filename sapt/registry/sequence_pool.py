"""What one sequence registers after each task, and where an interrupted sequence picks up again.

The glue between a run's config and ``pool_store``: the runner builds one ``SequencePool`` up front
(so a bad name or a method without a pool fails before anything is trained) and calls ``register``
after every task; ``--resume`` asks ``resume_point`` for the newest run's last registered task.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sapt.registry import pool_store

@dataclass(frozen=True)
class ResumePoint:
    """The last task a run registered: its pool version is where the run continues from.

    Attributes:
        task_index: 0-based index of that task.
        pool_version: the pool version registered after it.
        run_id: the MLflow run that registered it (the sequence's parent run).
    """

    task_index: int
    pool_version: int
    run_id: str


def default_pool_name(method: str, order: str | list[str], names: list[str]) -> str:
    """``<method>-<order>``: the order's name, or its task names joined (a hash when that is long)."""
    label = order if isinstance(order, str) else "-".join(names)
    label = re.sub(r"[^A-Za-z0-9_.\-]", "_", label)
    if len(label) > 60:
        label = label[:40] + "-" + hashlib.sha256(json.dumps(names).encode()).hexdigest()[:12]
    return f"{method}-{label}"


def wants_registration(register_pool: bool | None) -> bool:
    """``mlflow.register_pool``: null means yes (every method registers its finished model)."""
    return True if register_pool is None else register_pool


@dataclass(frozen=True)
class SequencePool:
    """Registration settings shared by every task of one sequence.

    Attributes:
        tracking_uri: the MLflow store (its model registry too).
        name: the pool's registered-model name.
        order: the task names, in order.
        method, method_args: the method and its knobs, every value (defaults included).
        pet: the run's ``pet`` section.
        backbone_spec, backbone_identity: the backbone by spec, and what it must load as.
        backbone_args: extra ``load_backbone`` keywords (embedded:minilm-t5's data_dir and exclusions).
        benchmark: a label for the data (``embedded`` or the data folder's name).
        generation: how the run tokenized and decoded at evaluation.
    """

    tracking_uri: str
    name: str
    order: list[str]
    method: str
    method_args: dict[str, Any]
    pet: dict[str, Any]
    backbone_spec: str
    backbone_identity: str
    backbone_args: dict[str, Any]
    benchmark: str
    generation: pool_store.Generation

    @classmethod
    def for_run(cls, run, tracking_uri: str, names: list[str], backbone_identity: str) -> "SequencePool | None":
        """The pool a run registers into, or None when it registers nothing (``mlflow.register_pool``)."""
        if not wants_registration(run.mlflow.register_pool):
            return None
        return cls(
            tracking_uri=tracking_uri,
            name=run.mlflow.pool_name or default_pool_name(run.method, run.order, names),
            order=list(names),
            method=run.method,
            method_args=dict(run.method_args),
            pet=run.pet.model_dump(mode="json"),
            backbone_spec=run.backbone,
            backbone_identity=backbone_identity,
            backbone_args={"data_dir": run.data_dir or None, "exclude_tasks": list(names)},
            benchmark=Path(run.data_dir).name if run.data_dir else "embedded",
            generation=pool_store.Generation.from_run(run),
        )

    def register(self, state_dir: Path, files, task_index: int, metrics: dict[str, float | None],
                 run_id: str) -> pool_store.PoolVersion:
        """Registers task ``task_index`` from the state folder saved after it (idempotent per run).

        Args:
            files: the method's ``StateFiles`` of that folder (``Method.finished_files``).
        """
        return pool_store.register_task(
            self.tracking_uri, pool_name=self.name, state_dir=state_dir, blocks=files.blocks, shared=files.shared,
            task_index=task_index, pet=self.pet,
            task_names=self.order, method=self.method, method_args=self.method_args,
            backbone_spec=self.backbone_spec, backbone_identity=self.backbone_identity,
            benchmark=self.benchmark, metrics=metrics, source_run_id=run_id, generation=self.generation,
            backbone_args=self.backbone_args)

    def resume_point(self) -> ResumePoint | None:
        """The newest run of this pool, order, method and backbone, and the last task it registered.

        None when nothing matching is registered (a first run starts from task 1).
        """
        wanted = {"kind": "pool", "order": json.dumps(self.order), "method": self.method,
                  "backbone_identity": self.backbone_identity}
        if not pool_store.complete_pool_versions(self.tracking_uri, self.name, self.order, method=self.method,
                                                 backbone_identity=self.backbone_identity):
            return None  # also covers a store or registered model that does not exist yet
        versions = pool_store.show(self.tracking_uri, self.name)["versions"]
        matching = [v for v in versions
                    if v["status"] == "READY" and all(v["tags"].get(k) == value for k, value in wanted.items())]
        run_id = max(matching, key=lambda v: v["version"])["tags"].get("source_run_id", "")
        done = pool_store.complete_pool_versions(self.tracking_uri, self.name, self.order, method=self.method,
                                                 backbone_identity=self.backbone_identity, source_run_id=run_id)
        task = max(done)
        pool_store.restore_aliases(self.tracking_uri, self.name, done[task], task)
        return ResumePoint(task_index=task, pool_version=done[task], run_id=run_id)
