"""Layering rules that keep method code free of Ray and MLflow, and `platform/` out of the import path.

The rules are import-linter contracts in pyproject.toml ([tool.importlinter]); a test runs `lint-imports`.
"""

import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# The one package allowed to import each dependency (the style guide's layout).
OWNERS = {"ray": "sapt.cluster", "mlflow": "sapt.registry", "deepspeed": "sapt.train"}


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


def test_import_contracts_hold():
    """Layers point down; only cluster imports Ray, only registry MLflow, only train DeepSpeed."""
    lint = Path(sys.executable).parent / "lint-imports"  # the venv's console script
    assert lint.is_file(), f"{lint} missing: pip install -c constraints.txt -e '.[test]'"
    out = subprocess.run([str(lint), "--no-cache", "--no-logo"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-4000:]


def test_owner_contracts_name_every_other_package():
    """A package added later falls under "only X imports Y" without anyone remembering to list it."""
    packages = {f"sapt.{p.stem}" for p in (ROOT / "sapt").iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    for dependency, owner in OWNERS.items():
        [contract] = [c for c in contracts if c["type"] == "forbidden" and c["forbidden_modules"] == [dependency]
                      and c.get("allow_indirect_imports")]
        assert set(contract["source_modules"]) == packages - {owner}, contract["name"]
