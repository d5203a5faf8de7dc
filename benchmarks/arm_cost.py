"""What ARM costs: SAPT-LoRA against SeqLoRA on the same tasks, and ARM's generator before and after.

    python benchmarks/arm_cost.py --set data_dir=PATH/TO/CL_Benchmark [--config long-minilm]
        [--set KEY=VALUE ...] [--seed 42] [--output runs/arm-cost]

Three real `run_sequence` runs with one config (the `long-minilm` preset by default: four Long
Sequence tasks on `embedded:minilm-t5`), in this order:
- `seq-lora`: the wall time a plain sequence of LoRA tasks costs;
- `sapt-lora, whole prompts`: ARM's generator as it was before it stopped early, trained for every
  one of `generator_steps` on whole prompts (up to 128 tokens);
- `sapt-lora`: the defaults (the head of each prompt, steps until the loss stops falling).
Prints one row per run (AP, F.Ra, routing accuracy, wall time and its ratio to SeqLoRA's) and one per
SAPT stage (training, generator steps and seconds, pseudo sampling), and writes OUTPUT/arm-cost.md and
.json. A run whose results.json exists with the same config is kept, not rerun.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from compare_methods import keep_config, kept_results

from sapt.config import RunConfig, load_config
from sapt.errors import SaptError

BEFORE = ["method_args.generator_max_new_tokens=128", "method_args.generator_min_improvement=0"]
VARIANTS = {  # name -> (method, its overrides)
    "seq-lora": ("seq-lora", []),
    "sapt-lora, whole prompts": ("sapt-lora", BEFORE),
    "sapt-lora": ("sapt-lora", []),
}


def _config(args: argparse.Namespace, name: str) -> RunConfig:
    method, own = VARIANTS[name]
    folder = args.output / name.replace(", ", "-").replace(" ", "-")
    return load_config(args.config, [f"method={method}", "method_args={}", *args.set, *own, f"seed={args.seed}",
                                     f"output_dir={folder}", "mlflow.register_pool=false",
                                     f"mlflow.tracking_uri=sqlite:///{(args.output / 'mlflow.db').resolve()}"])


def _run(run: RunConfig, label: str) -> dict:
    from sapt.runner import run_sequence

    path, why = kept_results(run)
    if path is None:
        if why:
            print(f"arm-cost: {label}: rerunning ({why})", file=sys.stderr, flush=True)
            (Path(run.output_dir) / "results.json").unlink(missing_ok=True)
        print(f"arm-cost: {label}: started in {run.output_dir}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        path = run_sequence(run)
        keep_config(run)
        print(f"arm-cost: {label}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return json.loads(path.read_text())


def _number(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, dict]) -> str:
    base = results["seq-lora"]["seconds"]
    lines = ["| run | AP | F.Ra | routing acc. | wall (s) | wall / seq-lora's |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {_number(r['metrics']['AP'])} | {_number(r['metrics']['F.Ra'])} | "
                     f"{_number(r.get('routing_accuracy'))} | {r['seconds']:.0f} | {r['seconds'] / base:.2f}x |")
    lines += ["", "| run | stage | stage (s) | training (s) | generator steps | generator (s) | pseudo sampling (s) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for stage in r.get("timing", []):
            generator = stage.get("generator") or {}
            steps = f"{generator['steps']}/{generator['max_steps']}" if generator else "-"
            lines.append(f"| {name} | {stage['stage']} {'+'.join(stage['tasks'])} | {stage['seconds']:.0f} | "
                         f"{stage['train_seconds']:.0f} | {steps} | {_number(generator.get('seconds'), 0)} | "
                         f"{_number(stage.get('memory_seconds'), 0)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="long-minilm", help="a preset name or a YAML file")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", type=Path, default=Path("runs/arm-cost"))
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("SAPT_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.output.mkdir(parents=True, exist_ok=True)
    try:
        runs = {name: _config(args, name) for name in VARIANTS}  # every config first: a bad --set fails now
        results = {name: _run(run, name) for name, run in runs.items()}
    except SaptError as err:
        raise SystemExit(f"arm_cost: error: {err}") from None
    from sapt.cluster.session import shutdown_ray

    shutdown_ray()
    text = (f"`{args.config}` ({', '.join(results['seq-lora']['order'])}), seed {args.seed}; overrides: "
            f"{' '.join(args.set) or 'none'}\n\n" + table(results))
    (args.output / "arm-cost.md").write_text(text)
    (args.output / "arm-cost.json").write_text(json.dumps(
        {name: {k: r.get(k) for k in ("matrix", "metrics", "routing_accuracy", "seconds", "timing")}
         for name, r in results.items()}, indent=2))
    print(text)
    print((args.output / "arm-cost.md").resolve())


if __name__ == "__main__":
    main()
