"""Bytes on the wire: what each client downloads and uploads in one round, read from the TFF types.

    process, spec = builders.build_algorithm("mfl", task, options)
    cost = communication.measure(process, spec.stream_aggregators)
    cost.download_bytes                 # per client per round: theta, alpha (twice for mfl), ...
    cost.upload_bytes                   # OrderedDict(model=..., meta=..., other=...)
    cost.round_metrics(clients=25, round_num=7)   # what the training program releases

Nothing is guessed or timed: the round computation (`process.next`) is walked for its federated
intrinsics. A `federated_broadcast` sends its server value to every client (download); an
aggregation (`federated_sum`, `federated_mean`, `federated_weighted_mean`, `federated_aggregate`
and the secure sums) takes one value from every client (upload). A value's size is its TFF type's:
elements times bytes per element. So the upload is counted after the aggregator's encoding: with
`tff.aggregators.EncodedSumFactory` quantization a client sends the bitpacked int32 words and the
per-tensor (min, max) TFF's encoder produces, not float32 values; with `tff.learning.
secure_aggregator` it sends the integers TFF hands to `federated_secure_sum_bitwidth` (int64 per
coordinate in TFF 0.87; a secure-aggregation protocol's own masking overhead and bit width are
not in the types, so they are not counted).

By stream: each stream's aggregation process (`spec.stream_aggregators`, as the composer built
it) is walked the same way, once per time the round aggregates that stream. `model` is the model
updates (deltas or theta meta-gradients) with their weights and the aggregator's own per-client
statistics (clip and zeroing counts); `meta` the alpha (and meta-model) meta-gradients; `other`
the rest, mostly the client metrics. Per client means per training client: with cohorts the
simulation stacks clients into one federated client, but a deployment has every client send its
own value, which is what is counted (the types of a cohort's value and a client's are the same).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping

import numpy as np
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.compiler import tree_analysis

DOWNLOAD_INTRINSICS = frozenset({"federated_broadcast"})
UPLOAD_INTRINSICS = frozenset(
    {
        "federated_aggregate",
        "federated_mean",
        "federated_secure_modular_sum",
        "federated_secure_sum",
        "federated_secure_sum_bitwidth",
        "federated_sum",
        "federated_weighted_mean",
    }
)
STREAMS = ("model", "meta")


def type_bytes(type_spec: tff.Type) -> int:
    """Bytes of one value of `type_spec` (a federated type: of one member).

    Raises:
      ValueError: For a tensor of unknown shape or a type without a fixed size (sequences,
        functions): its bytes cannot be read from the type.
    """
    if isinstance(type_spec, tff.FederatedType):
        return type_bytes(type_spec.member)
    if isinstance(type_spec, tff.TensorType):
        shape = type_spec.shape
        if shape is None or any(d is None for d in shape):
            raise ValueError(f"The size of {type_spec} is not fixed by its type.")
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(type_spec.dtype).itemsize
    if isinstance(type_spec, tff.StructType):
        return sum(type_bytes(type_spec[i]) for i in range(len(type_spec)))
    raise ValueError(f"{type_spec} has no size in bytes.")


def _placed_bytes(type_spec: tff.Type, placement) -> int:
    """Bytes of the values placed at `placement` within an intrinsic's argument type."""
    if isinstance(type_spec, tff.FederatedType):
        return type_bytes(type_spec.member) if type_spec.placement == placement else 0
    if isinstance(type_spec, tff.StructType):
        return sum(_placed_bytes(type_spec[i], placement) for i in range(len(type_spec)))
    return 0


@dataclasses.dataclass(frozen=True)
class Transfers:
    """Bytes one client receives (`download`) and sends (`upload`) in one call of a computation."""

    download: int
    upload: int


def client_transfers(comp: tff.Computation) -> Transfers:
    """Per-client bytes broadcast to and aggregated from the clients by `comp` (module docstring).

    Every intrinsic call in `comp`'s body runs once per call of `comp` (TFF computations have no
    loops at the federated level), so the sums are per call.
    """
    download, upload = [0], [0]

    def visit(block):
        if not isinstance(block, tff.framework.Call) or not isinstance(
            block.function, tff.framework.Intrinsic
        ):
            return
        uri = block.function.uri
        if uri in DOWNLOAD_INTRINSICS:
            download[0] += _placed_bytes(block.argument.type_signature, tff.SERVER)
        elif uri in UPLOAD_INTRINSICS:
            upload[0] += _placed_bytes(block.argument.type_signature, tff.CLIENTS)

    tree_analysis.visit_postorder(comp.to_building_block(), visit)
    return Transfers(download[0], upload[0])


@dataclasses.dataclass(frozen=True)
class Communication:
    """Bytes per training client per round.

    Attributes:
      download_bytes: Everything broadcast to a client: the model weights, alpha and the
        meta-model (each time a phase broadcasts them) and the aggregators' broadcast bounds.
      upload_bytes: `OrderedDict(model=..., meta=..., other=...)` (`meta` only for algorithms
        that learn meta-parameters): what a client sends, by stream (module docstring).
    """

    download_bytes: int
    upload_bytes: Mapping[str, int]

    @property
    def upload_total(self) -> int:
        return sum(self.upload_bytes.values())

    def round_metrics(self, *, clients: int, round_num: int) -> collections.OrderedDict:
        """The `communication/...` metrics of round `round_num` with `clients` clients a round.

        `round_*` is the round's total over its clients and `cumulative_*` the total of rounds
        1..round_num (every round samples the same number of clients).
        """
        metrics = collections.OrderedDict(download_bytes_per_client=self.download_bytes)
        metrics["upload_bytes_per_client"] = self.upload_total
        for stream, value in self.upload_bytes.items():
            metrics[f"upload_{stream}_bytes_per_client"] = value
        for name, per_client in (("download", self.download_bytes), ("upload", self.upload_total)):
            metrics[f"round_{name}_bytes"] = per_client * clients
            metrics[f"cumulative_{name}_bytes"] = per_client * clients * round_num
        return metrics

    def report(self, *, clients: int, rounds: int) -> collections.OrderedDict:
        """The `communication` entry of `personalization.json`."""
        return collections.OrderedDict(
            bytes_per_client_per_round=collections.OrderedDict(
                download=self.download_bytes,
                upload=collections.OrderedDict(self.upload_bytes, total=self.upload_total),
            ),
            clients_per_round=clients,
            rounds=rounds,
            cumulative_bytes=collections.OrderedDict(
                download=self.download_bytes * clients * rounds,
                upload=self.upload_total * clients * rounds,
            ),
            counted_from="TFF types of the round's broadcasts and aggregations (after encoding)",
        )


def measure(
    process: tff.learning.templates.LearningProcess,
    stream_aggregators: Mapping[str, tuple[tff.templates.AggregationProcess, int]],
) -> Communication:
    """The bytes per client per round of `process` (module docstring).

    Args:
      process: The `LearningProcess`.
      stream_aggregators: `{stream: (aggregation process, times aggregated per round)}` for the
        streams of `STREAMS` the round aggregates (`AlgorithmSpec.stream_aggregators`).

    Raises:
      ValueError: For an unknown stream, or streams that upload more than the whole round (the
        aggregation processes are not the ones `process` was built with).
    """
    unknown = set(stream_aggregators) - set(STREAMS)
    if unknown:
        raise ValueError(f"Unknown streams {sorted(unknown)}; expected some of {STREAMS}.")
    total = client_transfers(process.next)
    upload = collections.OrderedDict()
    for stream in STREAMS:
        if stream in stream_aggregators:
            aggregator, times = stream_aggregators[stream]
            upload[stream] = client_transfers(aggregator.next).upload * times
    other = total.upload - sum(upload.values())
    if other < 0:
        raise ValueError(
            f"The streams upload {sum(upload.values())} bytes per client, more than the round's "
            f"{total.upload}: pass the aggregation processes the round was built with."
        )
    upload["other"] = other
    return Communication(total.download, upload)
