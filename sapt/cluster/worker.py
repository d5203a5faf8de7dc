"""What each Ray Train worker runs: the stages of a sequence, each built, trained on DeepSpeed,
checkpointed and evaluated, as the driver posts them to the sequence's ``StageFeed``.

Ray enters in five places, numbered as in Ray's examples: [1] the stage's inputs and dataset shards
from the feed, [2] resume from the run's latest checkpoint, [3] checkpoint + report after every
epoch, [4] the final report carrying the saved state and the test predictions, [5] telling the
driver where that is. Everything else is the plain loop in sapt.train.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn

from sapt.backbones import load_backbone
from sapt.config import RunConfig
from sapt.data.collate import Collator
from sapt.data.replay_mix import BalancedMix
from sapt.evaluation.generate import generate_answers
from sapt.methods import build_method
from sapt.methods.base import MEMORY_KEY, TASK_KEY, Method, Stage, TaskInfo
from sapt.methods.pseudo_generator import GENERATOR_DIR, generator_batch, generator_collator, new_generator
from sapt.train.rng_state import restore_rng, save_rng

STATE_DIR = "state"  # method.save output inside a checkpoint
ENGINE_DIR = "engine"  # DeepSpeed engine + optimizer state, for resuming within a task
PREDICTIONS_FILE = "predictions.json"
HISTORY_FILE = "history.json"
ATTENTION_FILE = "attention.json"  # routing diagnostics, for methods that route
POST_TASK_FILE = "post_task.json"  # what the method's finish_task reported
GENERATOR_FILE = "generator.json"  # ARM: how the generator's training went (steps, seconds, window losses)
STAGE_FILE = "stage.json"  # in every checkpoint: which stage (number in Method.stages) and whether it ended


def _say(rank: int, message: str) -> None:
    """A progress line on stderr, from rank 0 only; Ray forwards it to the driver, whose console
    writes it into the run's log file (and to the terminal with ``--verbose``).

    Not ``print``: Train V2 patches print to also log the line, which shows it twice on the driver.
    """
    if rank == 0:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


class _Reporter:
    """Rank 0's progress in one stage: a line into the log (stderr) and a snapshot to the feed, from
    which the driver draws its bars. Snapshots are fire-and-forget: the feed keeps the newest."""

    def __init__(self, feed, number: int, rank: int):
        self.feed, self.number, self.rank = feed, number, rank

    def __call__(self, phase: str, done: int, total: int | None, line: str | None = None, **fields) -> None:
        if self.rank != 0:
            return
        self.feed.post_progress.remote(self.number, {"event": "work", "phase": phase, "done": done, "total": total,
                                                     **fields})
        if line:
            _say(self.rank, line)


@contextlib.contextmanager
def _checkpoint_dir(path: str | None):
    if not path:
        yield None
        return
    with ray.train.Checkpoint(path).as_directory() as directory:
        yield Path(directory) / STATE_DIR


class _TrainBatches(NumpyBatchCollateFn):
    """Tokenizes a Ray Data batch of strings into training tensors, inside the worker; each item's
    task index and memory flag travel with it to ``Method.loss``."""

    def __init__(self, collator: Collator):
        self.collator = collator

    def __call__(self, batch):
        tensors = self.collator.train_batch(list(batch["source"]), list(batch["target"]))
        # Copies: Ray Data hands read-only arrays, which torch would share and warn about.
        tensors[TASK_KEY] = torch.tensor(batch["task"], dtype=torch.long)
        tensors[MEMORY_KEY] = torch.tensor(batch["memory"], dtype=torch.bool)
        return tensors


def quiet_ray_data() -> None:
    """Per-dataset progress bars drown the training progress lines on a terminal."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def checkpoint_dir_name(number: int, epoch: int | None) -> str:
    """A checkpoint's folder in the Train run: ``stage-NN-epoch-EEE``, or ``stage-NN-final``."""
    return f"stage-{number + 1:02d}-" + ("final" if epoch is None else f"epoch-{epoch:03d}")


def train_sequence(loop_config: dict) -> None:
    """Ray Train entry point: stage after stage as the driver posts them, until it closes the feed.

    ``loop_config`` holds plain JSON (run config, the tasks' TaskInfo, the first stage's number) and the feed.
    """
    run = RunConfig.model_validate(loop_config["run"])
    infos = [TaskInfo.from_dict(t) for t in loop_config["tasks"]]
    feed = loop_config["feed"]
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if run.ray.use_gpu else "cpu")
    quiet_ray_data()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    group = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(group, src=0)  # one set of dataset shards per worker group
    me = ray.get_runtime_context()

    # [2] A restarted worker group (or a re-driven run of the same name) continues from its newest
    # checkpoint: mid-stage from the epoch it ended, with that epoch's random state.
    number, resumed = loop_config["first"], ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as directory:
            where = json.loads((Path(directory) / STAGE_FILE).read_text())
        number = where["number"]
        if where["final"]:  # that stage ended, but the driver may not have heard
            if rank == 0:
                ray.get(feed.post_done.remote(number))
            number, resumed = number + 1, None
    while True:
        # [1] The stage's inputs and this rank's dataset shards; None when the sequence is over.
        inputs = ray.get(feed.take_stage.remote(number, group[0], rank, me.get_actor_id(), me.current_actor))
        if inputs is None:
            return
        _train_stage(run, number, inputs, infos, rank, world, resumed, _Reporter(feed, number, rank))
        resumed = None
        gc.collect()  # the stage's model and engine, before the next stage builds its own
        # [5] The driver copies the stage's final checkpoint and scores its predictions.
        if rank == 0:
            ray.get(feed.post_done.remote(number))
        number += 1


def _train_stage(run: RunConfig, number: int, inputs: dict, infos: list[TaskInfo], rank: int, world: int,
                 resumed: ray.train.Checkpoint | None, reporter: _Reporter) -> None:
    """One stage on this worker: build, train (from ``resumed``, an epoch checkpoint of this stage,
    if given), post-task pass, evaluate, save; ends with the stage's final report."""
    from sapt.train.engine import build_engine, whole_trainable  # after DS_ACCELERATOR is set
    from sapt.train.loop import train_epoch

    stage = Stage.from_dict(inputs["stage"])
    task_names = [info.name for info in infos]
    shards = inputs["shards"]
    device = ray.train.torch.get_device()
    torch.manual_seed(run.seed + stage.row)
    label = f"[stage {stage.row + 1}/{len(task_names)} {'+'.join(task_names[i] for i in stage.train_tasks)}]"

    backbone = load_backbone(run.backbone, data_dir=run.data_dir or None, exclude_tasks=task_names)
    method = build_method(run.method, run.method_args, run.pet)
    method.set_tasks(infos)
    with _checkpoint_dir(inputs["init_state"]) as state_dir:  # the runner sends None for a fresh stage
        model = method.build(backbone, state_dir, stage)
    model.to(device)
    collator = Collator.for_backbone(backbone, run.train.max_source_len, run.train.max_target_len,
                                     run.train.prompt_format)
    remembered = _memory_by_task(shards.get("memory"))
    if not resumed:  # a resumed stage's engine checkpoint holds what the start pass set, and more
        started = _start_task(model, method, collator, run, rank, world, device, shards, remembered)
        if started:
            _say(rank, f"{label} start of task: {json.dumps(started)}")
    use_bf16 = run.train.precision == "bf16"
    engine = build_engine(model, run.train, use_bf16=use_bf16, param_groups=method.param_groups(model, run.train.lr))

    # Which remembered items are reflected or replayed in balanced batches.
    reflect_rng = random.Random(run.seed + 104729 * stage.row + rank)

    history: list[dict] = []
    if resumed:
        with resumed.as_directory() as directory:
            engine.load_checkpoint(str(Path(directory) / ENGINE_DIR), load_module_strict=False)
            history = json.loads((Path(directory) / HISTORY_FILE).read_text())
            restore_rng(Path(directory), rank, reflect_rng)
        _say(rank, f"{label} resumed after epoch {len(history)}")

    # This worker's shard of the stage's training stream, and the remembered inputs of earlier tasks.
    shard = shards["train"]
    spec = method.memory()
    reflect = _reflect_sampler(collator, run.train.batch_size, reflect_rng, remembered) \
        if spec is not None and spec.use == "reflect" else None
    balanced = BalancedMix(remembered, batch_size=run.train.batch_size, old_share=spec.old_share, rng=reflect_rng) \
        if spec is not None and spec.mix == "balanced" and remembered else None
    for epoch in range(len(history), run.train.epochs):
        before, total = sum(h["steps"] for h in history), _stage_steps(history, run.train.epochs)

        def progress(step: int, loss: float, tps: float, epoch=epoch, before=before, total=total) -> None:
            reporter("train", before + step, total,
                   f"{label} epoch {epoch + 1}/{run.train.epochs} step {step} loss {loss:.4f} {tps:,.0f} tok/s/worker",
                   loss=loss, tokens_per_second=tps, epoch=epoch + 1, epochs=run.train.epochs)

        shuffle_seed = run.seed + 7919 * epoch + rank
        if balanced is not None:
            batches = _balanced_batches(shard, collator, balanced, steps=spec.steps_per_epoch, seed=shuffle_seed)
        else:
            batches = shard.iter_torch_batches(
                batch_size=run.train.batch_size,
                collate_fn=_TrainBatches(collator),
                local_shuffle_buffer_size=256,
                local_shuffle_seed=shuffle_seed,
            )
        stats = train_epoch(engine, method, batches, device=device, log_every=run.train.log_every, on_log=progress,
                            reflect=reflect)
        seen = torch.tensor([stats.items, stats.memory_items], device=device)
        dist.all_reduce(seen)  # items of every rank: what share of the stage's stream was remembered items
        stats.items, stats.memory_items = int(seen[0]), int(seen[1])
        history.append(
            {"epoch": epoch + 1, "steps": stats.steps, "loss": stats.mean_loss, "losses": stats.losses,
             "tokens": stats.tokens, "seconds": stats.seconds, "tokens_per_second": stats.tokens_per_second,
             "items": stats.items, "memory_items": stats.memory_items,
             "terms": {k: sum(v) / len(v) for k, v in stats.terms.items()}}
        )
        reporter("train", before + stats.steps, _stage_steps(history, run.train.epochs),
               f"{label} epoch {epoch + 1} done: {stats.steps} steps, loss {stats.mean_loss:.4f}, "
               f"{stats.tokens_per_second:,.0f} tok/s/worker, {stats.seconds:.1f}s",
               loss=stats.mean_loss, tokens_per_second=stats.tokens_per_second, epoch=epoch + 1,
               epochs=run.train.epochs)
        # [3] Engine state from every rank, the method's state and the loss history from rank 0.
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(str(Path(tmp) / ENGINE_DIR), tag=f"epoch{epoch + 1}", exclude_frozen_parameters=True)
            save_rng(Path(tmp), rank, reflect_rng)
            with whole_trainable(engine, run.train.zero_stage):
                if rank == 0:
                    method.save(engine.module, Path(tmp) / STATE_DIR)
                    (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
                    (Path(tmp) / STAGE_FILE).write_text(json.dumps({"number": number, "final": False}))
            ray.train.report(
                {"stage": number + 1, "epoch": epoch + 1, "loss": stats.mean_loss},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=checkpoint_dir_name(number, epoch + 1),
            )

    synced = run.train.zero_stage == 3 and world > 1
    report = _post_task(engine.module, method, collator, run, rank, world, device, synced, stage, shards)
    predictions, attention = _evaluate(engine, method, collator, run, rank, world, device, task_names, label, shards,
                                       reporter)
    # [4] The stage's result: state for the next stage, predictions for the driver to score.
    with tempfile.TemporaryDirectory() as tmp:
        with whole_trainable(engine, run.train.zero_stage):
            if rank == 0:
                method.save(engine.module, Path(tmp) / STATE_DIR)
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
                (Path(tmp) / PREDICTIONS_FILE).write_text(json.dumps(predictions))
                (Path(tmp) / STAGE_FILE).write_text(json.dumps({"number": number, "final": True}))
                if report is not None:
                    (Path(tmp) / POST_TASK_FILE).write_text(json.dumps(report))
                if attention is not None:
                    attention["remembered"] = (report or {}).get("train_attention")
                    (Path(tmp) / ATTENTION_FILE).write_text(json.dumps(attention))
        del engine  # the generator below needs the memory more
        memory = method.memory()
        if memory is not None and memory.generator is not None and inputs["needs_memory"]:
            trained = _train_generator(run, memory.generator, task_names, rank, device, label,
                                       Path(tmp) / GENERATOR_DIR, shard, reporter)
            if rank == 0:
                (Path(tmp) / GENERATOR_FILE).write_text(json.dumps(trained))
        ray.train.report(
            {"stage": number + 1, "epoch": run.train.epochs, "evaluated": 1},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_dir_name(number, None),
        )


def _stage_steps(history: list[dict], epochs: int) -> int | None:
    """The stage's step count, known once one epoch has run (the shard streams)."""
    return history[0]["steps"] * epochs if history else None


def _my_rows(iterator, rank: int, world: int) -> list[tuple[int, int, str, str]]:
    """This rank's (task, item, source, target) rows of an unsplit dataset: those with id % world == rank."""
    rows = []
    for batch in iterator.iter_batches(batch_size=4096, batch_format="numpy"):
        targets = batch["target"] if "target" in batch else [""] * len(batch["id"])
        for ident, task, item, source, target in zip(batch["id"], batch["task"], batch["item"], batch["source"], targets):
            if int(ident) >= 0 and int(ident) % world == rank:
                rows.append((int(task), int(item), str(source), str(target)))
    return rows


def _chunks(rows: list, size: int, synced: bool, device) -> tuple[list[list], int]:
    """Batches of ``rows``; under ZeRO-3 every rank gets as many (padded with fillers), since weights
    are gathered collectively. Returns (chunks, how many are real)."""
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    real = len(chunks)
    if synced:
        count = torch.tensor([len(chunks)], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        filler = chunks[-1] if chunks else [(-1, -1, "x", "")]  # a real token: decoder-only prompts cannot be empty
        chunks += [filler] * (int(count) - len(chunks))
    return chunks, real


def _memory_by_task(shard) -> dict[int, list[tuple[str, str]]]:
    """The remembered (source, target) items of earlier tasks, by task (empty: nothing kept).

    The memory dataset is small next to the stream (a share of each task, or ConPET's history):
    each worker holds it whole and samples from it with a random state every epoch checkpoint keeps.
    """
    if shard is None:
        return {}
    by_task: dict[int, list[tuple[str, str]]] = {}
    for batch in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        for task, source, target in zip(batch["task"], batch["source"], batch["target"]):
            by_task.setdefault(int(task), []).append((str(source), str(target)))
    return by_task


def _reflect_sampler(collator: Collator, batch_size: int, rng: random.Random,
                     by_task: dict[int, list[tuple[str, str]]]):
    """Per micro-batch, one batch of remembered inputs of every earlier task (None: nothing kept)."""
    if not by_task:
        return None

    def draw() -> dict[int, dict[str, torch.Tensor]]:
        return {task: collator.generation_batch([rng.choice(items)[0] for _ in range(batch_size)])
                for task, items in sorted(by_task.items())}

    return draw


def _balanced_batches(shard, collator: Collator, mix: BalancedMix, *, steps: int | None, seed: int):
    """Training batches of ``mix.new_per_batch`` new items from this worker's shard plus
    ``mix.old_per_batch`` remembered ones drawn task-uniformly. ``steps`` batches per epoch (the
    shard is read again, reshuffled, when it runs out), or one pass over the shard when None."""
    made, passes = 0, 0
    while True:
        read = False
        for batch in shard.iter_batches(batch_size=mix.new_per_batch, batch_format="numpy",
                                        local_shuffle_buffer_size=256, local_shuffle_seed=seed + 104729 * passes):
            read = True
            new = [(int(t), False, str(s), str(g)) for t, s, g in zip(batch["task"], batch["source"], batch["target"])]
            old = [(task, True, source, target) for task, (source, target) in mix.draw_old()]
            rows = new + old
            tensors = collator.train_batch([r[2] for r in rows], [r[3] for r in rows])
            tensors[TASK_KEY] = torch.tensor([r[0] for r in rows], dtype=torch.long)
            tensors[MEMORY_KEY] = torch.tensor([r[1] for r in rows], dtype=torch.bool)
            yield tensors
            made += 1
            if steps is not None and made >= steps:
                return
        passes += 1
        if steps is None or not read:
            return


@torch.no_grad()
def _post_task(model, method: Method, collator, run, rank, world, device, synced, stage, shards) -> dict | None:
    """The method's post-task pass over the newest task's ``post_task_split`` inputs, all ranks
    together: per-batch sums, summed over batches and all-reduced, then ``finish_task``, which keeps
    what it needs in the state. Returns its JSON report (None without a pass)."""
    if method.post_task_split is None:
        return None
    rows = _my_rows(shards["post_task"], rank, world)
    model.eval()
    sums, count = _summed_pass(lambda batch, chunk: method.post_task_sums(model, batch, [c[3] for c in chunk]),
                               rows, collator, run.eval.batch_size, synced, device)
    return method.finish_task(model, stage.train_tasks[-1], sums, count) or {}


@torch.no_grad()
def _start_task(model, method: Method, collator, run, rank, world, device, shards, remembered) -> dict | None:
    """The method's start-of-task pass, before the engine exists: sums over this rank's share of the
    new task's ``post_task_split`` inputs and of the remembered inputs, all-reduced, then
    ``start_task``. The model is whole on every rank here (no ZeRO-3 gathering in its forward)."""
    if not method.start_task_pass:
        return None
    new_rows = _my_rows(shards["post_task"], rank, world)
    old_items = [(task, n, source, "") for task in sorted(remembered) for n, (source, _) in enumerate(remembered[task])]
    old_rows = old_items[rank::world]
    was_training = model.training
    model.eval()

    def sums_of(batch, chunk):
        return method.start_task_sums(model, batch)

    new, new_count = _summed_pass(sums_of, new_rows, collator, run.eval.batch_size, False, device)
    old, old_count = _summed_pass(sums_of, old_rows, collator, run.eval.batch_size, False, device)
    model.train(was_training)
    return method.start_task(model, new, new_count, old, old_count)


def _summed_pass(sums_of, rows, collator, batch_size: int, synced: bool, device) -> tuple[dict, int]:
    """``sums_of(batch, chunk)`` over batches of this rank's ``rows``, summed over batches and over
    ranks. Returns (sums on the CPU, how many rows every rank saw together)."""
    chunks, real = _chunks(rows, batch_size, synced, device)
    totals: dict[str, torch.Tensor] | None = None
    count = torch.zeros((), device=device)
    for number, chunk in enumerate(chunks):
        batch = {k: v.to(device) for k, v in collator.generation_batch([c[2] for c in chunk]).items()}
        sums = sums_of(batch, chunk)
        if totals is None:
            totals = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in sums.items()}
        if number < real:  # the rest are ZeRO-3 fillers
            for key, value in sums.items():
                totals[key] += value.double()
            count += len(chunk)
    if totals is None:  # no rows and no fillers (never under ZeRO-3): a local probe learns the shapes
        batch = {k: v.to(device) for k, v in collator.generation_batch(["x"]).items()}
        totals = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in sums_of(batch, [(-1, -1, "x", "")]).items()}
    for key in sorted(totals):  # the same order on every rank
        dist.all_reduce(totals[key])
    dist.all_reduce(count)
    return {k: v.float().cpu() for k, v in totals.items()}, int(count)


def _evaluate(engine, method: Method, collator, run, rank, world, device, task_names, label, shards, reporter):
    """Greedy-decodes this rank's share of the test prompts; rank 0 returns everyone's answers by task,
    and, for routing methods, per-task attention sums and how many inputs picked their own block."""
    rows = _my_rows(shards["eval"], rank, world)
    synced = run.train.zero_stage == 3 and world > 1
    chunks, real = _chunks(rows, run.eval.batch_size, synced, device)
    model = engine.module
    model.eval()
    local: list[tuple[int, int, str]] = []
    routing: dict[int, dict] = {}
    start, done = time.perf_counter(), 0
    for number, chunk in enumerate(chunks):
        sources = [c[2] for c in chunk]
        batch = {k: v.to(device) for k, v in collator.generation_batch(sources).items()}  # once, for both
        answers = generate_answers(model, collator, sources, max_new_tokens=run.eval.max_new_tokens,
                                   device=device, synced_gpus=synced, batch=batch)
        weights = method.attention(model, batch)
        if number < real:  # the rest are ZeRO-3 fillers
            local.extend((task, item, answer) for (task, item, *_), answer in zip(chunk, answers))
            if weights is not None:
                _add_routing(routing, [c[0] for c in chunk], weights.float().cpu())
        done += len(chunk)
        shown = min(done, len(rows))  # not the ZeRO-3 fillers
        line = None
        if (number + 1) % 10 == 0 or number + 1 == len(chunks):
            line = f"{label} eval {shown}/{len(rows)} items on rank 0, {shown / (time.perf_counter() - start):.1f} items/s"
        reporter("eval", shown, len(rows), line)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (local, routing))
    if rank != 0:
        return {}, None
    by_task: dict[str, dict[int, str]] = {}
    merged: dict[int, dict] = {}
    for part, part_routing in gathered:
        for task, item, answer in part:
            by_task.setdefault(task_names[task], {})[item] = answer
        for task, stats in part_routing.items():
            into = merged.setdefault(task, {"sum": [0.0] * len(stats["sum"]), "count": 0, "own_block": 0})
            into["sum"] = [a + b for a, b in zip(into["sum"], stats["sum"])]
            into["count"] += stats["count"]
            into["own_block"] += stats["own_block"]
    predictions = {name: [answers[i] for i in sorted(answers)] for name, answers in by_task.items()}
    attention = {"tasks": {task_names[t]: v for t, v in sorted(merged.items())}} if merged else None
    return predictions, attention


def _add_routing(routing: dict[int, dict], tasks: list[int], weights) -> None:
    """Accumulates per task: summed weights over blocks, item count, items whose top block is their task's."""
    top = weights.argmax(dim=1).tolist()
    for task, row, best in zip(tasks, weights.tolist(), top):
        stats = routing.setdefault(task, {"sum": [0.0] * len(row), "count": 0, "own_block": 0})
        stats["sum"] = [a + b for a, b in zip(stats["sum"], row)]
        stats["count"] += 1
        stats["own_block"] += int(best == task)


def _train_generator(run, settings, task_names, rank, device, label, out_dir: Path, shard, reporter) -> dict:
    """ARM: a fresh LoRA generator of the newest task's prompts, trained on this worker's shard
    (all ranks, one DeepSpeed engine) and saved by rank 0 as a PEFT adapter. Stops at
    ``settings.steps`` or, with ``settings.min_improvement``, once its loss stops falling.

    Returns: {"steps", "max_steps", "seconds", "stopped_early", "window_losses"} (means over ranks).
    """
    from sapt.train.engine import build_engine, whole_trainable
    from sapt.train.loop import train_epoch
    from sapt.train.plateau import Plateau

    started = time.perf_counter()
    backbone = load_backbone(run.backbone, data_dir=run.data_dir or None, exclude_tasks=task_names)
    model = new_generator(backbone, settings).to(device)
    gen_train = run.train.model_copy(update={"lr": settings.lr, "grad_accum": 1})
    engine = build_engine(model, gen_train, use_bf16=run.train.precision == "bf16")
    collator = generator_collator(backbone, settings)

    class _Batches(NumpyBatchCollateFn):
        def __call__(self, batch):
            return generator_batch(collator, list(batch["source"]))

    class _PlainLoss:
        @staticmethod
        def loss(model, batch, reflect=None):
            return model(**batch).loss, {}  # generator batches carry no task/memory keys

    def mean_over_ranks(value: float) -> float:
        total = torch.tensor([value], device=device)
        dist.all_reduce(total)
        return float(total) / dist.get_world_size()

    plateau = Plateau(settings.stop_window, settings.min_improvement, reduce=mean_over_ranks)
    steps, passes, stopped = 0, 0, False
    while steps < settings.steps and not stopped:
        batches = shard.iter_torch_batches(batch_size=run.train.batch_size, collate_fn=_Batches(),
                                           local_shuffle_buffer_size=256, local_shuffle_seed=run.seed + passes)
        stats = train_epoch(engine, _PlainLoss, batches, device=device, log_every=run.train.log_every,
                            on_log=lambda step, loss, _tps, steps=steps: reporter(
                                "generator", steps + step, settings.steps, loss=loss),
                            max_steps=settings.steps - steps, should_stop=plateau.update)
        if stats.steps == 0:
            break
        steps, passes, stopped = steps + stats.steps, passes + 1, stats.stopped
        reporter("generator", steps, settings.steps, f"{label} generator: {steps}/{settings.steps} steps, "
               f"loss {stats.mean_loss:.4f}" + (" (loss stopped falling)" if stopped else ""), loss=stats.mean_loss)
    with whole_trainable(engine, run.train.zero_stage):
        if rank == 0:
            engine.module.save_pretrained(str(out_dir))
    return {"steps": steps, "max_steps": settings.steps, "seconds": round(time.perf_counter() - started, 1),
            "stopped_early": stopped and steps < settings.steps, "window_losses": [round(m, 4) for m in plateau.means]}
