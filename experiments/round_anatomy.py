"""What one call of a federated computation asks of TFF's runtime: its intrinsic calls.

A worker runs a round as TFF's C++ executors walking the compiled computation: every intrinsic
call (a broadcast, a `federated_map`, a `federated_apply`, a zip) is a step of the executor, and
each one that applies a TensorFlow function runs a TensorFlow call. When the math of a round is
small (sinusoid: 25 clients of 20 points), these steps, not the math, are most of the worker's
time. `experiments/benchmark.py` reports the counts beside the round times.
"""

from __future__ import annotations

import collections

import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.compiler import building_blocks, tree_analysis


def intrinsic_calls(computation: tff.Computation) -> collections.OrderedDict:
    """Counts the intrinsic calls and TensorFlow functions of `computation` as TFF runs it.

    The computation is compiled as TFF's native runtime compiles it (intrinsics desugared, call
    dominant form), so `federated_mean` appears as the `federated_aggregate` it becomes.

    Returns:
      `{"intrinsic_calls": total, "tensorflow_functions": TF computations in the compiled
      form, "by_intrinsic": {uri: calls}}`, uris sorted.
    """
    compiled = tff.backends.native.desugar_and_transform_to_native(computation)
    by_intrinsic: collections.Counter = collections.Counter()
    functions = [0]

    def visit(block) -> None:
        if isinstance(block, building_blocks.Call) and isinstance(
            block.function, building_blocks.Intrinsic
        ):
            by_intrinsic[block.function.uri] += 1
        elif isinstance(block, building_blocks.CompiledComputation):
            functions[0] += 1

    tree_analysis.visit_postorder(compiled.to_building_block(), visit)
    return collections.OrderedDict(
        intrinsic_calls=sum(by_intrinsic.values()),
        tensorflow_functions=functions[0],
        by_intrinsic=collections.OrderedDict(sorted(by_intrinsic.items())),
    )
