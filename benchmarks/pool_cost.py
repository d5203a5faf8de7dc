"""What a full SAPT-LoRA pool costs against one block and against plain (merged) LoRA, side by side.

    python benchmarks/pool_cost.py [--backbone embedded:tiny-t5] [--batch-size 16] [--seq-len 64]
                                   [--blocks 15] [--iters 10] [--threads 2]

Every variant sees the same backbone, batch and lengths, in one process:
  training   forward + backward + AdamW step (+ zero_grad) of SAPT-LoRA with 1 block and with
             ``--blocks`` blocks (blocks-1 frozen old ones, loaded from a saved state, plus the new
             one), and of one PEFT LoRA for reference; median step time and peak tensor memory.
  inference  greedy ``generate`` of ``--new-tokens`` tokens (forced: min = max) with the full pool,
             the 1-block pool, one unmerged PEFT LoRA and that LoRA merged into the base weights.
Variants are interleaved (one iteration of each in turn, every round) so that load drift on a
shared machine hits them alike; wall and process-CPU times are both reported (medians), ratios
also as the median of per-round ratios ("paired"), which the verdict uses. The issue's target:
full pool / 1 block <= 1.15x in training step time. On a shared machine pass ``--threads 1``:
with more threads than free cores, OpenMP waits inflate every time several-fold.

Peak memory is tensor bytes, not process RSS: the bytes held when the step starts (parameters,
buffers, optimizer state, inputs; shared storages once) plus the highest net allocation seen by
``torch.profiler(profile_memory=True)`` during one extra iteration. CPU tensor allocations are
invisible to tracemalloc, and RSS high-water marks are process-wide and monotonic.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from sapt.backbones import Backbone, load_backbone  # noqa: E402
from sapt.config import PetConfig  # noqa: E402
from sapt.methods.base import Stage  # noqa: E402
from sapt.methods.lora import new_lora  # noqa: E402
from sapt.methods.sapt import SaptArgs, SaptLora  # noqa: E402

TARGET_RATIO = 1.15
MiB = 2**20


# -- models ------------------------------------------------------------------------------------
def fresh(backbone: Backbone) -> Backbone:
    """A private copy: pool injection and PEFT both rewrite the model in place."""
    return Backbone(backbone.name, copy.deepcopy(backbone.model), backbone.tokenizer, backbone.is_encoder_decoder,
                    backbone.lora_targets, backbone.identity)


@torch.no_grad()
def _fill(parameters: list[torch.Tensor], generator: torch.Generator) -> None:
    for p in parameters:
        p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def sapt_lora(backbone: Backbone, pet: PetConfig, blocks: int, workdir: Path) -> tuple[SaptLora, nn.Module]:
    """SAPT-LoRA as the runner builds it for task ``blocks - 1``: a state folder holding blocks-1
    finished tasks (random non-zero blocks, keys and attention targets) is written through the
    method's own build/remember/save, one task at a time, and the last build loads it."""
    method = SaptLora(SaptArgs(), pet)
    generator = torch.Generator().manual_seed(blocks)
    state = None
    for task in range(blocks):
        stage = Stage(row=task, train_tasks=(task,), eval_tasks=tuple(range(task + 1)))
        model = method.build(fresh(backbone), state, stage)
        if task == blocks - 1:
            return method, model  # the new block as a task starts: A random, B zero
        layers = method.pooled_layers().values()
        _fill([t for layer in layers for t in (layer.lora_A, layer.lora_B)] + [model.router.new_key], generator)
        method.remember(model, task, torch.full((task + 1,), 1.0 / (task + 1)))
        state = workdir / f"{blocks}-blocks-after-task-{task}"
        method.save(model, state)
    raise ValueError("blocks must be >= 1")


def peft_lora(backbone: Backbone, pet: PetConfig, *, merged: bool) -> nn.Module:
    """One PEFT LoRA with random non-zero A and B; ``merged``: folded into the base weights."""
    model = new_lora(fresh(backbone), pet)
    generator = torch.Generator().manual_seed(0)
    _fill([p for name, p in model.named_parameters() if "lora_" in name], generator)
    return model.merge_and_unload() if merged else model


# -- inputs ------------------------------------------------------------------------------------
def make_batch(backbone: Backbone, batch_size: int, seq_len: int, target_len: int) -> dict[str, torch.Tensor]:
    """Random ordinary word-piece ids, no padding, an eos at the end of prompt and target."""
    tokenizer = backbone.tokenizer
    vocab = len(tokenizer)
    generator = torch.Generator().manual_seed(0)
    low = max(tokenizer.all_special_ids) + 1

    def ids(length: int) -> torch.Tensor:
        out = torch.randint(low, vocab, (batch_size, length), generator=generator)
        out[:, -1] = tokenizer.eos_token_id
        return out

    source, target = ids(seq_len), ids(target_len)
    if backbone.is_encoder_decoder:
        return {"input_ids": source, "attention_mask": torch.ones_like(source), "labels": target}
    sequence = torch.cat([source[:, :-1], target], dim=1)  # decoder-only: prompt then answer
    labels = torch.cat([torch.full_like(source[:, :-1], -100), target], dim=1)
    return {"input_ids": sequence, "attention_mask": torch.ones_like(sequence), "labels": labels}


# -- one iteration of each variant -------------------------------------------------------------
class TrainVariant:
    """Forward + backward + AdamW step on the trainable parameters, as the training loop does."""

    def __init__(self, name: str, model: nn.Module, loss: Callable[[dict], torch.Tensor], batch: dict):
        self.name, self.model, self.loss, self.batch = name, model, loss, batch
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4)

    def __call__(self) -> None:
        self.model.train()  # the generation variants share these models and leave them in eval mode
        self.loss(self.batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def resident(self) -> list[torch.Tensor]:
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return [*self.model.parameters(), *self.model.buffers(), *state, *self.batch.values()]


class GenerateVariant:
    """Greedy decoding of exactly ``new_tokens`` tokens for the batch's prompts."""

    def __init__(self, name: str, model: nn.Module, batch: dict, new_tokens: int, tokenizer):
        self.name, self.model, self.new_tokens = name, model, new_tokens
        self.inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        self.ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}

    def __call__(self) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model.generate(**self.inputs, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                do_sample=False, num_beams=1, **self.ids)

    def resident(self) -> list[torch.Tensor]:
        return [*self.model.parameters(), *self.model.buffers(), *self.inputs.values()]


def interleaved_times(variants: list, warmup: int, iters: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per iteration of each variant; every round runs each variant once,
    in turn. CPU time does not advance while the process waits for a core, so on a shared machine
    it is the steadier of the two (with one thread; OpenMP spin-waits add to it with more)."""
    times = {v.name: {"wall": [], "cpu": []} for v in variants}
    for round_ in range(warmup + iters):
        for variant in variants:
            wall, cpu = time.perf_counter(), time.process_time()
            variant()
            if round_ >= warmup:
                times[variant.name]["wall"].append(time.perf_counter() - wall)
                times[variant.name]["cpu"].append(time.process_time() - cpu)
    return times


def peak_tensor_bytes(variant) -> tuple[int, int]:
    """(bytes resident at the start of an iteration, peak bytes during it). See the module docstring.

    Two iterations run under the profiler and the second is measured: the first frees what the
    unprofiled ones left behind (the profiler cannot size a block allocated before it started).
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        variant()
        storages = {}
        for t in variant.resident():
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        with record_function("measured-iteration"):
            variant()
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == "measured-iteration")
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = sum(e.nbytes() for e in memory if e.start_ns() < window.start_ns())  # > 0 allocates, < 0 frees
    start = peak = live
    for event in memory:
        if window.start_ns() <= event.start_ns() <= window.end_ns():
            live += event.nbytes()
            peak = max(peak, live)
    resident = sum(storages.values())
    return resident, resident + peak - start


# -- report ------------------------------------------------------------------------------------
def spread(values: list[float]) -> float:
    """Inter-quartile range over the median."""
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return (q3 - q1) / statistics.median(values)


def ratio(times: dict, num: str, den: str, clock: str = "wall") -> float:
    return statistics.median(times[num][clock]) / statistics.median(times[den][clock])


def paired_ratio(times: dict, num: str, den: str) -> float:
    """Median of the per-round wall-time ratios: each pair ran back to back, under the same load."""
    return statistics.median(a / b for a, b in zip(times[num]["wall"], times[den]["wall"]))


def print_table(title: str, times: dict, memory: dict[str, tuple[int, int]], reference: str) -> None:
    print(f"\n{title} (ratios: vs {reference})")
    print(f"{'variant':<32}{'wall ms':>9}{'IQR':>6}{'ratio':>8}{'CPU ms':>9}{'ratio':>8}"
          f"{'resident MiB':>14}{'peak MiB':>10}")
    for name, clocks in times.items():
        wall, cpu = statistics.median(clocks["wall"]), statistics.median(clocks["cpu"])
        resident, peak = memory[name]
        print(f"{name:<32}{wall * 1e3:>9.1f}{spread(clocks['wall']):>6.0%}{ratio(times, name, reference):>7.3f}x"
              f"{cpu * 1e3:>9.1f}{ratio(times, name, reference, 'cpu'):>7.3f}x"
              f"{resident / MiB:>14.1f}{peak / MiB:>10.1f}")


def print_ratio(label: str, times: dict, num: str, den: str, extra: str = "") -> None:
    print(f"  {label:<38}{ratio(times, num, den):>7.3f}x wall ({paired_ratio(times, num, den):.3f}x paired), "
          f"{ratio(times, num, den, 'cpu'):.3f}x CPU{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="embedded:tiny-t5")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64, help="Prompt (encoder input) tokens.")
    parser.add_argument("--target-len", type=int, default=16, help="Answer tokens in training.")
    parser.add_argument("--new-tokens", type=int, default=16, help="Tokens generated per prompt.")
    parser.add_argument("--blocks", type=int, default=15, help="Pool size of the full pool.")
    parser.add_argument("--iters", type=int, default=10, help="Timed rounds (after --warmup rounds).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads.")
    args = parser.parse_args()
    if args.blocks < 2:
        parser.error("--blocks must be at least 2")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    setup = time.perf_counter()
    backbone = load_backbone(args.backbone)
    pet = PetConfig()  # the demo preset's r=8, alpha=32, no dropout
    batch = make_batch(backbone, args.batch_size, args.seq_len, args.target_len)
    full, one = f"SAPT-LoRA, {args.blocks} blocks", "SAPT-LoRA, 1 block"
    merged, unmerged = "PEFT LoRA, merged (no adapter)", "PEFT LoRA, unmerged"
    with tempfile.TemporaryDirectory(prefix="pool-cost-") as workdir:
        sapt_full = sapt_lora(backbone, pet, args.blocks, Path(workdir))
        sapt_one = sapt_lora(backbone, pet, 1, Path(workdir))
    old = next(iter(sapt_full[0].pooled_layers().values())).old_A
    assert old.shape[0] == (args.blocks - 1) * pet.lora_r and bool(old.abs().sum() > 0), "old blocks not loaded"

    def sapt_loss(method_model):
        method, model = method_model
        return lambda b: method.loss(model, b)[0]

    peft = peft_lora(backbone, pet, merged=False)
    train = [
        TrainVariant(full, sapt_full[1], sapt_loss(sapt_full), batch),
        TrainVariant(one, sapt_one[1], sapt_loss(sapt_one), batch),
        TrainVariant("PEFT LoRA (reference)", peft, lambda b: peft(**b).loss, batch),
    ]
    gen = [
        GenerateVariant(full, sapt_full[1], batch, args.new_tokens, backbone.tokenizer),
        GenerateVariant(one, sapt_one[1], batch, args.new_tokens, backbone.tokenizer),
        GenerateVariant(unmerged, peft, batch, args.new_tokens, backbone.tokenizer),
        GenerateVariant(merged, peft_lora(backbone, pet, merged=True), batch, args.new_tokens, backbone.tokenizer),
    ]

    setup = time.perf_counter() - setup
    load_before = os.getloadavg()
    start = time.perf_counter()
    train_times = interleaved_times(train, args.warmup, args.iters)
    gen_times = interleaved_times(gen, args.warmup, args.iters)
    seconds = time.perf_counter() - start
    load_after = os.getloadavg()
    train_memory = {v.name: peak_tensor_bytes(v) for v in train}
    gen_memory = {v.name: peak_tensor_bytes(v) for v in gen}

    print(f"backbone {args.backbone}, batch {args.batch_size}, prompt {args.seq_len} tokens, "
          f"answer {args.target_len} (train) / {args.new_tokens} generated, LoRA r={pet.lora_r} on "
          f"{backbone.lora_targets}, {args.threads} threads, {args.warmup} warm-up + {args.iters} timed rounds, "
          f"variants interleaved")
    print(f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} ({os.cpu_count()} CPUs, "
          f"{seconds:.0f}s timed, {setup:.0f}s set-up)")
    print_table("training step: forward + backward + AdamW", train_times, train_memory, one)
    print_table(f"inference: greedy generate, {args.new_tokens} new tokens", gen_times, gen_memory, merged)
    print("\ntimes: medians; IQR = inter-quartile range / median of the wall times; CPU = process CPU time")
    print("memory: tensor bytes, not process RSS; resident = parameters + buffers + optimizer state + inputs at the "
          "start of an iteration, peak = resident + the highest net allocation during one iteration "
          "(torch.profiler profile_memory)")

    print("\nratios (of medians; paired = median of per-round ratios)")
    print_ratio(f"train step  {args.blocks} blocks / 1 block", train_times, full, one,
                f"; peak memory {train_memory[full][1] / train_memory[one][1]:.3f}x")
    print_ratio(f"generate    {args.blocks} blocks / merged LoRA", gen_times, full, merged)
    print_ratio(f"generate    {args.blocks} blocks / unmerged LoRA", gen_times, full, unmerged)
    print_ratio(f"generate    {args.blocks} blocks / 1 block", gen_times, full, one)
    noise = max(spread(c["wall"]) for c in (*train_times.values(), *gen_times.values()))
    load = max(load_before[0], load_after[0])
    noisy = noise > 0.25 or load > (os.cpu_count() or 1)
    # The paired ratio is the verdict's: rounds that one variant happened to share with a busy
    # neighbour cancel out in it, not in a ratio of medians.
    step = paired_ratio(train_times, full, one)
    verdict = "meets" if step <= TARGET_RATIO else "MISSES"
    print(f"verdict{' (unreliable, see the warning)' if noisy else ''}: {verdict} the {TARGET_RATIO:.2f}x target: "
          f"a {args.blocks}-block pool's training step takes {step:.2f}x the wall time of a 1-block pool's "
          f"(paired; {ratio(train_times, full, one):.2f}x of medians, {ratio(train_times, full, one, 'cpu'):.2f}x CPU)")
    if noisy:
        print(f"warning: noisy timings (wall IQR up to {noise:.0%}, 1-min load up to {load:.1f} on {os.cpu_count()} "
              f"CPUs): other processes took CPU; with more threads than free cores OpenMP waits inflate every "
              f"time, so use --threads 1 on a shared machine, or rerun on a quiet one")


if __name__ == "__main__":
    main()
