"""Ray job entrypoint: one continual-learning sequence, run by the job's driver on the cluster.

Submitted by `sapt submit CONFIG --address http://HEAD:8265`, or by hand:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.run_sequence demo-sapt --set mlflow.tracking_uri=http://HEAD:5000

Arguments are those of `sapt run` (CONFIG, --set, --resume), or `--config-json JSON`: a whole
validated config, as `sapt submit` sends it so that a local YAML file need not exist on the cluster.
The job's last output line is the path of results.json (on the head node). The job's log is the
whole output (`sapt run --verbose`): Ray keeps it, and `sapt logs` shows it.
"""

import sys
import tempfile
from pathlib import Path

from sapt.cli import main


def _args(argv: list[str]) -> list[str]:
    if argv[:1] != ["--config-json"]:
        return ["run", "--verbose", *argv]
    if len(argv) < 2:
        sys.exit("--config-json needs the config as JSON")
    folder = Path(tempfile.mkdtemp(prefix="sapt-job-"))
    path = folder / "config.yaml"  # JSON is YAML
    path.write_text(argv[1])
    return ["run", "--verbose", str(path), *argv[2:]]


if __name__ == "__main__":
    sys.exit(main(_args(sys.argv[1:])))
