"""Layering rules that keep method code free of Ray and MLflow, and `platform/` out of the import path."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_method_code_does_not_import_ray_or_mlflow():
    loaded = _modules_after_import("sapt.methods")
    assert "ray" not in loaded
    assert "mlflow" not in loaded
    assert "deepspeed" not in loaded


def test_platform_folder_does_not_shadow_stdlib():
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.__file__)"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert "lib/python" in out.stdout and str(ROOT / "platform") not in out.stdout
    assert not (ROOT / "platform" / "__init__.py").exists()
