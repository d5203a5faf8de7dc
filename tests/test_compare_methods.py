"""benchmarks/compare_methods.py without training: which config each method-seed runs with."""

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from sapt.errors import SaptError

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "benchmarks" / "compare_methods.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def _args(tmp_path, sets=(), method_sets=()):
    return argparse.Namespace(config="demo", set=list(sets), method_set=list(method_sets),
                              method_sets=compare.per_method_sets(list(method_sets)), output=tmp_path)


def test_a_method_set_changes_that_method_alone_and_wins_over_the_shared_set(tmp_path):
    args = _args(tmp_path, sets=["train.lr=0.005"], method_sets=["sapt-prompt:train.lr=0.03",
                                                                 "sapt-prompt:method_args.router_lr=0.003"])
    prompt = compare.run_config(args, "sapt-prompt", 1, None, "sqlite:///x.db")
    lora = compare.run_config(args, "seq-lora", 1, None, "sqlite:///x.db")
    assert prompt.train.lr == 0.03 and prompt.method_args["router_lr"] == 0.003
    assert lora.train.lr == 0.005


@pytest.mark.parametrize("parse, entry, message", [
    (compare.per_method_sets, "sapt-prompt", "expected METHOD:KEY=VALUE"),
    (compare.per_method_sets, "sapt-prompt:train.lr", "expected METHOD:KEY=VALUE"),
    (compare.per_method_sets, "no-such-method:train.lr=1", "unknown method 'no-such-method'"),
    (compare.parse_variants, "fast", "expected LABEL=METHOD"),
    (compare.parse_variants, "fast=nope:train.lr=1", "unknown method 'nope'"),
    (compare.parse_variants, "seq-lora=sapt-lora:train.lr=1", "must not be a method's name"),
    (compare.parse_variants, "fast=sapt-lora:train.lr", "expected LABEL=METHOD"),
])
def test_malformed_method_sets_and_variants_are_refused_naming_the_entry(parse, entry, message):
    with pytest.raises(SaptError) as info:
        parse([entry])
    assert message in str(info.value) and entry in str(info.value)


def test_a_key_the_method_lacks_names_the_key(tmp_path):
    args = _args(tmp_path, method_sets=["seq-lora:method_args.router_lr=0.003"])
    with pytest.raises(SaptError) as info:
        compare.run_config(args, "seq-lora", 1, None, "sqlite:///x.db")
    assert "method_args.router_lr" in str(info.value)


def test_the_script_refuses_a_bad_method_set_before_any_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_methods.py"), "--method-set",
                           "nope:train.lr=1", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode != 0
    assert "--method-set nope:train.lr=1" in proc.stderr and "unknown method" in proc.stderr
    assert not (tmp_path / "out" / "mlflow.db").exists()


def test_the_zero_shot_row_has_the_untrained_backbones_mean_as_ap_and_nothing_else():
    rows = {1: {"mean": 20.0, "seconds": 8.0}, 2: {"mean": 30.0, "seconds": 9.0}}
    summary = {"seq-lora": {"reference": None, "per_seed": {}, "columns": {
        c: {"mean": 1.0, "std": None, "n": 1} for c in (*compare.METRICS, "routing", "seconds")}},
        compare.ZERO_SHOT: compare.summarise_zero_shot(rows)}
    line = next(x for x in compare.markdown(summary, "# t", None).splitlines() if x.startswith("| zero-shot"))
    assert line == "| zero-shot (reference: the backbone untrained) | 25.0 +- 7.1 | - | - | - | - | 8 +- 1 |"


def test_a_variant_runs_its_method_with_its_own_overrides_last(tmp_path):
    args = _args(tmp_path, method_sets=["sapt-lora:method_args.kl_weight=1", "sapt-lora:train.lr=0.01"])
    args.rows = {**compare.ABLATIONS, **compare.parse_variants(["fast=sapt-lora:train.lr=0.02;method_args.kl_weight=3"])}
    no_arm = compare.run_config(args, "sapt-lora-no-arm", 1, None, "sqlite:///x.db")
    fast = compare.run_config(args, "fast", 1, None, "sqlite:///x.db")
    assert no_arm.method == "sapt-lora" and no_arm.method_args["ablation"] == "no-arm"
    assert no_arm.method_args["kl_weight"] == 1 and no_arm.train.lr == 0.01
    assert fast.method_args["ablation"] == "none" and fast.method_args["kl_weight"] == 3 and fast.train.lr == 0.02
    assert no_arm.output_dir.endswith("sapt-lora-no-arm/seed1") and fast.output_dir.endswith("fast/seed1")


def test_the_table_over_orders_weighs_every_order_and_seed_alike():
    def report(name, aps):
        per_seed = {seed: {**dict.fromkeys(compare.METRICS), "AP": ap, "routing": None, "seconds": 1.0}
                    for seed, ap in enumerate(aps)}
        return {"order_name": name, "summary": {"sapt-lora": {"reference": None, "per_seed": per_seed}}}

    rows = compare.over_orders({"a": report("a", [10.0, 20.0]), "b": report("b", [60.0])})
    ap = rows["sapt-lora"]["columns"]["AP"]
    assert ap["mean"] == 30.0 and ap["n"] == 3 and sorted(rows["sapt-lora"]["per_seed"]) == ["a/0", "a/1", "b/0"]


def test_figures_draw_each_runs_matrix_and_the_attention_of_routed_methods_only(tmp_path):
    order = ["first-word", "last-word"]
    routed = {"order": order, "matrix": [[90.0, None], [80.0, 70.0]],
              "attention": [[1.0, 0.0], [0.2, 0.8]], "train_attention": [[1.0, None], [0.3, 0.7]]}
    results = {"sapt-lora": {1: routed}, "seq-lora": {1: {"order": order, "matrix": routed["matrix"],
                                                          "attention": None, "train_attention": None}}}
    drawn = compare.draw_figures(results, tmp_path)
    assert sorted(p.name for p in drawn) == ["sapt-lora-seed1-attention-test.png", "sapt-lora-seed1-attention-train.png",
                                             "sapt-lora-seed1-matrix.png", "seq-lora-seed1-matrix.png"]
    assert all(p.parent == tmp_path / "figures" and p.read_bytes()[:4] == b"\x89PNG" for p in drawn)


def _row(reference=None, **means):
    return {"reference": reference, "columns": {c: {"mean": means.get(c.replace(".", "")), "std": None, "n": 1}
                                                for c in ("AP", "F.Ra", "FWT", "BWT", "routing", "seconds")}}


def test_the_papers_claims_are_judged_on_the_means_with_the_numbers_beside():
    import paper_claims  # on sys.path since compare_methods loaded it

    summary = {"sapt-lora": _row(AP=60.0, FRa=3.0, FWT=-1.0, routing=80.0), "seq-lora": _row(AP=40.0, FRa=30.0),
               "replay": _row(AP=58.0, FRa=2.0), "l2p": _row(AP=35.0, FRa=5.0), "multitask": _row("joint", AP=61.5),
               "single": _row("fwt", AP=65.0), "sapt-lora-no-arm": _row(AP=30.0, FRa=14.0)}
    methods = {"sapt-lora", "seq-lora", "replay", "l2p", "multitask", "single"}  # the ablation is no method
    judged = paper_claims.check_claims(summary, methods)
    assert [(verdict, on) for _, verdict, on in judged] == [
        ("holds", "sapt-lora 60.0; best other: replay 58.0"),
        ("fails", "sapt-lora 3.0; lowest other: replay 2.0"),
        ("holds", "sapt-lora 60.0; multitask 61.5"),  # within 2 points
        ("fails", "sapt-lora-no-arm 14.0; sapt-lora 3.0"),  # 14 < 5 x 3
        ("not measured", "sapt-prompt -; best other: l2p 35.0"),
        ("fails", "sapt-lora -1.0"),
        ("reported", "sapt-lora 80.0%")]
    summary["sapt-lora-no-arm"] = _row(AP=30.0, FRa=15.0)
    summary["multitask"] = _row("joint", AP=62.5)
    verdicts = [verdict for _, verdict, _ in paper_claims.check_claims(summary, methods)]
    assert verdicts[2:4] == ["fails", "holds"]


def _finished_run(tmp_path, method: str, file: str):
    """A run of ``method`` (seed 1) whose ``file`` and compared config are on disk, and its folder."""
    run = compare.run_config(_args(tmp_path), method, 1, None, "sqlite:///x.db")
    folder = Path(run.output_dir)
    folder.mkdir(parents=True)
    (folder / file).write_text("{}")
    compare.keep_config(run)
    return run, folder


def test_a_kept_run_stays_kept_when_the_method_gains_a_key_at_its_default_and_not_when_a_value_changed(tmp_path):
    import json

    run, folder = _finished_run(tmp_path, "sapt-lora", "results.json")
    saved = json.loads((folder / compare.CONFIG_FILE).read_text())
    method_args = json.loads(saved["method_args"])
    del method_args["query_center"]  # a run kept before the key existed
    saved["method_args"] = json.dumps(method_args, sort_keys=True)
    (folder / compare.CONFIG_FILE).write_text(json.dumps(saved))
    assert compare.kept_results(run) == (folder / "results.json", "")
    changed = run.model_copy(update={"method_args": {**run.method_args, "query_center": "first-tasks"}})
    assert compare.kept_results(changed) == (None, "config changed: method_args.query_center")
    method_args["kl_weight"] = 0.5  # a value that differs from the run's
    saved["method_args"] = json.dumps(method_args, sort_keys=True)
    (folder / compare.CONFIG_FILE).write_text(json.dumps(saved))
    assert compare.kept_results(run) == (None, "config changed: method_args.kl_weight")


def test_the_zero_shot_row_is_kept_when_only_what_it_does_not_read_changes(tmp_path):
    """Nothing is trained for the zero-shot row: another first method (its method_args, learning
    rate, PET) keeps it; what it scores with (generation length, sizes) does not."""
    first, folder = _finished_run(tmp_path, "seq-lora", "zero_shot.json")
    other = compare.run_config(_args(tmp_path), "sapt-lora", 1, None, "sqlite:///x.db")
    other = other.model_copy(update={"output_dir": first.output_dir,
                                     "train": other.train.model_copy(update={"lr": 0.3})})
    assert compare.kept_results(other, "zero_shot.json")[0] is None  # a trained row compares everything
    assert compare.kept_results(other, "zero_shot.json", unread=compare.ZERO_SHOT_UNREAD) == \
        (folder / "zero_shot.json", "")
    longer = other.model_copy(update={"eval": other.eval.model_copy(update={"max_new_tokens": 7})})
    assert compare.kept_results(longer, "zero_shot.json", unread=compare.ZERO_SHOT_UNREAD) == \
        (None, "config changed: eval.max_new_tokens")
