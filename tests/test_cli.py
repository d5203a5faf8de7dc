"""The `sapt` command as users call it: exit codes, messages, machine-readable output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_in_process import run_cli


def sapt_process(*args, cwd=None):
    """`sapt` as its own process: for the cases that get as far as starting Ray."""
    return subprocess.run([sys.executable, "-m", "sapt.cli", *args], capture_output=True, text=True, cwd=cwd)


sapt = run_cli  # in this process: these cases stop before Ray or MLflow start


def test_metrics_prints_the_metrics_object(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"matrix": [[80, None], [40, 90]], "single": [70, 100]}))
    out = sapt("metrics", str(path))
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    # AP (40+90)/2; F.Ra 80-40; FWT ((80-70)+(90-100))/2; BWT 40-80
    assert metrics == {"AP": 65.0, "F.Ra": 40.0, "FWT": 0.0, "BWT": -40.0}


def test_metrics_on_a_malformed_file_exits_2(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("{not json")
    out = sapt_process("metrics", str(path))  # the real process: its exit status
    assert out.returncode == 2
    assert "m.json" in out.stderr and "Traceback" not in out.stderr


def _write_task(root: Path, name: str, instances):
    folder = root / "Long_Sequence" / name
    folder.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (folder / f"{split}.json").write_text(json.dumps({"Definition": ["Say yes or no."], "Instances": instances}))


@pytest.mark.parametrize(
    "case, overrides, expected",
    [
        ("missing data folder", ["data_dir=/no/such/folder", "order=[sst2]"], "/no/such/folder"),
        ("unknown task", ["data_dir={data}", "order=[good,nosuchtask]"], "nosuchtask"),
        ("malformed json", ["data_dir={data}", "order=[good,broken]"], "broken"),
        ("empty task", ["data_dir={data}", "order=[good,empty]"], "empty"),
        ("unknown method", ["method=magic"], "method"),
        ("unknown backbone", ["backbone=embedded:nope"], "backbone"),
        ("unknown key", ["trian.epochs=2"], "trian"),
        ("epi on a task without a label set", ["data_dir={data}", "order=[good]", "method=epi"],
         "config: order: epi identifies a task by its classes, and task(s) good have no label set"),
    ],
)
def test_bad_input_exits_2_naming_the_culprit_and_registers_nothing(tmp_path, case, overrides, expected):
    data = tmp_path / "bench"
    _write_task(data, "good", [{"input": f"q{i}", "output": "yes"} for i in range(30)])
    _write_task(data, "empty", [])
    (data / "Long_Sequence" / "broken").mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (data / "Long_Sequence" / "broken" / f"{split}.json").write_text('{"Instances": [')
    out_dir = tmp_path / "out"
    args = [o.format(data=data) for o in overrides] + [f"output_dir={out_dir}", "val_size=5"]
    out = sapt("run", "demo", *[x for a in args for x in ("--set", a)])
    assert out.returncode == 2, (case, out.stderr[-2000:])
    assert expected in out.stderr, (case, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    assert not (out_dir / "mlflow.db").exists()
    assert out.stdout == ""


@pytest.mark.parametrize(
    "override, expected",
    [("ray.address=127.0.0.1:1", "ray.address"), ("mlflow.tracking_uri=http://127.0.0.1:1", "mlflow.tracking_uri")],
)
def test_unreachable_services_exit_2_without_registering(tmp_path, override, expected):
    out_dir = tmp_path / "out"
    out = sapt_process("run", "demo", "--set", override, "--set", f"output_dir={out_dir}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert expected in out.stderr and "Traceback" not in out.stderr
    assert not (out_dir / "mlflow.db").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--resume", "--set", "mlflow.register_pool=false"], "mlflow.register_pool: --resume continues from the pool versions"),
        (["--set", "method=sapt-lora", "--set", "mlflow.pool_name=no spaces"], "mlflow.pool_name"),
    ],
)
def test_registry_settings_that_cannot_work_exit_2_before_anything_runs(tmp_path, args, expected):
    out_dir = tmp_path / "out"
    out = sapt("run", "demo", "--set", f"output_dir={out_dir}", *args)
    assert out.returncode == 2, out.stderr[-2000:]
    assert expected in out.stderr and "Traceback" not in out.stderr
    assert not (out_dir / "mlflow.db").exists()


def test_a_resume_with_a_changed_config_is_refused_naming_the_key(tmp_path):
    from mlflow.tracking import MlflowClient

    from sapt.config import load_config
    from sapt.registry.tracking import SequenceTracker

    run = load_config("demo-sapt", ["order=[first-word,last-word]"])
    tracker = SequenceTracker("", "sapt", tmp_path, run.model_dump(mode="json"), ["first-word", "last-word"])
    changed = run.model_copy(update={"train": run.train.model_copy(update={"lr": 0.5})})
    with pytest.raises(Exception, match=r"train.lr \(0.003 -> 0.5\); resume with its config"):
        SequenceTracker("", "sapt", tmp_path, changed.model_dump(mode="json"), ["first-word", "last-word"],
                        resume_run_id=tracker.run_id)
    moved = run.model_copy(update={"output_dir": "elsewhere", "ray": run.ray.model_copy(update={"address": "auto"})})
    again = SequenceTracker("", "sapt", tmp_path, moved.model_dump(mode="json"), ["first-word", "last-word"],
                            resume_run_id=tracker.run_id)
    assert again.run_id == tracker.run_id
    assert MlflowClient(tracker.uri).get_run(tracker.run_id).info.status == "RUNNING"


@pytest.mark.parametrize("command", [["run"], ["submit", "--address", "http://127.0.0.1:1"], ["sweep", "--samples", "2"]])
@pytest.mark.parametrize(
    "config, setting, expected",
    [
        ("demo-sapt", "method_args.kl_wieght=2", "method_args.kl_wieght: unknown key for method sapt-lora"),
        ("demo-sapt", "method_args.kl_weight=-1", "method_args.kl_weight: Input should be greater than or equal to 0"),
        ("demo", "method_args.memory_fraction=0.1", "method_args.memory_fraction: unknown key for method seq-lora"),
        ("demo", "method=replay --set method_args.memory_fraction=2", "method_args.memory_fraction: Input should be"),
    ],
)
def test_a_bad_method_args_value_exits_2_in_one_line_before_anything_starts(tmp_path, command, config, setting,
                                                                              expected):
    out_dir = tmp_path / "out"
    sets = [x for part in setting.split(" --set ") for x in ("--set", part)]
    out = sapt(command[0], config, *command[1:], *sets, "--set", f"output_dir={out_dir}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert not out_dir.exists() and out.stdout == ""


def test_method_args_come_back_with_every_default_for_the_run_and_the_registry():
    from sapt.config import load_config

    assert load_config("demo", ["method=o-lora"]).method_args == {"lambda_1": 0.5, "lambda_2": 0.0}
    assert load_config("inc-lora").method_args == {"lambda_1": 0.0, "lambda_2": 0.0}
    assert load_config("demo", ["method=replay"]).method_args == {"memory_fraction": 0.02}
    assert load_config("demo").method_args == {}
