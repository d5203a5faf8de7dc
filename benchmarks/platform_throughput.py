"""Training throughput of the platform path against a plain PyTorch + PEFT loop, side by side.

    python benchmarks/platform_throughput.py [--backbone embedded:tiny-t5] [--examples 800] [--batch 16]

Both sides train the same LoRA on the same backbone, data, batch size and sequence lengths.
Prints tokens/s (last of 3 epochs) of (a) a single-process loop (all threads and 1 thread), (b) Ray
Train + DeepSpeed with 1 worker and with N workers (aggregate), their ratios, and the fixed costs
of a run: Ray start, the first stage's (which starts the sequence's one worker group) and each
later stage's (DeepSpeed, data pipeline, checkpoints, evaluation of 8 items per task: stage wall
time not spent in training epochs).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from sapt.backbones import load_backbone  # noqa: E402
from sapt.config import load_config  # noqa: E402
from sapt.data.collate import Collator  # noqa: E402
from sapt.data.loading import load_tasks  # noqa: E402
from sapt.methods.lora import new_lora  # noqa: E402


def plain_loop(run, examples, threads: int) -> float:
    """Single-process PyTorch + PEFT: the loop a user would write by hand. Returns tokens/s of the
    last of ``run.train.epochs`` passes (the first pays one-off allocation costs)."""
    torch.set_num_threads(threads)
    torch.manual_seed(run.seed)
    backbone = load_backbone(run.backbone)
    model = new_lora(backbone, run.pet)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.train.lr)
    collator = Collator(backbone.tokenizer, backbone.is_encoder_decoder, run.train.max_source_len,
                        run.train.max_target_len)
    size = run.train.batch_size
    batches = [collator.train_batch([e.source for e in examples[i : i + size]], [e.target for e in examples[i : i + size]])
               for i in range(0, len(examples), size)]
    for _ in range(run.train.epochs):
        tokens, start = 0, time.perf_counter()
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), run.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] >= 0).sum())
    return tokens / (time.perf_counter() - start)


def platform(run, tasks, workers: int) -> tuple[float, float, list[float]]:
    """A SeqLoRA sequence over ``tasks`` through Ray Train + DeepSpeed: one worker group, a stage per
    task. Returns (aggregate tokens/s of the first stage's last epoch, the first stage's overhead
    (worker-group start-up included), the later stages' overheads). Overhead: stage wall time not
    spent in training epochs (process group and DeepSpeed set-up, Ray Data, checkpoints, evaluation)."""
    from sapt.cluster.trainer import SequenceTrainer
    from sapt.methods import build_method

    run = run.model_copy(update={"num_workers": workers})
    stages = build_method("seq-lora", {}, run.pet).stages(len(tasks))
    name = f"bench-{workers}w-{int(time.time())}"
    overheads, state, aggregate = [], None, 0.0
    start = time.perf_counter()  # the group starts on entering the block
    with SequenceTrainer(run, tasks, storage_path=f"{run.output_dir}/ray", name=name, first=0, keep_as=name) as trainer:
        for number, stage in enumerate(stages):
            result = trainer.run_stage(number, stage, init_state=state)
            state = result.checkpoint_path
            wall, start = time.perf_counter() - start, time.perf_counter()
            overheads.append(wall - sum(e["seconds"] for e in result.history))
            if number == 0:  # the last epoch, as for the plain loop
                # Each worker trained on 1/workers of the data in about the same time: aggregate = per worker x N.
                aggregate = result.history[-1]["tokens_per_second"] * workers
    return aggregate, overheads[0], overheads[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="embedded:tiny-t5")
    parser.add_argument("--examples", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stages", type=int, default=3, help="tasks of the platform's sequence (2-4)")
    args = parser.parse_args()
    order = ["first-word", "last-word", "second-word", "word-before-last"][: max(2, min(4, args.stages))]
    run = load_config("demo", [f"backbone={args.backbone}", f"train.batch_size={args.batch}", "train.epochs=3",
                               f"max_train_per_task={args.examples}", "max_eval_per_task=8",
                               "output_dir=runs/bench", f"order=[{','.join(order)}]"])
    tasks = load_tasks(None, run.order, max_train_per_task=args.examples, max_eval_per_task=8,
                       val_size=run.val_size, seed=run.seed)
    examples = tasks[0].train

    plain_one = plain_loop(run, examples, threads=1)
    plain = plain_loop(run, examples, threads=os.cpu_count() or 1)
    torch.set_num_threads(os.cpu_count() or 1)

    from sapt.cluster.session import ensure_ray

    start = time.perf_counter()
    ensure_ray("", num_workers=args.workers, cpus_per_worker=1.0, use_gpu=False)
    ray_start = time.perf_counter() - start
    one, first_one, later_one = platform(run, tasks, 1)
    many, first_many, later_many = platform(run, tasks, args.workers)

    print(f"backbone {run.backbone}, {len(examples)} examples, batch {args.batch}/worker, {os.cpu_count()} CPUs")
    print(f"{'path':<38}{'tokens/s':>10}{'vs plain':>10}")
    print(f"{f'plain PyTorch + PEFT, {os.cpu_count()} threads':<38}{plain:>10,.0f}{1.0:>10.2f}")
    print(f"{'plain PyTorch + PEFT, 1 thread':<38}{plain_one:>10,.0f}{plain_one / plain:>10.2f}")
    # Ray gives each worker OMP_NUM_THREADS = its CPUs (1 here): compare 1 worker with 1 thread.
    print(f"{'Ray Train + DeepSpeed, 1 worker (1 CPU)':<38}{one:>10,.0f}{one / plain:>10.2f}")
    print(f"{f'Ray Train + DeepSpeed, {args.workers} workers':<38}{many:>10,.0f}{many / plain:>10.2f}")
    print(f"start-up: local Ray {ray_start:.1f}s; first stage, worker group included: {first_one:.1f}s with 1 worker, "
          f"{first_many:.1f}s with {args.workers}")
    print(f"per later stage (same worker group; DeepSpeed, data, checkpoints, evaluation): "
          f"{', '.join(f'{x:.1f}' for x in later_one)}s with 1 worker, "
          f"{', '.join(f'{x:.1f}' for x in later_many)}s with {args.workers}")


if __name__ == "__main__":
    main()
