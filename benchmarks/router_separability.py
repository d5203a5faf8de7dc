"""Can SAPT's router tell a stream's tasks apart at all? Its query input, probed without training SAPT.

    python benchmarks/router_separability.py --set data_dir=PATH/TO/CL_Benchmark [--config long-minilm]
        [--set order=long-3 --set KEY=VALUE ...] [--probe-items 200]

The shared attention reads only the max-pooled token embeddings of a prompt (sapt-method.md 1.1).
This pools the backbone's embeddings of each task's training prompts (the first --probe-items) and
its test prompts exactly as the router does (`train.max_source_len`, `method_args.masked_pooling`
of the run, sapt-lora's defaults unless set), then scores the test prompts two ways:
- a linear probe (multinomial logistic regression on the standardised pooled vectors): the best any
  router on this input could route, so a low routing accuracy with a high probe is the router's
  training, not its input;
- the nearest task mean by cosine: what one key per task aimed at the task's mean query gives with
  no training at all (what `method_args.key_init: inputs` starts from).
It also prints how much direction the tasks' mean pooled embeddings share (mean cosine between
two tasks' means), as pooled and less the midpoint of the first two tasks' means
(`method_args.query_center: first-tasks`).
Prints the accuracy of both, per task and over all. Nothing is trained but the probe (seconds).
"""

from __future__ import annotations

import argparse
import sys

import torch

from sapt.backbones import load_backbone
from sapt.config import load_config
from sapt.data.collate import Collator
from sapt.data.loading import load_tasks
from sapt.errors import SaptError
from sapt.pet.router import SharedAttention

PROBE_STEPS, PROBE_LR, BATCH = 500, 1e-2, 32


def pooled(backbone, router: SharedAttention, collator: Collator, sources: list[str]) -> torch.Tensor:
    """The router's query input for each prompt (its pooling of the raw token embeddings), uncentred."""
    embed = backbone.model.get_input_embeddings()
    out = []
    with torch.no_grad():
        for start in range(0, len(sources), BATCH):
            batch = collator.generation_batch(sources[start:start + BATCH])
            out.append(router.pooled(embed(batch["input_ids"]), batch["attention_mask"]).float())
    return torch.cat(out)


def mean_cosine_between_task_means(X: torch.Tensor, y: torch.Tensor, num_tasks: int) -> float:
    """How much of their direction the tasks' mean inputs share: 1 means the keys see one input."""
    means = torch.nn.functional.normalize(torch.stack([X[y == i].mean(0) for i in range(num_tasks)]), dim=1)
    off_diagonal = ~torch.eye(num_tasks, dtype=torch.bool)
    return float((means @ means.T)[off_diagonal].mean())


def linear_probe(train_X: torch.Tensor, train_y: torch.Tensor, num_tasks: int) -> torch.nn.Linear:
    probe = torch.nn.Linear(train_X.shape[1], num_tasks)
    optimizer = torch.optim.Adam(probe.parameters(), PROBE_LR)
    for _ in range(PROBE_STEPS):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(train_X), train_y).backward()
        optimizer.step()
    return probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="long-minilm")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE (data_dir, order, backbone, ...)")
    parser.add_argument("--probe-items", type=int, default=200, help="training prompts per task for the probe")
    args = parser.parse_args()
    try:
        run = load_config(args.config, [*args.set, "method=sapt-lora"])
        tasks = load_tasks(run.data_dir or None, run.order, max_train_per_task=run.max_train_per_task,
                           max_eval_per_task=run.max_eval_per_task, val_size=run.val_size, seed=run.seed)
    except SaptError as err:
        raise SystemExit(f"router_separability: error: {err}") from None
    torch.manual_seed(run.seed)
    backbone = load_backbone(run.backbone)
    collator = Collator.for_backbone(backbone, run.train.max_source_len, run.train.max_target_len,
                                     run.train.prompt_format)
    # Only its pooling is used: masked or over padding too, as the run's method_args say.
    router = SharedAttention(backbone.model.get_input_embeddings().weight.shape[1],
                             masked_pooling=run.method_args["masked_pooling"])
    train_X, train_y, test_X, test_y = [], [], [], []
    for index, task in enumerate(tasks):
        train = [e.source for e in task.train][:args.probe_items]
        test = [e.source for e in task.test]
        train_X.append(pooled(backbone, router, collator, train))
        test_X.append(pooled(backbone, router, collator, test))
        train_y += [index] * len(train)
        test_y += [index] * len(test)
        print(f"pooled {task.name}: {len(train)} train, {len(test)} test prompts", file=sys.stderr, flush=True)
    train_X, test_X = torch.cat(train_X), torch.cat(test_X)
    train_y, test_y = torch.tensor(train_y), torch.tensor(test_y)
    shared = mean_cosine_between_task_means(train_X, train_y, len(tasks))
    midpoint = (train_X[train_y == 0].mean(0) + train_X[train_y == 1].mean(0)) / 2 if len(tasks) > 1 else 0
    centred = mean_cosine_between_task_means(train_X - midpoint, train_y, len(tasks))
    mean, std = train_X.mean(0), train_X.std(0) + 1e-6
    train_X, test_X = (train_X - mean) / std, (test_X - mean) / std
    probed = linear_probe(train_X, train_y, len(tasks))(test_X).argmax(1)
    centres = torch.stack([train_X[train_y == i].mean(0) for i in range(len(tasks))])
    nearest = (torch.nn.functional.normalize(test_X, dim=1)
               @ torch.nn.functional.normalize(centres, dim=1).T).argmax(1)
    print(f"{run.backbone}, order {', '.join(t.name for t in tasks)}; {args.probe_items} train prompts per task")
    print(f"mean cosine between two tasks' mean pooled embeddings: {shared:.3f} as pooled, {centred:.3f} "
          f"less the first two tasks' midpoint (method_args.query_center: first-tasks)")
    print("| task | linear probe | nearest task mean |\n|---|---:|---:|")
    for index, task in enumerate(tasks):
        mine = test_y == index
        print(f"| {task.name} | {100 * float((probed[mine] == index).float().mean()):.1f} "
              f"| {100 * float((nearest[mine] == index).float().mean()):.1f} |")
    print(f"| all | {100 * float((probed == test_y).float().mean()):.1f} "
          f"| {100 * float((nearest == test_y).float().mean()):.1f} |")


if __name__ == "__main__":
    main()
