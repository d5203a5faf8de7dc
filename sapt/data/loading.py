"""One entry point for a run's data: the tasks of an order, from CL_Benchmark, the user's own task folders
beside it, or the embedded benchmark."""

from __future__ import annotations

from pathlib import Path

from sapt.data.cl_benchmark import find_task_dir, load_task
from sapt.data.orders import EMBEDDED_ORDER, resolve_order
from sapt.data.own_tasks import is_own_task, load_own_task
from sapt.data.types import TaskData
from sapt.errors import SaptError

# Embedded sizes when no cap is given: small enough for a CPU demo run.
EMBEDDED_DEFAULT_TRAIN = 1000
EMBEDDED_DEFAULT_TEST = 200


def load_tasks(
    data_dir: str | None,
    order: str | list[str],
    *,
    max_train_per_task: int | None,
    max_eval_per_task: int | None,
    val_size: int,
    seed: int,
) -> list[TaskData]:
    """Load every task of ``order``, in order.

    Args:
        data_dir: the CL_Benchmark folder, which may also hold task folders of the user's own
            (``own_tasks``); None or "" selects the embedded benchmark.
        order: a list of task names, ``"embedded"``, or a name in ``NAMED_ORDERS``.
        max_train_per_task: cap on train instances per task (None: all; embedded: 1000).
        max_eval_per_task: cap on test instances per task (None: all; embedded: 200).
        val_size: validation instances per task, carved from train.
        seed: seeds splits, caps and reference choice.

    Returns:
        One ``TaskData`` per task, in training order.

    Raises:
        SaptError: a bad order, an unknown task (source ``order``), or a bad data file.
    """
    if not data_dir:
        return _load_embedded(order, max_train_per_task, max_eval_per_task, val_size, seed)
    if order == EMBEDDED_ORDER:
        raise SaptError(
            "the embedded order needs the embedded benchmark: leave data_dir empty", source="order"
        )
    if not Path(data_dir).is_dir():
        raise SaptError("data directory not found", source=str(data_dir))

    tasks = resolve_order(order, data_dir, embedded_tasks=[])
    # Check every name before reading any file, so a typo in task 12 fails in milliseconds.
    own = {name: _own_task_folder(data_dir, name) for name in tasks}
    for n, name in enumerate(tasks):
        if own[name] is not None:
            continue
        try:
            find_task_dir(data_dir, name)
        except SaptError as err:
            raise SaptError(f"{err.message}, nor as a task folder of your own (in {data_dir})", source="order",
                            field=f"[{n}]") from None
    caps = {"max_train": max_train_per_task, "max_eval": max_eval_per_task, "val_size": val_size, "seed": seed}
    return [load_own_task(own[name], **caps) if own[name] is not None else load_task(data_dir, name, **caps)
            for name in tasks]


def _own_task_folder(data_dir: str, name: str) -> Path | None:
    """``data_dir/name`` when it holds a task of the user's own (``own_tasks``) and no benchmark has
    a task of that name."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return None
    folder = Path(data_dir) / name
    if not is_own_task(folder):
        return None
    try:
        find_task_dir(data_dir, name)
    except SaptError:
        return folder
    return None  # the benchmark's task of that name comes first


def _load_embedded(
    order: str | list[str],
    max_train: int | None,
    max_eval: int | None,
    val_size: int,
    seed: int,
) -> list[TaskData]:
    # Imported here so the CL_Benchmark path never depends on the embedded builder.
    from sapt.data import embedded

    names = list(embedded.TASK_NAMES)
    tasks = resolve_order(order, None, embedded_tasks=names)
    for n, name in enumerate(tasks):
        if name not in names:
            raise SaptError(
                f"task {name!r} is not in the embedded benchmark (tasks: {', '.join(names)})",
                source="order",
                field=f"[{n}]",
            )
    return [
        embedded.build_task(
            name,
            num_train=max_train if max_train is not None else EMBEDDED_DEFAULT_TRAIN,
            num_val=val_size,
            num_test=max_eval if max_eval is not None else EMBEDDED_DEFAULT_TEST,
            seed=seed,
        )
        for name in tasks
    ]
