"""`sapt` called in the test's own process, as the console script calls it (sapt.cli.main).

For commands that stop before Ray starts (bad input, registry queries): it saves the seconds of
imports a subprocess pays per call. The result looks like subprocess.run's; the environment is put
back as it was, since some commands set defaults in os.environ, and a Ray the call started is stopped.
"""

import contextlib
import io
import os
import subprocess


def run_cli(*args: str) -> subprocess.CompletedProcess:
    import ray

    from sapt.cli import main

    had_ray = ray.is_initialized()
    saved = dict(os.environ)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's own errors
                code = exit_.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if ray.is_initialized() and not had_ray:  # a command that failed after starting Ray
            ray.shutdown()
    return subprocess.CompletedProcess(list(args), code, stdout.getvalue(), stderr.getvalue())
