"""One continual-learning sequence: per stage a Ray Train fit, scoring, MLflow logging; then results.json.

The only module that sees every layer. Bad input is found before anything is registered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
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
from sapt.methods.base import Method, task_infos

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


def run_sequence(run: RunConfig, *, resume: bool = False,
                 on_stage: Callable[[int, dict[str, float | None]], None] | None = None,
                 run_tags: dict[str, str] | None = None, on_progress: Callable[[dict], None] | None = None) -> Path:
    """Runs the whole sequence and returns the path of results.json.

    Args:
        resume: continue the newest interrupted run of the same pool after its last registered task
            (its MLflow run, accuracy matrix and remembered inputs too); from task 1 if none is registered.
        on_stage: called after each stage with its matrix row and the metrics over the tasks so far
            (a sweep reports them to Tune).
        run_tags: extra tags on the MLflow parent run (a sweep's trial name).
        on_progress: gets the run's progress events, for a console to draw: ``{"event": "stage",
            "label"}`` as a stage starts, the workers' ``{"event": "work", ...}`` snapshots
            (``SequenceTrainer``), ``{"event": "scores" | "note", "text"}``.

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
    if run.eval.split == "val":
        tasks = _scored_on_validation(tasks)
    method.set_tasks(task_infos(tasks))  # a method that cannot run on a task refuses here, before anything starts
    names = [t.name for t in tasks]
    single = _single_scores(run.single_results, names)
    # Embedded backbones warm up once here, so this node's workers read them from the cache.
    identity = check_backbone(run.backbone, data_dir=run.data_dir or None, exclude_tasks=names,
                              prompt_format=run.train.prompt_format)
    stages = method.stages(len(tasks))

    from sapt.cluster.session import ensure_ray
    from sapt.cluster.trainer import SequenceTrainer, local_state
    from sapt.registry.sequence_pool import SequencePool
    from sapt.registry.tracking import SequenceTracker, resolve_tracking_uri

    pool = SequencePool.for_run(run, resolve_tracking_uri(run.mlflow.tracking_uri, output_dir), names, identity)
    if resume and pool is None:
        raise SaptError("--resume continues from the pool versions registered after each task, and this run "
                        "registers none", source="config", field="mlflow.register_pool")
    point = pool.resume_point() if resume else None
    show = on_progress or (lambda event: None)
    if point is not None:
        note = (f"resuming run {point.run_id} after task {point.task_index + 1} ({names[point.task_index]}), "
                f"pool version {point.pool_version}")
    elif resume:
        note = f"resume: nothing of this sequence is registered in {pool.name} yet; starting from task 1"
    if resume:
        log.info(note)
        show({"event": "note", "text": note})
    # Ray first: an unreachable cluster must fail before a run is registered in MLflow.
    ensure_ray(run.ray.address, num_workers=run.num_workers, cpus_per_worker=run.ray.cpus_per_worker,
               use_gpu=run.ray.use_gpu)
    output_dir.mkdir(parents=True, exist_ok=True)
    tracker = SequenceTracker(run.mlflow.tracking_uri, run.mlflow.experiment, output_dir,
                              run.model_dump(mode="json"), names, resume_run_id=point.run_id if point else None,
                              tags=run_tags)
    storage = run.ray.storage_path or str((output_dir / "ray").resolve())
    progress = _Progress(len(tasks))
    memory_spec = method.memory()
    memory: dict[int, list[dict]] = {}  # task index -> what the method keeps of it
    state: str | None = None
    done = -1  # the last stage row finished (and registered)
    if point is not None:
        state = _restore(point, pool, tracker, progress, memory, names, output_dir, storage,
                         rows=[s.row for s in stages if s.row <= point.task_index],
                         self_written=memory_spec is not None and memory_spec.source == "self")
        done = point.task_index
    started = time.perf_counter()
    timing: list[dict] = []  # where each stage this process trained spent its time
    first = next((number for number, stage in enumerate(stages) if stage.row > done), len(stages))
    try:
        # One worker group for every stage left: it starts once (tens of seconds), not per stage.
        trainer = SequenceTrainer(run, tasks, storage_path=storage, name=f"{tracker.run_id}-from-t{first + 1:02d}",
                                  first=first, keep_as=tracker.run_id, memory=memory_spec,
                                  post_task_split=method.post_task_split, on_progress=on_progress) \
            if first < len(stages) else None
        with trainer or contextlib.nullcontext():
            for number in range(first, len(stages)):
                stage = stages[number]
                trained = [names[i] for i in stage.train_tasks]
                log.info("stage %d/%d: training on %s", number + 1, len(stages), ", ".join(trained))
                show({"event": "stage", "label": f"stage {number + 1}/{len(stages)} {'+'.join(trained)}"})
                newest = stage.train_tasks[-1]
                needs_memory = memory_spec is not None and number + 1 < len(stages)
                stage_started = time.perf_counter()
                result = trainer.run_stage(number, stage, init_state=None if stage.fresh else state,
                                           memory_rows=[r for i in sorted(memory) if i < newest for r in memory[i]],
                                           needs_memory=needs_memory)
                state = result.checkpoint_path
                scores = {i: _score(tasks[i], result.predictions[names[i]]) for i in stage.eval_tasks}
                progress.add(stage.row, scores, result.attention, names)
                scored = f"after {'+'.join(trained)}: " + ", ".join(f"{names[i]} {v:.1f}" for i, v in scores.items())
                log.info(scored)
                show({"event": "scores", "text": scored})
                tracker.stage(stage.row, trained, scores, result.history, progress.matrix, progress.routing)
                spent = {"stage": number + 1, "tasks": trained,
                         "train_seconds": round(sum(epoch["seconds"] for epoch in result.history), 1),
                         **({"generator": result.generator_training} if result.generator_training else {})}
                if needs_memory and memory_spec.source == "self":
                    remember_started = time.perf_counter()
                    rewritten, files, spent["memory_parsed"] = _self_written(run, method, tasks, newest, state,
                                                                             output_dir)
                    memory.update(rewritten)
                    spent["memory_seconds"] = round(time.perf_counter() - remember_started, 1)
                    _keep_memory(tracker, files, stage.row, self_written=True)
                elif needs_memory:
                    remember_started = time.perf_counter()
                    memory[newest], memory_file = _remember(run, method, tasks, newest, result.generator_path,
                                                            output_dir)
                    spent["memory_seconds"] = round(time.perf_counter() - remember_started, 1)
                    _keep_memory(tracker, [memory_file], stage.row, self_written=False)
                    if result.generator_path:
                        uri = tracker.log_generator(result.generator_path, memory_file.stem)
                        log.info("%s's pseudo-sample generator: %s", names[newest], uri)
                spent["seconds"] = round(time.perf_counter() - stage_started, 1)
                timing.append(spent)
                tracker.log_progress(progress.to_json())
                so_far = progress.metrics_so_far(stage.row, single)
                if pool is not None:  # last: the pool version is what --resume trusts
                    with local_state(state) as state_dir:
                        files = method.finished_files(state_dir, stage.row)
                        version = pool.register(state_dir, files, stage.row, so_far, tracker.run_id)
                    log.info("registered %s version %d (models:/%s@after-t%02d)", pool.name, version.pool,
                             pool.name, stage.row + 1)
                if on_stage is not None:
                    on_stage(stage.row, so_far)
    except BaseException:
        tracker.fail()
        raise
    matrix = progress.matrix
    if stages and all(stage.reference for stage in stages):  # this run is the single-task reference
        single = [matrix[i][i] for i in range(len(tasks))]
    metrics = cl_metrics(matrix, single)
    results = {
        "method": run.method,
        "backbone": run.backbone,
        "order": names,
        "matrix": matrix,
        "single": single,
        "metrics": metrics,
        **progress.routing.results(),
        "mlflow": {"tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id, "run_id": tracker.run_id},
        **({"pool": {"name": pool.name, "uri": f"models:/{pool.name}@after-t{len(tasks):02d}"}} if pool else {}),
        "seconds": round(time.perf_counter() - started, 1),
        "timing": timing,
    }
    path = output_dir / "results.json"
    path.write_text(json.dumps(results, indent=2))
    tracker.finish(metrics, path, progress.routing)
    return path


class _Progress:
    """The accuracy matrix and routing diagnostics so far; what a resumed run restores."""

    def __init__(self, num_tasks: int):
        self.matrix: list[list[float | None]] = [[None] * num_tasks for _ in range(num_tasks)]
        self.routing = RoutingRecord(num_tasks)
        self.rows: dict[int, dict] = {}

    def add(self, row: int, scores: dict[int, float], attention: dict | None, names: list[str]) -> None:
        for i, value in scores.items():
            self.matrix[row][i] = value
        self.routing.add(row, attention, names)
        self.rows[row] = {"scores": {str(i): v for i, v in scores.items()}, "attention": attention}

    def metrics_so_far(self, row: int, single: list[float] | None) -> dict[str, float | None]:
        """AP, F.Ra, FWT, BWT over the tasks up to ``row``, and routing accuracy: a pool version's numbers."""
        count = row + 1
        metrics = cl_metrics([r[:count] for r in self.matrix[:count]], single[:count] if single else None)
        return {**metrics, "routing_accuracy": self.routing.accuracy[row]}

    def to_json(self) -> dict:
        return {"rows": {str(row): entry for row, entry in sorted(self.rows.items())}}

    def restore(self, data: dict, rows_done: list[int], names: list[str], where: str) -> None:
        """Replays the finished stages (by matrix row) of a progress.json."""
        rows = data.get("rows", {})
        for row in rows_done:
            entry = rows.get(str(row))
            if entry is None:
                raise SaptError(f"has no stage {row + 1}: cannot restore the accuracy matrix", source=where,
                                field="rows")
            self.add(row, {int(i): v for i, v in entry["scores"].items()}, entry.get("attention"), names)


def _restore(point, pool, tracker, progress: _Progress, memory: dict[int, list[dict]], names: list[str],
             output_dir: Path, storage: str, rows: list[int], self_written: bool) -> str:
    """Brings back what the interrupted run had after task ``point.task_index``: its matrix rows,
    remembered inputs and the pool state. Returns the state path for the next stage."""
    from sapt.cluster.trainer import place_state
    from sapt.registry import pool_store

    progress.restore(tracker.read_progress(), rows, names, where=f"run {point.run_id}: progress.json")
    memory.update(_restored_memory(tracker, output_dir / "resume", point.task_index, self_written))
    local = output_dir / "resume" / f"after-t{point.task_index + 1:02d}"
    if local.exists():
        shutil.rmtree(local)
    pool_store.download_state(pool.tracking_uri, pool.name, point.pool_version, local)
    return place_state(local, storage, f"{point.run_id}-resume-t{point.task_index + 1:02d}")


def _keep_memory(tracker, files: list[Path], row: int, self_written: bool) -> None:
    """Logs memory files to the run for a resume; self-written ones under the stage row whose state
    wrote them, since every later stage writes them again."""
    for path in files:
        tracker.log_memory(path, after=row + 1 if self_written else None)


def _restored_memory(tracker, dest: Path, task_index: int, self_written: bool) -> dict[int, list[dict]]:
    """The memory the run had after stage row ``task_index``, by task (as ``_keep_memory`` logged it)."""
    memory = {}
    for path in tracker.download_memory(dest, after=task_index + 1 if self_written else None):
        kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if kept and kept[0]["task"] <= task_index:
            memory[kept[0]["task"]] = kept
    return memory


def _scored_on_validation(tasks: list[TaskData]) -> list[TaskData]:
    """``eval.split: val``: every evaluation reads the validation items in place of test."""
    for task in tasks:
        if not task.val:
            raise SaptError(f"eval.split is val, but task {task.name!r} has no validation items", source="config",
                            field="val_size")
    return [dataclasses.replace(task, test=list(task.val)) for task in tasks]


def _remember(run: RunConfig, method: Method, tasks: list[TaskData], index: int, generator_path: str | None,
              output_dir: Path) -> tuple[list[dict], Path]:
    """What the method keeps of finished task ``index``: a share of its real training items, or pseudo
    prompts from its generator (Ray Data batch inference). Returns them and the JSONL file they are
    written to, output_dir/memory/NN-task.jsonl."""
    spec = method.memory()
    task = tasks[index]
    count = spec.count(len(task.train))
    if spec.source == "real":
        picks = random.Random(run.seed * 7919 + index).sample(task.train, min(count, len(task.train)))
        rows = [{"task": index, "source": ex.source, "target": ex.target if spec.keeps_answers else ""}
                for ex in picks]
    else:
        from sapt.cluster.pseudo import generate_pseudo_prompts, pseudo_seed

        if generator_path is None:
            raise RuntimeError(f"{task.name}: the stage saved no pseudo-sample generator")
        log.info("generating %d pseudo prompts of %s", count, task.name)
        rows = generate_pseudo_prompts(
            backbone=run.backbone, data_dir=run.data_dir or None, exclude_tasks=[t.name for t in tasks],
            generator_path=generator_path, settings=spec.generator, task=index, count=count,
            seed=pseudo_seed(run.seed, index), real_sources=[ex.source for ex in task.train],
        )
        rows = [{**r, "target": ""} for r in rows]
        if not rows:
            raise RuntimeError(f"{task.name}: the generator produced only empty prompts")
    return rows, _write_memory(output_dir, index, task.name, rows)


def _self_written(run: RunConfig, method: Method, tasks: list[TaskData], newest: int, checkpoint_path: str,
                  output_dir: Path) -> tuple[dict[int, list[dict]], list[Path], dict[str, float]]:
    """Self-written memory (``MemorySpec.source == "self"``): the state after task ``newest`` writes
    items of every finished task again (Ray Data batch inference), replacing what earlier stages
    wrote. Returns them by task, their JSONL files and each task's share of samples that parsed."""
    from sapt.cluster.pseudo import pseudo_seed
    from sapt.cluster.self_memory import sample_self_memory

    spec = method.memory()
    counts = {i: spec.count(len(tasks[i].train)) for i in range(newest + 1)}
    seeds = {i: pseudo_seed(run.seed, i) + 104729 * newest for i in counts}  # fresh samples after every stage
    log.info("writing %d pseudo items of %d tasks from the state after %s", sum(counts.values()), len(counts),
             tasks[newest].name)
    written = sample_self_memory(run, checkpoint_path, counts, seeds, exclude_tasks=[t.name for t in tasks])
    parsed = {tasks[i].name: round(len(rows) / counts[i], 3) for i, rows in written.items()}
    files = [_write_memory(output_dir, i, tasks[i].name, rows) for i, rows in sorted(written.items())]
    return written, files, parsed


def _write_memory(output_dir: Path, index: int, name: str, rows: list[dict]) -> Path:
    folder = output_dir / "memory"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{index + 1:02d}-{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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
