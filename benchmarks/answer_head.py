"""What computing a decoder-only backbone's vocabulary head only for the answer saves, side by side.

    python benchmarks/answer_head.py [--backbone embedded:smollm2-135m] [--data-dir DIR --task NAME]
                                     [--batch-size 8] [--max-source-len 256] [--iters 5] [--threads 2]

One PEFT LoRA training step (forward, backward, AdamW step) on the same batch, twice per round:
with the hook that ``load_backbone`` installs (``sapt/backbones/answer_head.py``: logits from the
position before the first answer token on) and with every position's logits (the caller passes
``logits_to_keep=0``, which the hook leaves alone). Rounds alternate the two so that load drift on a
shared machine hits both alike; the ratio is the median of per-round ratios. The batch is real task
prompts when ``--data-dir`` and ``--task`` are given (e.g. ../shared/benchmarks/CL_Benchmark, yelp),
else the embedded benchmark's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from sapt.backbones import load_backbone  # noqa: E402
from sapt.config import PetConfig  # noqa: E402
from sapt.data.collate import Collator  # noqa: E402
from sapt.data.loading import load_tasks  # noqa: E402
from sapt.methods.lora import new_lora  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="embedded:smollm2-135m")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--task", default="first-word")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-source-len", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    backbone = load_backbone(args.backbone)
    if backbone.is_encoder_decoder:
        raise SystemExit(f"{args.backbone} is encoder-decoder: its decoder computes the head for answers only already")
    (task,) = load_tasks(args.data_dir or None, [args.task], max_train_per_task=args.batch_size,
                         max_eval_per_task=1, val_size=0, seed=0)
    examples = task.train[: args.batch_size]
    collator = Collator(backbone.tokenizer, False, args.max_source_len, max_target_len=16)
    batch = collator.train_batch([e.source for e in examples], [e.target for e in examples])
    model = new_lora(backbone, PetConfig())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(**extra) -> float:
        start = time.perf_counter()
        loss = model(**batch, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(), step(logits_to_keep=0)  # warm-up
    answer_only, every_position = [], []
    for _ in range(args.iters):
        answer_only.append(step())
        every_position.append(step(logits_to_keep=0))
    ratio = statistics.median(w / a for w, a in zip(every_position, answer_only))
    length, answer = batch["input_ids"].shape[1], int((batch["labels"] != -100).sum(1).max())
    print(f"{args.backbone}, task {task.name}: batch {len(examples)} x {length} tokens (answers up to {answer}), "
          f"vocabulary {backbone.model.config.vocab_size}, {args.threads} threads, {args.iters} rounds")
    print(f"  head for the answer only : {statistics.median(answer_only):.3f} s/step (median)")
    print(f"  head at every position   : {statistics.median(every_position):.3f} s/step (median)")
    print(f"  every position / answer only: {ratio:.2f}x (median of per-round ratios)")


if __name__ == "__main__":
    main()
