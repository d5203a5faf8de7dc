"""Finding sapt entries in the registry, shared by registering and reading: the tag that marks a
sapt registered model, and every version of a model, oldest first."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

REGISTRY_TAG = "sapt_registry"  # registered-model tag: pool | blocks | state


def model_versions(client: MlflowClient, name: str) -> list:
    """Every version of ``name`` (READY or not), oldest first."""
    out, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            break
    return sorted(out, key=lambda v: int(v.version))
