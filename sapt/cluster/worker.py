"""What each Ray Train worker runs for one stage: build, train on DeepSpeed, checkpoint, evaluate.

Ray enters in four places, numbered as in Ray's examples: [1] dataset shards, [2] resume from the
run's latest checkpoint, [3] checkpoint + report after every epoch, [4] the final report carrying
the saved state and the test predictions. Everything else is the plain loop in sapt.train.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
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
from sapt.evaluation.generate import generate_answers
from sapt.methods import build_method
from sapt.methods.base import Stage

STATE_DIR = "state"  # method.save output inside a checkpoint
ENGINE_DIR = "engine"  # DeepSpeed engine + optimizer state, for resuming within a task
PREDICTIONS_FILE = "predictions.json"
HISTORY_FILE = "history.json"


def _say(rank: int, message: str) -> None:
    """Progress goes to stderr from rank 0 only; Ray forwards it to the driver's stderr."""
    if rank == 0:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _checkpoint_dir(path: str | None):
    if not path:
        yield None
        return
    with ray.train.Checkpoint(path).as_directory() as directory:
        yield Path(directory) / STATE_DIR


@contextlib.contextmanager
def _whole_trainable(engine, zero_stage: int):
    """Under ZeRO-3 parameters are partitioned: gather the trainable ones before saving them."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
        yield


class _TrainBatches(NumpyBatchCollateFn):
    """Tokenizes a Ray Data batch of strings into training tensors, inside the worker."""

    def __init__(self, collator: Collator):
        self.collator = collator

    def __call__(self, batch):
        return self.collator.train_batch(list(batch["source"]), list(batch["target"]))


def quiet_ray_data() -> None:
    """Per-dataset progress bars drown the training progress lines on a terminal."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def train_stage(loop_config: dict) -> None:
    """Ray Train entry point. ``loop_config`` holds plain JSON: run config, stage, init state path."""
    run = RunConfig.model_validate(loop_config["run"])
    stage = Stage.from_dict(loop_config["stage"])
    task_names: list[str] = loop_config["task_names"]
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if run.ray.use_gpu else "cpu")
    from sapt.train.engine import build_engine  # after DS_ACCELERATOR is set
    from sapt.train.loop import train_epoch

    quiet_ray_data()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(run.seed + stage.row)
    label = f"[stage {stage.row + 1}/{len(task_names)} {'+'.join(task_names[i] for i in stage.train_tasks)}]"

    backbone = load_backbone(run.backbone, data_dir=run.data_dir or None, exclude_tasks=task_names)
    method = build_method(run.method, run.method_args, run.pet)
    with _checkpoint_dir(loop_config.get("init_state")) as state_dir:  # the runner sends None for a fresh stage
        model = method.build(backbone, state_dir, stage)
    model.to(device)
    use_bf16 = run.train.precision == "bf16"
    engine = build_engine(model, run.train, use_bf16=use_bf16)
    collator = Collator(backbone.tokenizer, backbone.is_encoder_decoder, run.train.max_source_len, run.train.max_target_len)

    # [2] A restarted worker group (or a re-driven run of the same name) continues from its last epoch.
    history: list[dict] = []
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as directory:
            engine.load_checkpoint(str(Path(directory) / ENGINE_DIR), load_module_strict=False)
            history = json.loads((Path(directory) / HISTORY_FILE).read_text())
        _say(rank, f"{label} resumed after epoch {len(history)}")

    # [1] This worker's shard of the stage's training stream.
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(len(history), run.train.epochs):

        def progress(step: int, loss: float, tps: float, epoch=epoch) -> None:
            _say(rank, f"{label} epoch {epoch + 1}/{run.train.epochs} step {step} loss {loss:.4f} {tps:,.0f} tok/s/worker")

        batches = shard.iter_torch_batches(
            batch_size=run.train.batch_size,
            collate_fn=_TrainBatches(collator),
            local_shuffle_buffer_size=256,
            local_shuffle_seed=run.seed + 7919 * epoch + rank,
        )
        stats = train_epoch(engine, method, batches, device=device, log_every=run.train.log_every, on_log=progress)
        history.append(
            {"epoch": epoch + 1, "steps": stats.steps, "loss": stats.mean_loss, "losses": stats.losses,
             "tokens": stats.tokens, "seconds": stats.seconds, "tokens_per_second": stats.tokens_per_second}
        )
        _say(rank, f"{label} epoch {epoch + 1} done: {stats.steps} steps, loss {stats.mean_loss:.4f}, "
                   f"{stats.tokens_per_second:,.0f} tok/s/worker, {stats.seconds:.1f}s")
        # [3] Engine state from every rank, the method's state and the loss history from rank 0.
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(str(Path(tmp) / ENGINE_DIR), tag=f"epoch{epoch + 1}", exclude_frozen_parameters=True)
            with _whole_trainable(engine, run.train.zero_stage):
                if rank == 0:
                    method.save(engine.module, Path(tmp) / STATE_DIR)
                    (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
            ray.train.report(
                {"epoch": epoch + 1, "loss": stats.mean_loss},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"epoch-{epoch + 1:03d}",
            )

    predictions = _evaluate(engine, collator, run, rank, world, device, task_names, label)
    # [4] The stage's result: state for the next stage, predictions for the driver to score.
    with tempfile.TemporaryDirectory() as tmp:
        with _whole_trainable(engine, run.train.zero_stage):
            if rank == 0:
                method.save(engine.module, Path(tmp) / STATE_DIR)
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
                (Path(tmp) / PREDICTIONS_FILE).write_text(json.dumps(predictions))
        ray.train.report(
            {"epoch": run.train.epochs, "evaluated": 1},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name="final",
        )


def _evaluate(engine, collator, run, rank, world, device, task_names, label) -> dict[str, list[str]]:
    """Greedy-decodes this rank's share of the test prompts; rank 0 returns everyone's, by task."""
    rows = []
    for batch in ray.train.get_dataset_shard("eval").iter_batches(batch_size=4096, batch_format="numpy"):
        for ident, task, item, source in zip(batch["id"], batch["task"], batch["item"], batch["source"]):
            if int(ident) % world == rank:
                rows.append((int(task), int(item), str(source)))
    size = run.eval.batch_size
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    real = len(chunks)
    synced = run.train.zero_stage == 3 and world > 1
    if synced:
        # ZeRO-3 gathers weights collectively: every rank must run the same number of generate calls.
        count = torch.tensor([len(chunks)], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        filler = chunks[-1] if chunks else [(-1, -1, "")]
        chunks += [filler] * (int(count) - len(chunks))
    model = engine.module
    model.eval()
    local: list[tuple[int, int, str]] = []
    start, done = time.perf_counter(), 0
    for number, chunk in enumerate(chunks):
        answers = generate_answers(model, collator, [c[2] for c in chunk], max_new_tokens=run.eval.max_new_tokens,
                                   device=device, synced_gpus=synced)
        if number < real:  # the rest are ZeRO-3 fillers
            local.extend((task, item, answer) for (task, item, _), answer in zip(chunk, answers))
        done += len(chunk)
        if (number + 1) % 10 == 0 or number + 1 == len(chunks):
            rate = done / (time.perf_counter() - start)
            _say(rank, f"{label} eval {done}/{len(rows)} items on rank 0, {rate:.1f} items/s")
    gathered: list = [None] * world
    dist.all_gather_object(gathered, local)
    if rank != 0:
        return {}
    by_task: dict[str, dict[int, str]] = {}
    for part in gathered:
        for task, item, answer in part:
            if task >= 0:
                by_task.setdefault(task_names[task], {})[item] = answer
    return {name: [answers[i] for i in sorted(answers)] for name, answers in by_task.items()}
