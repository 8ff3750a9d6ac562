"""The built-in tasks by name: the table the registry loads on first use.

This module imports the task modules but not the registry, so the two do not import each other:
`mfl_tff.data.registry` reads `BUILTIN_TASKS` lazily, and users register their own tasks there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from mfl_tff.data import digits, emnist, sinusoid, synthetic
from mfl_tff.data.task import FederatedTask

# Read-only: a user's task goes in through `registry.register_task`, never into this table.
BUILTIN_TASKS: Mapping[str, Callable[..., FederatedTask]] = MappingProxyType(
    {
        "digits": digits.build_digits,
        "digits_fewshot": digits.build_digits_fewshot,
        "sinusoid": sinusoid.build_sinusoid,
        "synthetic": synthetic.build_synthetic,
        "emnist": emnist.build_emnist,
    }
)
