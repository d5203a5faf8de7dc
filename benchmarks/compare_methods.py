"""Every continual-learning method on one benchmark and budget, one table like the SAPT paper's Table 1.

    python benchmarks/compare_methods.py [--config demo] [--set KEY=VALUE ...] [--method-set METHOD:KEY=VALUE ...]
        [--methods a,b,...] [--seeds 1,2] [--output runs/compare] [--tracking-uri URI]

Each method-seed is a real `run_sequence` (Ray Train workers, DeepSpeed, MLflow) with the same config,
`--set` overrides and seed; only the method changes, so the differences are the method's. Where a method
needs its own value of a shared knob (SAPT-Prompt's soft prompts learn at a larger lr than LoRA, as in
the paper's per-method settings), `--method-set METHOD:KEY=VALUE` applies to that method alone, after
the `--set` values, and the table's heading lists it. The FWT
reference (the method whose stages are all single-task references, `single`) runs first and every
other method measures FWT against it. Prints a markdown table of AP / F.Ra / FWT / BWT / routing or
selection accuracy / wall time (mean +- std over seeds), with a zero-shot row (the backbone untrained, `sapt
zero-shot`; `--no-zero-shot` leaves it out), writes OUTPUT/compare.md, OUTPUT/compare.json
(every accuracy matrix) and OUTPUT/figures/ (each run's matrix and shared-attention heatmaps), and logs a "compare-methods" MLflow run. A method-seed whose results.json
exists with the same config is kept, not rerun, so a half-finished table resumes where it stopped.
Where SAPT-LoRA is a row, the table ends with the paper's claims judged on it (benchmarks/paper_claims.py).

Rows beyond the methods: `--variant LABEL=METHOD:KEY=VALUE[;KEY=VALUE]` (a method with its own overrides,
e.g. `lfpt5-30=lfpt5:method_args.prompt_length=30`) and `--ablations` (SAPT-LoRA's Table 2: without ARM,
with real replay, without alignment, without shared attention). `--orders A,B` runs the whole table per
order (a named order, or `task+task+...`) into OUTPUT/ORDER/ (the paper's Table 8) and writes the table
over every order and seed to OUTPUT/compare.md (Table 1 averages its orders).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

from sapt.config import RunConfig, load_config
from sapt.errors import SaptError
from sapt.evaluation.metrics import cl_metrics
from sapt.methods import METHODS, build_method

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module below, however this one is loaded
from paper_claims import SAPT_LORA, claims_markdown  # noqa: E402

METRICS = ("AP", "F.Ra", "FWT", "BWT")
ZERO_SHOT = "zero-shot"  # the untrained backbone's row (not a method: nothing is trained)
CONFIG_FILE = "compare-config.json"  # beside results.json: the config that produced it (for resuming)
PROBE_TASKS = 3  # a method's stage layout does not depend on the number of tasks: probe it with a few
# Config keys that do not change what a run learns (the runner's resumable keys) plus the FWT
# reference's path, which only affects FWT and is recomputed here anyway.
UNCOMPARED = ("ray.", "mlflow.", "output_dir", "data_dir", "eval.batch_size", "single_results")
# What the zero-shot row never reads (nothing is trained): a change of the first row's method keeps it.
ZERO_SHOT_UNREAD = ("method", "pet.", "num_workers", "train.epochs", "train.batch_size", "train.grad_accum",
                    "train.lr", "train.weight_decay", "train.max_grad_norm", "train.zero_stage", "train.precision",
                    "train.log_every")


def reference_kinds(run: RunConfig) -> dict[str, str]:
    """Which methods are references, found from their stages, not their names.

    Returns:
        ``{method: "fwt"}`` for methods whose stages are all single-task references (FWT's baseline)
        and ``{method: "joint"}`` for methods with one stage training every task at once (the upper bound).
    """
    kinds: dict[str, str] = {}
    for name in METHODS:
        stages = build_method(name, {}, run.pet).stages(PROBE_TASKS)
        if stages and all(s.reference for s in stages):
            kinds[name] = "fwt"
        elif len(stages) == 1 and len(stages[0].train_tasks) == PROBE_TASKS:
            kinds[name] = "joint"
    return kinds


def method_overrides(name: str, sets: list[str]) -> list[str]:
    """The ``--set`` overrides for one method: all of them, less the ``method_args`` keys its Config lacks.

    That way one ``--set method_args.generator_steps=50`` shortens the generators of every method that
    has them and leaves the others alone; a key no method knows is still an error (a typo).
    """
    fields = METHODS[name].Config.model_fields
    kept = []
    for assignment in sets:
        key, _, value = assignment.partition("=")
        if key == "method_args":  # a whole mapping: split it into one assignment per key
            parsed = yaml.safe_load(value) or {}
            if not isinstance(parsed, dict):
                raise SaptError("must be a mapping", source=f"--set {assignment}")
            kept += [f"method_args.{k}={json.dumps(v)}" for k, v in parsed.items() if k in fields]
        elif key.startswith("method_args."):
            if key.split(".")[1] in fields:
                kept.append(assignment)
        else:
            kept.append(assignment)
    return kept


def per_method_sets(entries: list[str]) -> dict[str, list[str]]:
    """``--method-set METHOD:KEY=VALUE`` entries as method -> its ``KEY=VALUE`` overrides, in order.

    Raises:
        SaptError: an entry without ``METHOD:`` or ``=``, or a method not in ``METHODS``.
    """
    sets: dict[str, list[str]] = {}
    for entry in entries:
        method, colon, assignment = entry.partition(":")
        if not colon or "=" not in assignment:
            raise SaptError("expected METHOD:KEY=VALUE", source=f"--method-set {entry}")
        if method not in METHODS:
            raise SaptError(f"unknown method {method!r}; known: {', '.join(METHODS)}", source=f"--method-set {entry}")
        sets.setdefault(method, []).append(assignment)
    return sets


def check_method_args(sets: list[str]) -> None:
    """Raises SaptError for a ``method_args`` key that no method accepts."""
    known = {f for cls in METHODS.values() for f in cls.Config.model_fields}
    for assignment in sets:
        key, _, value = assignment.partition("=")
        keys = [key.split(".")[1]] if key.startswith("method_args.") else []
        if key == "method_args":
            parsed = yaml.safe_load(value) or {}
            keys = list(parsed) if isinstance(parsed, dict) else []
        for k in keys:
            if k not in known:
                raise SaptError("no method has this key", source=f"--set {assignment}", field=f"method_args.{k}")


# The SAPT paper's Table 2: SAPT-LoRA without ARM, with real replay instead of pseudo inputs, without
# the alignment of attention, without shared attention (sapt-method.md; method_args.ablation).
ABLATIONS = {f"sapt-lora-{a}": ("sapt-lora", [f"method_args.ablation={a}"])
             for a in ("no-arm", "replay", "no-alignment", "no-sa")}


def parse_variants(entries: list[str]) -> dict[str, tuple[str, list[str]]]:
    """``--variant LABEL=METHOD:KEY=VALUE[;KEY=VALUE...]`` entries as label -> (method, its overrides).

    Raises:
        SaptError: an entry without ``LABEL=METHOD``, a method not in ``METHODS``, or a label that is a method.
    """
    variants: dict[str, tuple[str, list[str]]] = {}
    for entry in entries:
        label, equals, rest = entry.partition("=")
        method, _, assignments = rest.partition(":")
        if not equals or not label or not method:
            raise SaptError("expected LABEL=METHOD:KEY=VALUE[;KEY=VALUE]", source=f"--variant {entry}")
        if method not in METHODS:
            raise SaptError(f"unknown method {method!r}; known: {', '.join(METHODS)}", source=f"--variant {entry}")
        if label in METHODS:
            raise SaptError("a variant's label must not be a method's name", source=f"--variant {entry}")
        sets = [a for a in assignments.split(";") if a]
        if any("=" not in a for a in sets):
            raise SaptError("expected LABEL=METHOD:KEY=VALUE[;KEY=VALUE]", source=f"--variant {entry}")
        variants[label] = (method, sets)
    return variants


def row_of(args: argparse.Namespace, label: str) -> tuple[str, list[str]]:
    """A row's method and its own overrides (a method's row: itself, none)."""
    return getattr(args, "rows", {}).get(label, (label, []))


def run_config(args: argparse.Namespace, name: str, seed: int, single: Path | None, tracking_uri: str) -> RunConfig:
    """The config of one row-seed: the shared config and budget, the row's method with default
    ``method_args`` (the config file's belong to its own method) and, for a variant, its own
    overrides last; its own output folder, no pool."""
    method, variant_sets = row_of(args, name)
    sets = [
        f"method={method}",
        "method_args={}",
        f"mlflow.tracking_uri={tracking_uri}",  # every run in the comparison's store; a --set may move them
        *method_overrides(method, args.set),
        *args.method_sets.get(method, []),  # this method's own values win
        *variant_sets,  # and a variant's over those
        f"seed={seed}",
        f"output_dir={run_dir(args.output, name, seed)}",
        f"single_results={single or ''}",
        "mlflow.register_pool=false",  # a comparison registers nothing
    ]
    return load_config(args.config, sets)


def run_dir(output: Path, name: str, seed: int) -> Path:
    return output / name / f"seed{seed}"


def _compared(run: RunConfig) -> dict[str, str]:
    """The run's config as flat ``key -> JSON value``, less the keys that do not change results."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and not prefix.startswith("method_args"):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif not prefix.startswith(UNCOMPARED):
            flat[prefix] = json.dumps(value, sort_keys=True)

    walk("", run.model_dump(mode="json"))
    return flat


def _per_method_arg(flat: dict[str, str]) -> dict[str, str]:
    """``method_args`` as one entry per key (the file keeps it whole), so that keys compare one by one."""
    flat = dict(flat)
    for key, value in json.loads(flat.pop("method_args", "{}")).items():
        flat[f"method_args.{key}"] = json.dumps(value, sort_keys=True)
    return flat


def _default_of(method: str, key: str) -> str | None:
    """The JSON of ``method_args.KEY``'s default for ``method``; None for any other key."""
    field = METHODS[method].Config.model_fields.get(key.removeprefix("method_args.")) \
        if key.startswith("method_args.") else None
    return None if field is None else json.dumps(field.get_default(call_default_factory=True), sort_keys=True)


def kept_results(run: RunConfig, file: str = "results.json", unread: tuple[str, ...] = ()) -> tuple[Path | None, str]:
    """``file`` (results.json) of an earlier run of this exact config (keys starting with one of
    ``unread`` aside), or None and why it cannot be kept."""
    folder = Path(run.output_dir)
    results, saved = folder / file, folder / CONFIG_FILE
    if not results.exists():
        return None, ""
    if not saved.exists():
        return None, f"{results} has no {CONFIG_FILE}"
    before, now = _per_method_arg(json.loads(saved.read_text())), _per_method_arg(_compared(run))
    # A method_args key added to the method since (at its default) does not change what was run.
    added_at_default = {k for k in set(now) - set(before) if now[k] == _default_of(run.method, k)}
    changed = sorted(k for k in (set(before) | set(now)) - added_at_default
                     if before.get(k) != now.get(k) and not k.startswith(unread))
    if changed:
        return None, "config changed: " + ", ".join(changed[:4])
    return results, ""


def keep_config(run: RunConfig) -> None:
    """Writes the run's compared config beside its results.json, for ``kept_results`` to check later."""
    (Path(run.output_dir) / CONFIG_FILE).write_text(json.dumps(_compared(run), indent=1))


def progress(message: str) -> None:
    print(f"compare: {message}", file=sys.stderr, flush=True)


def run_all(args: argparse.Namespace, names: list[str], seeds: list[int], fwt_reference: str | None,
            tracking_uri: str, tags: dict[str, str]) -> dict[str, dict[int, dict]]:
    """Runs (or keeps) every method-seed, the FWT reference first. Returns method -> seed -> results."""
    from sapt.runner import run_sequence

    # Every config first: a bad --set fails before hours of training, not after.
    planned = []
    for seed in seeds:
        single = None
        if fwt_reference is not None:
            single = (run_dir(args.output, fwt_reference, seed) / "results.json").resolve()
        for name in names:
            planned.append((name, seed, run_config(args, name, seed, None if name == fwt_reference else single,
                                                   tracking_uri)))
        if fwt_reference is not None and fwt_reference not in names:
            # Not asked for: FWT still works from an earlier run of the reference with this config.
            reference_run = run_config(args, fwt_reference, seed, None, tracking_uri)
            if kept_results(reference_run)[0] is None:
                progress(f"no {fwt_reference} run of seed {seed} in {args.output}: FWT stays empty")
                planned = [(n, s, r.model_copy(update={"single_results": ""}) if s == seed else r)
                           for n, s, r in planned]
    results: dict[str, dict[int, dict]] = {name: {} for name in names}
    for number, (name, seed, run) in enumerate(planned, start=1):
        label = f"[{number}/{len(planned)}] {name} seed {seed}"
        path, why = kept_results(run)
        if path is not None:
            progress(f"{label}: kept ({path})")
        else:
            if why:
                progress(f"{label}: rerunning ({why})")
                (Path(run.output_dir) / "results.json").unlink(missing_ok=True)
            progress(f"{label}: started in {run.output_dir}")
            started = time.perf_counter()
            path = run_sequence(run, run_tags=tags)
            keep_config(run)
            metrics = json.loads(path.read_text())["metrics"]
            progress(f"{label}: finished in {time.perf_counter() - started:.0f}s; "
                     + ", ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in metrics.items()))
        results[name][seed] = {**json.loads(path.read_text()), "results_path": str(path)}
    if fwt_reference is not None and fwt_reference not in names:
        for seed in seeds:
            path = kept_results(run_config(args, fwt_reference, seed, None, tracking_uri))[0]
            if path is not None:
                results.setdefault(fwt_reference, {})[seed] = {**json.loads(path.read_text()), "results_path": str(path)}
    return results


def zero_shot_rows(args: argparse.Namespace, seeds: list[int], tracking_uri: str, method: str) -> dict[int, dict]:
    """The bare backbone's scores per seed (``sapt zero-shot``) under ``method``'s config (only the
    shared keys matter: nothing is trained), kept when already there."""
    from sapt.cluster.zero_shot import run_zero_shot

    rows = {}
    for seed in seeds:
        run = run_config(args, method, seed, None, tracking_uri)
        run = run.model_copy(update={"output_dir": str(run_dir(args.output, ZERO_SHOT, seed))})
        path, why = kept_results(run, "zero_shot.json", unread=ZERO_SHOT_UNREAD)
        if path is None:
            progress(f"{ZERO_SHOT} seed {seed}: {'rerunning (' + why + ')' if why else 'started'}")
            path = run_zero_shot(run)
            keep_config(run)
        rows[seed] = json.loads(path.read_text())
    return rows


def columns_of(per_seed: dict) -> dict:
    """Each table column over the cells of ``per_seed`` (seeds, or order/seed pairs): mean, std, count."""
    columns = {}
    for column in (*METRICS, "routing", "seconds"):
        values = [m[column] for m in per_seed.values() if m[column] is not None]
        columns[column] = {"mean": statistics.fmean(values) if values else None,
                           "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}
    return columns


def summarise_zero_shot(rows: dict[int, dict]) -> dict:
    """The zero-shot row: AP is the mean score of the untrained backbone; nothing else is defined."""
    per_seed = {seed: {**dict.fromkeys(METRICS), "AP": r["mean"], "routing": None, "seconds": r["seconds"]}
                for seed, r in rows.items()}
    return {"reference": "zero-shot", "per_seed": per_seed, "columns": columns_of(per_seed)}


def summarise(results: dict[str, dict[int, dict]], kinds: dict[str, str | None], fwt_reference: str | None) -> dict:
    """Per method: its metrics per seed (recomputed against that seed's FWT reference) and mean/std."""
    singles = {seed: r["single"] for seed, r in results.get(fwt_reference, {}).items()} if fwt_reference else {}
    summary = {}
    for name, runs in results.items():
        per_seed = {}
        for seed, r in runs.items():
            metrics = cl_metrics(r["matrix"], singles.get(seed) or r.get("single"))
            if kinds.get(name) == "fwt" and r.get("single"):
                # A reference's last row is not one model: its AP is the mean of its per-task scores.
                metrics["AP"] = statistics.fmean(r["single"])
            per_seed[seed] = {**metrics, "routing": r.get("routing_accuracy"), "seconds": r.get("seconds")}
        summary[name] = {"reference": kinds.get(name), "per_seed": per_seed, "columns": columns_of(per_seed)}
    return summary


def cell(column: dict, digits: int = 1) -> str:
    if column["mean"] is None:
        return "-"
    text = f"{column['mean']:.{digits}f}"
    return text if column["std"] is None else f"{text} +- {column['std']:.{digits}f}"


def markdown(summary: dict, heading: str, fwt_reference: str | None) -> str:
    """The table: compared methods in the order given, then the references (marked)."""
    rows = [n for n, s in summary.items() if not s["reference"]] + [n for n, s in summary.items() if s["reference"]]
    lines = [heading, "",
             "| method | AP | F.Ra | FWT | BWT | routing / selection acc. | wall time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in rows:
        s = summary[name]
        label = {"fwt": f"{name} (reference: FWT)", "joint": f"{name} (reference: joint)",
                 "zero-shot": f"{name} (reference: the backbone untrained)"}.get(s["reference"], name)
        c = s["columns"]
        lines.append(f"| {label} | " + " | ".join(cell(c[m]) for m in METRICS)
                     + f" | {cell(c['routing'])} | {cell(c['seconds'], 0)} |")
    lines += ["", "Mean +- std over seeds (one seed: the value). FWT is against "
              + (f"`{fwt_reference}`, each task's single-task score" if fwt_reference else "nothing (no reference)")
              + "; the FWT reference's AP is the mean of its single-task scores. '-': not defined for the method."]
    if SAPT_LORA in summary:
        lines += ["", claims_markdown(summary, set(METHODS)).rstrip("\n")]
    return "\n".join(lines) + "\n"


def log_to_mlflow(tracking_uri: str, experiment: str, summary: dict, files: list[Path], params: dict[str, str],
                  tags: dict[str, str]) -> str:
    """One "compare-methods" run: each method's means as METHOD.AP etc., the table and JSON as artifacts."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name="compare-methods", tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = []
    for name, s in summary.items():
        for column, value in s["columns"].items():
            key = {"routing": "routing_accuracy"}.get(column, column)
            if value["mean"] is not None:
                metrics.append(Metric(f"{name}.{key}", value["mean"], now, 0))
            if value["std"] is not None:
                metrics.append(Metric(f"{name}.{key}_std", value["std"], now, 0))
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v[:6000]) for k, v in params.items()])
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


def ensure_experiment(tracking_uri: str, experiment: str, output: Path) -> None:
    """Creates the experiment up front so that every run's artifacts land in OUTPUT/mlartifacts
    (otherwise the first run's folder would hold everyone's)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if tracking_uri.startswith("sqlite:") and client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=(output / "mlartifacts").resolve().as_uri())


def compare_order(args: argparse.Namespace, names: list[str], seeds: list[int], kinds: dict[str, str | None],
                  fwt_reference: str | None, output: Path, sets: list[str]) -> dict:
    """One order's table: every row-seed run (or kept), the zero-shot row, OUTPUT/compare.md and
    compare.json, one "compare-methods" MLflow run. Returns what compare.json holds."""
    order_args = argparse.Namespace(**{**vars(args), "output": output, "set": sets})
    tracking_uri = comparison_store(args)
    output.mkdir(parents=True, exist_ok=True)
    base = run_config(order_args, names[0], seeds[0], None, tracking_uri)
    ensure_experiment(tracking_uri, base.mlflow.experiment, args.output)
    tags = {"sapt.compare": str(output.resolve())}  # on every run of the comparison
    results = run_all(order_args, names, seeds, fwt_reference, tracking_uri, tags)
    zero_shot = zero_shot_rows(order_args, seeds, tracking_uri, names[0]) if args.zero_shot else {}
    from sapt.cluster.session import shutdown_ray

    shutdown_ray()  # flush forwarded worker logs before the table
    summary = summarise(results, kinds, fwt_reference)
    if zero_shot:
        summary[ZERO_SHOT] = summarise_zero_shot(zero_shot)
    order = next(iter(next(iter(results.values())).values()))["order"]
    heading = (f"Methods compared on `{args.config}` ({len(order)} tasks: {', '.join(order)}; backbone "
               f"{base.backbone}), seeds {', '.join(map(str, seeds))}; overrides: "
               f"{' '.join([*sets, *args.method_set, *args.variant]) or 'none'}")
    table = markdown(summary, heading, fwt_reference)
    md, js = output / "compare.md", output / "compare.json"
    md.write_text(table)
    report = {
        "config": args.config, "overrides": sets, "method_overrides": args.method_sets,
        "variants": {label: list(row) for label, row in args.rows.items() if label not in METHODS},
        "seeds": seeds, "order": order, "backbone": base.backbone,
        "fwt_reference": fwt_reference, "summary": summary,
        "runs": {n: {str(seed): {k: r.get(k) for k in ("matrix", "single", "metrics", "routing_accuracy",
                                                       "seconds", "mlflow", "results_path")}
                     for seed, r in runs.items()} for n, runs in results.items()},
        ZERO_SHOT: {str(seed): r for seed, r in zero_shot.items()},
    }
    js.write_text(json.dumps(report, indent=2))
    figures = draw_figures(results, output)
    run_id = log_to_mlflow(tracking_uri, base.mlflow.experiment, summary, [md, js, *figures],
                           {"config": args.config, "overrides": json.dumps(sets),
                            "method_overrides": json.dumps(args.method_sets), "methods": ",".join(names),
                            "seeds": ",".join(map(str, seeds)), "order": json.dumps(order)}, tags)
    print(table)
    print(f"MLflow: run {run_id} (compare-methods) in {tracking_uri}", file=sys.stderr)
    return {**report, "table": table, "markdown_path": str(md)}


def draw_figures(results: dict[str, dict[int, dict]], output: Path) -> list[Path]:
    """OUTPUT/figures/: each row-seed's accuracy matrix and, for routed methods, its shared-attention
    heatmaps at test time and right after training each task (the paper's Figure 3)."""
    from sapt.evaluation.plots import attention_heatmap, matrix_heatmap

    folder = output / "figures"
    folder.mkdir(exist_ok=True)
    drawn = []
    for name, runs in results.items():
        for seed, r in runs.items():
            stem, order = f"{name}-seed{seed}", r["order"]
            drawn.append(matrix_heatmap(r["matrix"], order, folder / f"{stem}-matrix.png", f"{name}, seed {seed}"))
            if r.get("attention"):
                drawn.append(attention_heatmap(r["attention"], order, folder / f"{stem}-attention-test.png",
                                               f"{name}, seed {seed}: shared attention at test time"))
            if r.get("train_attention"):
                drawn.append(attention_heatmap(r["train_attention"], order, folder / f"{stem}-attention-train.png",
                                               f"{name}, seed {seed}: right after training each task"))
    return drawn


def comparison_store(args: argparse.Namespace) -> str:
    """The MLflow store of every run and table of the comparison (all orders share it)."""
    return args.tracking_uri or f"sqlite:///{(args.output / 'mlflow.db').resolve()}"


def over_orders(reports: dict[str, dict]) -> dict:
    """Per row, every metric over all (order, seed) cells: the paper's Table 1 averages its orders."""
    rows: dict[str, dict] = {}
    for report in reports.values():
        for name, s in report["summary"].items():
            row = rows.setdefault(name, {"reference": s["reference"], "per_seed": {}})
            for seed, metrics in s["per_seed"].items():
                row["per_seed"][f"{report['order_name']}/{seed}"] = metrics
    for row in rows.values():
        row["columns"] = columns_of(row["per_seed"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="a preset name or a YAML file")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every method (the budget)")
    parser.add_argument("--method-set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="KEY=VALUE for METHOD only, applied after --set")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated; default: every method")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=METHOD:KEY=VALUE[;KEY=VALUE]",
                        help="an extra row: METHOD with these overrides, e.g. lfpt5-30=lfpt5:method_args.prompt_length=30")
    parser.add_argument("--ablations", action="store_true",
                        help="add SAPT-LoRA's Table 2 rows: " + ", ".join(ABLATIONS))
    parser.add_argument("--orders", default="", help="comma-separated orders (a named one, or task+task+...), "
                        "one table each and one over all (Table 8 and Table 1); default: the config's order")
    parser.add_argument("--seeds", default="", help="comma-separated; default: the config's seed")
    parser.add_argument("--output", type=Path, default=Path("runs/compare"))
    parser.add_argument("--tracking-uri", default="", help="default: sqlite:///OUTPUT/mlflow.db")
    parser.add_argument("--zero-shot", action=argparse.BooleanOptionalAction, default=True,
                        help="add the untrained backbone's row (sapt zero-shot; default: yes)")
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("SAPT_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    names = [n for n in args.methods.split(",") if n]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    orders = [o for o in args.orders.split(",") if o]
    try:
        check_method_args(args.set)
        args.method_sets = per_method_sets(args.method_set)  # a malformed entry fails here, before any run
        variants = {**(ABLATIONS if args.ablations else {}), **parse_variants(args.variant)}
        args.rows = {**{n: (n, []) for n in names}, **variants}
        names += [label for label in variants if label not in names]
        base = load_config(args.config, [*method_overrides(names[0], args.set), "method_args={}",
                                         f"method={names[0]}"])
        seeds = [int(s) for s in args.seeds.split(",") if s] or [base.seed]
        method_kinds = reference_kinds(base)
        kinds = {label: method_kinds.get(row_of(args, label)[0]) if label in METHODS else None for label in names}
        fwt_reference = next((n for n, k in method_kinds.items() if k == "fwt"), None)
        names.sort(key=lambda n: n != fwt_reference)  # the FWT reference first; the rest keep their order
        for label in names:  # every row's config before any run: a bad variant fails in seconds
            run_config(args, label, seeds[0], None, "sqlite:///check.db")
        reports = {}
        for name in orders or [""]:
            output = args.output / name if name else args.output
            order = f"[{name.replace('+', ',')}]" if "+" in name else name  # an ad-hoc order: task+task+...
            sets = [*args.set, f"order={order}"] if name else list(args.set)
            reports[name or "config"] = {**compare_order(args, names, seeds, kinds, fwt_reference, output, sets),
                                         "order_name": name or "config"}
    except SaptError as err:
        raise SystemExit(f"compare_methods: error: {err}") from None
    if len(reports) > 1:
        heading = (f"Every order ({', '.join(reports)}) of `{args.config}`: mean +- std over each order and seed")
        table = markdown(over_orders(reports), heading, fwt_reference)
        md = args.output / "compare.md"
        md.write_text(table + "\n" + "\n".join(f"- {name}: {r['markdown_path']}" for name, r in reports.items()) + "\n")
        log_to_mlflow(comparison_store(args), base.mlflow.experiment, over_orders(reports), [md],
                      {"config": args.config, "orders": ",".join(reports), "seeds": ",".join(map(str, seeds))},
                      {"sapt.compare": str(args.output.resolve())})
        print(table)
    else:
        md = Path(next(iter(reports.values()))["markdown_path"])
    print(md.resolve())


if __name__ == "__main__":
    main()
