"""One continual-learning sequence: per stage a Ray Train fit, scoring, MLflow logging; then results.json.

The only module that sees every layer. Bad input is found before anything is registered.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

from sapt.backbones import check_backbone
from sapt.config import RunConfig
from sapt.data.loading import load_tasks
from sapt.data.types import TaskData
from sapt.errors import SaptError
from sapt.jsonfile import read_json_object
from sapt.evaluation.metrics import cl_metrics, score_task
from sapt.evaluation.routing import RoutingRecord
from sapt.methods import build_method
from sapt.methods.base import Method

log = logging.getLogger("sapt.runner")


def _single_scores(path: str, order: list[str]) -> list[float] | None:
    """Single-task references for FWT, from the results.json of a `single` run on the same order."""
    if not path:
        return None
    source = Path(path)
    data = read_json_object(source, missing="single_results: file not found")
    single = data.get("single")
    if data.get("order") != order or not isinstance(single, list) or len(single) != len(order):
        raise SaptError("needs a `single` run's results over the same order", source=str(source), field="single")
    return single


def run_sequence(run: RunConfig) -> Path:
    """Runs the whole sequence and returns the path of results.json.

    Raises:
        SaptError: bad config, data, backbone, Ray address or MLflow URI (nothing registered then).
    """
    if run.data_dir:  # workers run in Ray's own working directory: hand them an absolute path
        run = run.model_copy(update={"data_dir": str(Path(run.data_dir).resolve())})
    output_dir = Path(run.output_dir)
    method = build_method(run.method, run.method_args, run.pet)
    tasks = load_tasks(
        run.data_dir or None,
        run.order,
        max_train_per_task=run.max_train_per_task,
        max_eval_per_task=run.max_eval_per_task,
        val_size=run.val_size,
        seed=run.seed,
    )
    names = [t.name for t in tasks]
    single = _single_scores(run.single_results, names)
    # Embedded backbones warm up once here, so this node's workers read them from the cache.
    check_backbone(run.backbone, data_dir=run.data_dir or None, exclude_tasks=names)
    stages = method.stages(len(tasks))

    from sapt.cluster.session import ensure_ray
    from sapt.cluster.trainer import fit_stage
    from sapt.registry.tracking import SequenceTracker

    # Ray first: an unreachable cluster must fail before a run is registered in MLflow.
    ensure_ray(run.ray.address, num_workers=run.num_workers, cpus_per_worker=run.ray.cpus_per_worker,
               use_gpu=run.ray.use_gpu)
    output_dir.mkdir(parents=True, exist_ok=True)
    tracker = SequenceTracker(run.mlflow.tracking_uri, run.mlflow.experiment, output_dir,
                              run.model_dump(mode="json"), names)
    storage = run.ray.storage_path or str((output_dir / "ray").resolve())
    matrix: list[list[float | None]] = [[None] * len(tasks) for _ in tasks]
    routing = RoutingRecord(len(tasks))
    memory_spec = method.memory()
    memory: dict[int, list[dict]] = {}  # task index -> what the method keeps of it
    state: str | None = None
    started = time.perf_counter()
    try:
        for number, stage in enumerate(stages):
            trained = [names[i] for i in stage.train_tasks]
            log.info("stage %d/%d: training on %s", number + 1, len(stages), ", ".join(trained))
            newest = stage.train_tasks[-1]
            needs_memory = memory_spec is not None and number + 1 < len(stages)
            result = fit_stage(run, stage, tasks, init_state=None if stage.fresh else state, storage_path=storage,
                               name=f"{tracker.run_id}-stage{number + 1:02d}", memory=memory_spec,
                               memory_rows=[r for i in sorted(memory) if i < newest for r in memory[i]],
                               needs_memory=needs_memory)
            state = result.checkpoint_path
            scores = {i: _score(tasks[i], result.predictions[names[i]]) for i in stage.eval_tasks}
            for i, value in scores.items():
                matrix[stage.row][i] = value
            log.info("after %s: %s", "+".join(trained), ", ".join(f"{names[i]} {v:.1f}" for i, v in scores.items()))
            routing.add(stage.row, result.attention, names)
            tracker.stage(stage.row, trained, scores, result.history, matrix, routing)
            if needs_memory:
                memory[newest] = _remember(run, method, tasks, newest, result.generator_path, output_dir)
    except BaseException:
        tracker.fail()
        raise
    if run.method == "single":
        single = [matrix[i][i] for i in range(len(tasks))]
    metrics = cl_metrics(matrix, single)
    results = {
        "method": run.method,
        "backbone": run.backbone,
        "order": names,
        "matrix": matrix,
        "single": single,
        "metrics": metrics,
        **routing.results(),
        "mlflow": {"tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id, "run_id": tracker.run_id},
        "seconds": round(time.perf_counter() - started, 1),
    }
    path = output_dir / "results.json"
    path.write_text(json.dumps(results, indent=2))
    tracker.finish(metrics, path, routing)
    return path


def _remember(run: RunConfig, method: Method, tasks: list[TaskData], index: int, generator_path: str | None,
              output_dir: Path) -> list[dict]:
    """What the method keeps of finished task ``index``: a share of its real training items, or pseudo
    prompts from its generator (Ray Data batch inference). Written to output_dir/memory/ too."""
    spec = method.memory()
    task = tasks[index]
    count = max(1, int(spec.fraction * len(task.train)))
    if spec.source == "real":
        picks = random.Random(run.seed * 7919 + index).sample(task.train, min(count, len(task.train)))
        rows = [{"task": index, "source": ex.source, "target": ex.target} for ex in picks]
    else:
        from sapt.cluster.pseudo import generate_pseudo_prompts

        if generator_path is None:
            raise RuntimeError(f"{task.name}: the stage saved no pseudo-sample generator")
        log.info("generating %d pseudo prompts of %s", count, task.name)
        rows = generate_pseudo_prompts(
            backbone=run.backbone, data_dir=run.data_dir or None, exclude_tasks=[t.name for t in tasks],
            generator_path=generator_path, settings=method.generator_settings(), task=index, count=count,
            seed=run.seed * 7919 + index,
        )
        rows = [{**r, "target": ""} for r in rows]
        if not rows:
            raise RuntimeError(f"{task.name}: the generator produced only empty prompts")
    folder = output_dir / "memory"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{index + 1:02d}-{task.name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _score(task: TaskData, predictions: list[str]) -> float:
    references = [ex.references for ex in task.test]
    if len(predictions) != len(references):
        raise RuntimeError(f"{task.name}: {len(predictions)} predictions for {len(references)} test items")
    return score_task(task.kind, predictions, references)


def format_matrix(results: dict) -> str:
    """The accuracy matrix and metrics as a plain-text table for the terminal."""
    names = results["order"]
    width = max(6, *(len(n) for n in names)) if len(names) < 8 else 8
    head = "after \\ on".ljust(12) + "".join(n[:width].rjust(width + 1) for n in names)
    lines = [head]
    for j, row in enumerate(results["matrix"]):
        cells = "".join(("-" if v is None else f"{v:.1f}").rjust(width + 1) for v in row)
        lines.append(f"{j + 1:>2} {names[j][:8]:<9}" + cells)
    metrics = results["metrics"]
    lines.append("  ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in metrics.items()))
    return "\n".join(lines)
