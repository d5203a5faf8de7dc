"""Test-wide environment: offline, CPU DeepSpeed, no Ray token auth for local test clusters."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


import pytest  # noqa: E402


def _restored_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI, which every later `sapt run` subprocess
# would inherit (and log there instead of its own sqlite store): no test or module keeps its changes.
_environment_per_module = pytest.fixture(autouse=True, scope="module")(_restored_environment)
_environment_per_test = pytest.fixture(autouse=True)(_restored_environment)


@pytest.fixture
def tiny_t5_batch():
    """Two prompts and answers tokenized for the embedded tiny T5: enough for a loss and routing."""
    from sapt.backbones import load_backbone

    tok = load_backbone("embedded:tiny-t5").tokenizer
    enc = tok(["copy the first word: red blue", "name the last word here: green"], padding=True, return_tensors="pt")
    labels = tok(["red", "green"], padding=True, return_tensors="pt")["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray in the test process for a module, unless one is running already. Job
    entrypoints and `sapt` commands called in-process join it (ensure_ray) instead of starting their own."""
    import ray

    from sapt.cluster.session import local_dashboard

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=3, **local_dashboard())
    yield
    if started:
        ray.shutdown()
