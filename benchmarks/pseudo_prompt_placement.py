"""Do ARM's pseudo prompts sit where their task's real prompts sit, in what the router reads?

    python benchmarks/pseudo_prompt_placement.py --generators RUN_ARTIFACTS/generators \
        --set data_dir=PATH/TO/CL_Benchmark [--config long-minilm] [--set order=long-3 --set KEY=VALUE ...]

ARM holds the router on each finished task's pseudo prompts (sapt-method.md 2.1). The router reads
a prompt's max-pooled token embeddings, and a max over fewer tokens is smaller: a pseudo prompt a
third as long as its task's prompts can pool like another task's. This samples each task's pseudo
prompts from a finished run's generators (GENERATORS/NN-task, the PEFT adapters a SAPT run logs
under `generators/`), with the run's seeds, twice: ending where the generator ends them
(`method_args.generator_lengths: free`, the authors') and cut to lengths drawn from the task's own
prompts (`real`). It places each prompt two ways, against the task's real training prompts
(`--probe-items` per task, pooled as the router pools them):
- nearest task mean by cosine, the task means less their mean (what a key aimed at each task sees);
- a linear probe on the standardised real prompts (router_separability.py).
Prints per task the mean token length and the share placed on the task itself. Nothing is trained
but the probe; the generators must have been trained on this backbone with this order's warm-up.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from peft import PeftModel

sys.path.insert(0, str(Path(__file__).parent))
from router_separability import linear_probe, pooled  # noqa: E402

from sapt.backbones import load_backbone  # noqa: E402
from sapt.cluster.pseudo import pseudo_seed, sampling_batches  # noqa: E402
from sapt.config import load_config  # noqa: E402
from sapt.data.collate import Collator  # noqa: E402
from sapt.data.loading import load_tasks  # noqa: E402
from sapt.errors import SaptError  # noqa: E402
from sapt.methods import build_method  # noqa: E402
from sapt.methods.pseudo_generator import generator_collator, prompt_lengths, sample_prompts  # noqa: E402
from sapt.pet.router import SharedAttention  # noqa: E402

MODES = ("free", "real")


def sample_as_the_run(model, writer, count: int, settings, seed: int, lengths: list[int]) -> list[str]:
    """The prompts generate_pseudo_prompts writes for ``seed`` (its sampling batches and their seeds)."""
    prompts = [p for batch in sampling_batches(seed, count)
               for p in sample_prompts(model, writer, batch["count"], settings, seed=batch["seed"], lengths=lengths)]
    return [p for p in prompts if p.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generators", type=Path, required=True, help="folder of NN-task generator adapters")
    parser.add_argument("--config", default="long-minilm")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE, as the run had them")
    parser.add_argument("--probe-items", type=int, default=200, help="real training prompts per task")
    args = parser.parse_args()
    try:
        run = load_config(args.config, [*args.set, "method=sapt-lora"])
        tasks = load_tasks(run.data_dir or None, run.order, max_train_per_task=run.max_train_per_task,
                           max_eval_per_task=run.max_eval_per_task, val_size=run.val_size, seed=run.seed)
        if not args.generators.is_dir():
            raise SaptError("no such folder", source=str(args.generators))
    except SaptError as err:
        raise SystemExit(f"pseudo_prompt_placement: error: {err}") from None
    torch.manual_seed(run.seed)
    names = [t.name for t in tasks]
    spec = build_method("sapt-lora", run.method_args, run.pet).memory()
    backbone = load_backbone(run.backbone, data_dir=run.data_dir or None, exclude_tasks=names)
    collator = Collator.for_backbone(backbone, run.train.max_source_len, run.train.max_target_len,
                                     run.train.prompt_format)
    router = SharedAttention(backbone.model.get_input_embeddings().weight.shape[1],
                             masked_pooling=run.method_args["masked_pooling"])
    real = [pooled(backbone, router, collator, [e.source for e in t.train][:args.probe_items]) for t in tasks]
    X = torch.cat(real)
    y = torch.cat([torch.full((len(r),), i) for i, r in enumerate(real)])
    task_means = torch.stack([r.mean(0) for r in real])
    center = task_means.mean(0)
    keys = torch.nn.functional.normalize(task_means - center, dim=1)
    mean, std = X.mean(0), X.std(0) + 1e-6
    probe = linear_probe((X - mean) / std, y, len(tasks))

    writer = generator_collator(backbone, spec.generator)
    totals = {mode: [0, 0, 0] for mode in MODES}
    print(f"{run.backbone}, order {', '.join(names)}; generators {args.generators}")
    print("| task | real length | free: length, nearest, probe | real: length, nearest, probe |\n|---|---:|---|---|")
    for index, task in enumerate(tasks):
        folder = args.generators / f"{index + 1:02d}-{task.name}"
        if not folder.is_dir():
            continue  # the last task has no generator: nothing comes after it
        model = PeftModel.from_pretrained(load_backbone(run.backbone, data_dir=run.data_dir or None,
                                                        exclude_tasks=names).model, str(folder)).eval()
        lengths = prompt_lengths(writer, [e.source for e in task.train])
        count = spec.count(len(task.train))
        cells = []
        for mode in MODES:
            prompts = sample_as_the_run(model, writer, count, replace(spec.generator, lengths=mode),
                                        pseudo_seed(run.seed, index), lengths if mode == "real" else [])
            P = pooled(backbone, router, collator, prompts)
            nearest = int(((torch.nn.functional.normalize(P - center, dim=1) @ keys.T).argmax(1) == index).sum())
            probed = int((probe((P - mean) / std).argmax(1) == index).sum())
            for k, v in enumerate((nearest, probed, len(prompts))):
                totals[mode][k] += v
            mean_length = sum(prompt_lengths(writer, prompts)) / len(prompts)
            cells.append(f"{mean_length:.0f} tok, {100 * nearest / len(prompts):.0f}%, {100 * probed / len(prompts):.0f}%")
        print(f"| {task.name} | {sum(lengths) / len(lengths):.0f} tok | {cells[0]} | {cells[1]} |", flush=True)
    cells = [f"{100 * n / max(c, 1):.0f}%, {100 * p / max(c, 1):.0f}%" for n, p, c in totals.values()]
    print(f"| all | | nearest, probe: {cells[0]} | nearest, probe: {cells[1]} |")


if __name__ == "__main__":
    main()
