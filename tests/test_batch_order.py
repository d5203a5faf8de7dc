"""Batch inference keeps input order even when actors finish batches out of order."""

import time

import pandas as pd
import ray
import ray.data

from sapt.cluster.batch_predict import in_input_order


def test_rows_come_back_in_input_order_from_a_dataset_made_before_the_setting(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(f'{{"n": {i}}}\n' for i in range(12)))
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=3, include_dashboard=False)
    class SlowFirstBatch:  # defined here so that Ray pickles it whole (workers cannot import tests/)
        """Holds the first rows back, so that the second actor finishes later rows first."""

        def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
            if int(batch["n"].iloc[0]) < 2:
                time.sleep(2)
            return batch

    try:
        def answers(dataset) -> list[int]:
            mapped = dataset.map_batches(SlowFirstBatch, batch_size=2, batch_format="pandas",
                                         compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1)
            return [int(row["n"]) for row in mapped.iter_rows()]

        as_finished = answers(ray.data.read_json(str(path), lines=True, override_num_blocks=6))
        ordered = answers(in_input_order(ray.data.read_json(str(path), lines=True, override_num_blocks=6)))
    finally:
        if started:
            ray.shutdown()
    assert as_finished != list(range(12))  # without it, the held-back rows come last
    assert ordered == list(range(12))
