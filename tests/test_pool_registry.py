"""The MLflow pool registry against a real MLflow: a sqlite store, and once a real `mlflow server`.

A 2-task SAPT state is built without training (as in test_sapt_pool), registered after each task,
and loaded back through `models:/` URIs: the loaded pool must answer exactly as the in-memory model did.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from cli_in_process import run_cli
from mlflow.tracking import MlflowClient
from peft import PeftModel
from safetensors.torch import load_file, save_file

from sapt.backbones import load_backbone
from sapt.config import PetConfig
from sapt.data.collate import Collator
from sapt.errors import SaptError
from sapt.evaluation.generate import generate_answers
from sapt.methods import build_method
from sapt.methods.base import Stage
from sapt.registry import pool_store
from sapt.registry.pool_store import Generation, blocks_model, state_model

BACKBONE = "embedded:tiny-t5"
PET = PetConfig(lora_r=4, lora_alpha=8)
GEN = Generation(max_source_len=64, max_target_len=16, max_new_tokens=6, batch_size=8)
ORDER = ["alpha", "beta"]
INPUTS = ["copy the first word: red blue", "name the last word here: green", "what is the color of the sky"]


def _batch(backbone):
    tok = backbone.tokenizer
    enc = tok(INPUTS[:2], padding=True, return_tensors="pt")
    labels = tok(["red", "green"], padding=True, return_tensors="pt")["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def _finish_task(method, model, batch, task, seed):
    """A stand-in for training a task: move every trainable weight (enough to change answers), store the target."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    model.eval()
    method.remember(model, task, method.attention(model, batch).mean(dim=0))


def _predict(model, backbone):
    collator = Collator(backbone.tokenizer, backbone.is_encoder_decoder, GEN.max_source_len, GEN.max_target_len)
    answers = generate_answers(model, collator, INPUTS, max_new_tokens=GEN.max_new_tokens, device=torch.device("cpu"))
    batch = collator.generation_batch(INPUTS)
    with torch.no_grad():
        weights = model.block_weights(batch["input_ids"], batch["attention_mask"])
    return answers, weights


def _sequence(name, root: Path, method_args=None):
    """Two finished tasks: state folders and in-memory predictions after each."""
    backbone = load_backbone(BACKBONE)
    method = build_method(name, method_args or {}, PET)
    batch = _batch(backbone)
    first = method.build(backbone, None, Stage(0, (0,), (0,)))
    _finish_task(method, first, batch, 0, seed=1)
    method.save(first, root / "one")
    after = [_predict(first, backbone)]
    second_backbone = load_backbone(BACKBONE)
    second = method.build(second_backbone, root / "one", Stage(1, (1,), (0, 1)))
    _finish_task(method, second, batch, 1, seed=2)
    method.save(second, root / "two")
    after.append(_predict(second, second_backbone))
    return {"states": [root / "one", root / "two"], "after": after, "model": second, "batch": batch,
            "identity": backbone.identity, "method": name, "method_args": method_args or {}}


def _register(uri, pool, seq, task, run_id, **changes):
    files = build_method(seq["method"], seq["method_args"], PET).finished_files(seq["states"][task], task)
    kwargs = dict(pool_name=pool, state_dir=seq["states"][task], blocks=files.blocks, shared=files.shared,
                  task_index=task, task_names=ORDER, pet=PET.model_dump(),
                  method=seq["method"], method_args=seq["method_args"], backbone_spec=BACKBONE,
                  backbone_identity=seq["identity"], benchmark="embedded",
                  metrics={"AP": 10.0 * (task + 1), "BWT": None}, source_run_id=run_id, generation=GEN)
    kwargs.update(changes)
    return pool_store.register_task(uri, **kwargs)


def _store(root: Path) -> tuple[str, str]:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("seq", artifact_location=(root / "artifacts").as_uri())
    return uri, client.create_run(experiment).info.run_id


def _frame():
    return pd.DataFrame({"input": INPUTS})


def _check_same(out: pd.DataFrame, expected):
    answers, weights = expected
    assert out["answer"].tolist() == answers
    torch.testing.assert_close(torch.tensor(out["block_weights"].tolist()), weights)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return _sequence("sapt-lora", tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def registry(lora, tmp_path_factory):
    uri, run_id = _store(tmp_path_factory.mktemp("store"))
    versions = [_register(uri, "pool", lora, task, run_id) for task in (0, 1)]
    return {"uri": uri, "run_id": run_id, "versions": versions}


def test_registered_pools_answer_exactly_as_the_in_memory_model_after_each_task(lora, registry):
    uri = registry["uri"]
    one, two = registry["versions"]
    assert (one.pool, one.state, one.blocks) == (1, 1, (1,))
    assert (two.pool, two.state, two.blocks) == (2, 2, (1, 2))  # block 0 reused, not registered twice
    assert lora["after"][0][0] != lora["after"][1][0]  # the two snapshots are distinguishable
    pool_store.promote(uri, "pool", 2, "champion")
    with _global_uri(uri):
        _check_same(mlflow.pyfunc.load_model("models:/pool/1").predict(_frame()), lora["after"][0])
        _check_same(mlflow.pyfunc.load_model("models:/pool@champion").predict(_frame()), lora["after"][1])
    _check_same(pool_store.load_pool(uri, "pool", "after-t01").predict(_frame()), lora["after"][0])


def test_a_block_version_is_a_plain_peft_adapter_equal_to_the_pool_with_all_weight_on_it(lora, registry, tmp_path):
    model, batch = lora["model"], lora["batch"]
    for block, version in enumerate(registry["versions"][1].blocks):
        folder = pool_store.download_block(registry["uri"], blocks_model("pool"), version, tmp_path / f"b{block}")
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        weights = torch.zeros(2, 2)
        weights[:, block] = 1.0
        model.routing.weights = weights
        with torch.no_grad():
            pooled = model.backbone(**batch)
            plain = PeftModel.from_pretrained(load_backbone(BACKBONE).model, str(folder)).eval()(**batch)
        torch.testing.assert_close(plain.logits, pooled.logits)
        torch.testing.assert_close(plain.loss, pooled.loss)


def test_versions_carry_their_provenance_and_the_pool_names_its_parts(registry):
    uri, run_id = registry["uri"], registry["run_id"]
    pool = pool_store.show(uri, "pool", "newest")
    tags = pool["tags"]
    assert pool["version"] == 2 and {"after-t02", "newest"} <= set(pool["aliases"])
    assert json.loads(tags["order"]) == ORDER and tags["task_index"] == "1" and tags["task_name"] == "beta"
    assert (tags["state_version"], json.loads(tags["block_versions"])) == ("2", [1, 2])
    assert tags["metric.AP"] == "20.0" and "metric.BWT" not in tags
    assert tags["backbone"] == BACKBONE and tags["backbone_identity"].startswith(BACKBONE + "@")
    assert tags["source_run_id"] == run_id and tags["method"] == "sapt-lora" and tags["benchmark"] == "embedded"
    block = pool_store.show(uri, blocks_model("pool"), 1)["tags"]
    assert (block["task_index"], block["task_name"], block["metric.AP"]) == ("0", "alpha", "10.0")
    listed = {m["name"]: m for m in pool_store.list_pools(uri)}
    kinds = {n: m["kind"] for n, m in listed.items() if m["pool"] == "pool"}
    assert kinds == {"pool": "pool", "pool-blocks": "blocks", "pool-state": "state"}
    assert listed["pool"]["versions"] == 2 and listed["pool"]["aliases"]["after-t01"] == 1
    assert [v["version"] for v in pool_store.show(uri, "pool")["versions"]] == [1, 2]


def test_registering_the_same_task_again_creates_no_version(lora, registry):
    uri = registry["uri"]
    again = _register(uri, "pool", lora, 1, registry["run_id"])
    assert not again.created and again.pool == registry["versions"][1].pool
    assert again.blocks == registry["versions"][1].blocks and again.state == registry["versions"][1].state
    client = MlflowClient(uri)
    for name in ("pool", blocks_model("pool"), state_model("pool")):
        assert len(client.search_model_versions(f"name = '{name}'")) == 2
    # Same task and run, other weights: refused, not silently returned.
    with pytest.raises(SaptError, match="already registered with other weights"):
        _register(uri, "pool", _with_moved_router(lora), 1, registry["run_id"])


def _with_moved_router(seq):
    """A copy of the task-2 state whose router differs (as if the task had been trained again)."""
    moved = seq["states"][1].parent / "two-moved"
    if not moved.exists():
        shutil.copytree(seq["states"][1], moved)
        tensors = load_file(str(moved / "router.safetensors"))
        tensors["keys"] = tensors["keys"] + 1.0
        save_file(tensors, str(moved / "router.safetensors"))
    return {**seq, "states": [seq["states"][0], moved]}


def test_an_interrupted_registration_is_not_trusted_and_a_retry_completes_it(lora, registry, monkeypatch):
    uri, run_id = registry["uri"], registry["run_id"]
    _register(uri, "cut", lora, 0, run_id)
    real = pool_store._log_version

    def crash_at_the_pool(model_name, kind, *args, **kwargs):
        if kind == "pool":
            raise KeyboardInterrupt("killed while registering the pool")
        return real(model_name, kind, *args, **kwargs)

    monkeypatch.setattr(pool_store, "_log_version", crash_at_the_pool)
    with pytest.raises(KeyboardInterrupt):
        _register(uri, "cut", lora, 1, run_id)
    client = MlflowClient(uri)
    assert len(client.search_model_versions("name = 'cut-blocks'")) == 2  # block and state of task 1 exist ...
    assert pool_store.last_complete_task(uri, "cut", ORDER) == 0  # ... but only the pool version counts
    assert pool_store.last_complete_task(uri, "cut", ORDER, source_run_id=run_id) == 0
    assert pool_store.last_complete_task(uri, "cut", ["beta", "alpha"]) is None
    assert pool_store.last_complete_task(uri.replace("mlflow.db", "fresh.db"), "cut", ORDER) is None
    monkeypatch.setattr(pool_store, "_log_version", real)
    done = _register(uri, "cut", lora, 1, run_id)
    assert done.created and (done.state, done.blocks) == (2, (1, 2))  # the leftovers are reused
    for name in ("cut", "cut-blocks", "cut-state"):
        assert len(client.search_model_versions(f"name = '{name}'")) == 2
    assert pool_store.last_complete_task(uri, "cut", ORDER) == 1
    assert pool_store.complete_pool_versions(uri, "cut", ORDER) == {0: 1, 1: 2}


def test_a_pool_restored_for_resume_is_the_saved_state(lora, registry, tmp_path):
    state = pool_store.download_state(registry["uri"], "pool", "after-t02", tmp_path / "state")
    loaded = build_method("sapt-lora", {}, PET).load_finished(load_backbone(BACKBONE), state)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**lora["batch"]).loss, lora["model"](**lora["batch"]).loss)


def test_a_pool_for_another_backbone_identity_is_refused(lora, registry):
    _register(registry["uri"], "other", lora, 0, registry["run_id"], backbone_identity=BACKBONE + "@0123456789ab")
    with pytest.raises(SaptError, match="backbone.identity.*trained on 'embedded:tiny-t5@0123456789ab'"):
        pool_store.load_pool(registry["uri"], "other", 1)


def test_missing_models_versions_aliases_and_servers_are_named(registry, tmp_path):
    uri = registry["uri"]
    with pytest.raises(SaptError, match=r"models:/pool/9: version: .*no version 9"):
        pool_store.load_pool(uri, "pool", 9)
    with pytest.raises(SaptError, match=r"models:/pool@gold: alias: .*no alias 'gold'"):
        pool_store.show(uri, "pool", "gold")
    with pytest.raises(SaptError, match=r"models:/nothing: name"):
        pool_store.show(uri, "nothing")
    with pytest.raises(SaptError, match="alias"):
        pool_store.promote(uri, "pool", 1, "latest")
    with pytest.raises(SaptError, match="mlflow.tracking_uri: no MLflow database"):
        pool_store.list_pools(f"sqlite:///{tmp_path / 'nope.db'}")
    port = _free_port()
    started = time.perf_counter()
    with pytest.raises(SaptError, match=rf"mlflow.tracking_uri: MLflow registry http://127.0.0.1:{port} unreachable"):
        pool_store.list_pools(f"http://127.0.0.1:{port}")
    assert time.perf_counter() - started < 10


@contextlib.contextmanager
def _global_uri(uri):
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)


def _local_copy(uri, name, version, dest: Path) -> Path:
    with _global_uri(uri):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest)))


def test_tampered_artifacts_are_refused_before_anything_is_loaded(registry, tmp_path):
    uri = registry["uri"]
    # A pickle beside the blocks: refused by type, never opened.
    copy = _local_copy(uri, "pool", 2, tmp_path / "pkl")
    (copy / "artifacts" / "blocks" / "block-000" / "extra.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(SaptError, match="only safetensors and JSON.*extra.pkl"):
        mlflow.pyfunc.load_model(str(copy))
    # Changed weights: refused by the sha256 list.
    copy = _local_copy(uri, "pool", 2, tmp_path / "changed")
    block = copy / "artifacts" / "blocks" / "block-001" / "adapter_model.safetensors"
    tensors = load_file(str(block))
    save_file({k: v[:2] if "lora_A" in k else v for k, v in tensors.items()}, str(block))
    with pytest.raises(SaptError, match="differ from those registered.*blocks/block-001/adapter_model"):
        mlflow.pyfunc.load_model(str(copy))
    # Wrong shapes even with a consistent sha256 list: refused by the shape check, naming the artifact.
    meta_path = copy / "artifacts" / "version.json"
    meta = json.loads(meta_path.read_text())
    artifacts = {"state": copy / "artifacts" / "state", "blocks": copy / "artifacts" / "blocks"}
    meta["files"] = pool_store.manifest(artifacts)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SaptError, match=r"artifacts/blocks/block-001/adapter_model.safetensors.*does not fit"):
        mlflow.pyfunc.load_model(str(copy))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_sapt_prompt_pool_through_a_real_mlflow_server(tmp_path):
    seq = _sequence("sapt-prompt", tmp_path, {"prompt_length": 3})
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job-runner processes
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pool_store.list_pools(uri)
                break
            except (OSError, SaptError):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("seq")).info.run_id
        first = _register(uri, "prompts", seq, 0, run_id)
        second = _register(uri, "prompts", seq, 1, run_id)
        assert (first.pool, second.pool, second.blocks) == (1, 2, (1, 2))
        assert pool_store.last_complete_task(uri, "prompts", ORDER, source_run_id=run_id) == 1
        _check_same(pool_store.load_pool(uri, "prompts", "after-t01").predict(_frame()), seq["after"][0])
        _check_same(pool_store.load_pool(uri, "prompts", "newest").predict(_frame()), seq["after"][1])
        # The state version (the router) alone gives the same block weights as the pool.
        routed = pool_store.load_pool(uri, state_model("prompts"), 2).predict(_frame())
        torch.testing.assert_close(torch.tensor(routed["block_weights"].tolist()), seq["after"][1][1])
        state = pool_store.download_state(uri, "prompts", 2, tmp_path / "state")
        for block in ("block-000", "block-001"):
            torch.testing.assert_close(load_file(str(state / "blocks" / block / "prompt.safetensors"))["prompt"],
                                       load_file(str(seq["states"][1] / "blocks" / block / "prompt.safetensors"))["prompt"])
    finally:
        _stop_group(server)
        log.close()


def _stop_group(process: subprocess.Popen) -> None:
    """Stops the server and its workers: the process group this test started (its own session)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:  # whatever outlived the TERM: workers, or a parent slow to shut down on a loaded machine
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def _sapt(*args):
    return subprocess.run([sys.executable, "-m", "sapt.cli", *args], capture_output=True, text=True, timeout=600)


def test_the_cli_lists_shows_and_promotes_versions(registry, monkeypatch):
    uri = registry["uri"]
    listed = run_cli("registry", "list", "--tracking-uri", uri)
    assert listed.returncode == 0, listed.stderr
    pools = {m["name"]: m for m in json.loads(listed.stdout.splitlines()[-1])}
    assert pools["pool"]["versions"] == 2 and pools["pool-blocks"]["kind"] == "blocks"
    shown = run_cli("registry", "show", "models:/pool@after-t01", "--tracking-uri", uri)
    assert json.loads(shown.stdout.splitlines()[-1])["version"] == 1, shown.stderr
    promoted = run_cli("registry", "promote", "pool/1", "stable", "--tracking-uri", uri)
    assert promoted.returncode == 0, promoted.stderr
    assert pool_store.show(uri, "pool", "stable")["version"] == 1
    missing = run_cli("registry", "show", "pool@nope", "--tracking-uri", uri)
    assert missing.returncode == 2 and "models:/pool@nope" in missing.stderr and "Traceback" not in missing.stderr
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    no_uri = run_cli("registry", "list")
    assert no_uri.returncode == 2 and "--tracking-uri" in no_uri.stderr


def test_the_cli_predicts_one_input_and_a_file_through_ray_data_as_the_run_did(lora, registry, tmp_path):
    uri = registry["uri"]
    answers, weights = lora["after"][0]
    one = run_cli("predict", "models:/pool@after-t01", "--input", INPUTS[0], "--tracking-uri", uri)
    assert one.returncode == 0, one.stderr
    answer = json.loads(one.stdout.splitlines()[-1])
    assert answer["answer"] == answers[0]
    torch.testing.assert_close(torch.tensor(answer["block_weights"]), weights[0])

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "input": text}) + "\n" for i, text in enumerate(INPUTS)))
    batch = _sapt("predict", "models:/pool/1", "--file", str(prompts), "--batch-size", "2", "--tracking-uri", uri)
    assert batch.returncode == 0, batch.stderr[-3000:]
    out = Path(batch.stdout.splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]  # in input order, other fields kept
    assert [r["answer"] for r in rows] == answers
    torch.testing.assert_close(torch.tensor([r["block_weights"] for r in rows]), weights)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "fine"}\n{"text": "no input field"}\n')
    refused = run_cli("predict", "models:/pool/1", "--file", str(bad), "--tracking-uri", uri)
    assert refused.returncode == 2 and "bad.jsonl" in refused.stderr and "line 2" in refused.stderr


def test_resume_continues_the_newest_run_after_its_last_registered_task(lora, tmp_path):
    from sapt.registry.sequence_pool import SequencePool

    uri, first_run = _store(tmp_path)
    client = MlflowClient(uri)
    second_run = client.create_run(client.get_run(first_run).info.experiment_id).info.run_id
    pool = SequencePool(tracking_uri=uri, name="resumable", order=ORDER, method="sapt-lora", method_args={},
                        pet=PET.model_dump(), backbone_spec=BACKBONE, backbone_identity=lora["identity"], backbone_args={},
                        benchmark="embedded", generation=GEN)
    assert pool.resume_point() is None
    for task in (0, 1):
        _register(uri, "resumable", lora, task, first_run)
    point = pool.resume_point()
    assert (point.task_index, point.pool_version, point.run_id) == (1, 2, first_run)
    _register(uri, "resumable", lora, 0, second_run)  # a newer run of the same order, stopped after task 1
    point = pool.resume_point()
    assert (point.task_index, point.pool_version, point.run_id) == (0, 3, second_run)
    other_backbone = SequencePool(**{**pool.__dict__, "backbone_identity": BACKBONE + "@elsewhere"})
    assert other_backbone.resume_point() is None


def test_resume_restores_the_aliases_a_kill_between_their_writes_left_out(lora, tmp_path):
    from sapt.registry.sequence_pool import SequencePool

    uri, run_id = _store(tmp_path)
    pool = SequencePool(tracking_uri=uri, name="half-aliased", order=ORDER, method="sapt-lora", method_args={},
                        pet=PET.model_dump(), backbone_spec=BACKBONE, backbone_identity=lora["identity"], backbone_args={},
                        benchmark="embedded", generation=GEN)
    _register(uri, "half-aliased", lora, 0, run_id)
    client = MlflowClient(uri)
    client.delete_registered_model_alias("half-aliased", "newest")  # the run died after writing after-t01
    assert pool.resume_point().pool_version == 1
    assert client.get_registered_model("half-aliased").aliases == {"after-t01": 1, "newest": 1}
