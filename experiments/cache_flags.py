"""The data-cache flags that train.py, compare.py and quality.py share (one definition each).

Each binary adopts them as its own key flags, so --helpshort lists them and the run's recorded
settings include them.
"""

from __future__ import annotations

from absl import flags

DATA_CACHE_DIR = flags.DEFINE_string(
    "data_cache_dir", None, "emnist: directory holding emnist_all.sqlite; empty: ~/.tff."
)
WORKER_DATA_CACHE_DIR = flags.DEFINE_string(
    "worker_data_cache_dir",
    None,
    "emnist with --data_on_workers: directory holding emnist_all.sqlite on each worker, if not "
    "the driver's --data_cache_dir.",
)
