"""A `tff.simulation.datasets.ClientData` whose clients are numpy arrays, stored or generated.

Our tasks are ordinary `ClientData` (users can call `create_tf_dataset_for_client`, `preprocess`,
`datasets()` on them as on any TFF dataset), but packing reads the arrays directly instead of
iterating a `tf.data` pipeline per client, which is much faster for thousands of clients.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

ClientArrays = Mapping[str, np.ndarray]


class ArrayClientData(tff.simulation.datasets.ClientData):
    """Clients whose examples are `OrderedDict(x=..., y=...)` numpy arrays.

    Args:
      client_ids: The ids of the clients.
      arrays_fn: Maps a client id to its arrays. Generated tasks compute them from the id, so the
        supply of clients is unbounded and any client is reproducible.
    """

    def __init__(self, client_ids: Sequence[str], arrays_fn: Callable[[str], ClientArrays]):
        if not client_ids:
            raise ValueError("ArrayClientData needs at least one client id.")
        self._client_ids = list(client_ids)
        self._arrays_fn = arrays_fn
        first = arrays_fn(self._client_ids[0])
        self._element_spec = collections.OrderedDict(
            (k, tf.TensorSpec(np.asarray(v).shape[1:], tf.as_dtype(np.asarray(v).dtype)))
            for k, v in first.items()
        )

    @classmethod
    def from_dict(cls, clients: Mapping[str, ClientArrays]) -> ArrayClientData:
        """Clients stored in memory, keyed by id."""
        return cls(list(clients), lambda cid: clients[cid])

    def client_arrays(self, client_id: str) -> ClientArrays:
        """The client's examples as numpy arrays (the fast path used by packing)."""
        return self._arrays_fn(client_id)

    @property
    def client_ids(self) -> list[str]:
        return self._client_ids

    @property
    def serializable_dataset_fn(self):
        def dataset_fn(client_id) -> tf.data.Dataset:
            if isinstance(client_id, (bytes, np.bytes_)):
                client_id = client_id.decode("utf-8")
            if not isinstance(client_id, str):
                raise TypeError(
                    "ArrayClientData builds datasets from Python string client ids; "
                    f"got {type(client_id).__name__}."
                )
            return tf.data.Dataset.from_tensor_slices(
                collections.OrderedDict(self._arrays_fn(client_id))
            )

        return dataset_fn

    @property
    def element_type_structure(self):
        return self._element_spec


def client_arrays(client_data: tff.simulation.datasets.ClientData, client_id: str) -> ClientArrays:
    """A client's examples as numpy arrays, from any `ClientData` with `x` and `y` features.

    Raises:
      ValueError: If the elements are not mappings with `x` and `y` (the message says how to fix).
    """
    if isinstance(client_data, ArrayClientData):
        return client_data.client_arrays(client_id)
    spec = client_data.element_type_structure
    if not isinstance(spec, Mapping) or not {"x", "y"} <= set(spec):
        raise ValueError(
            f"ClientData elements must be mappings with 'x' and 'y' keys, got {spec}; map yours "
            "with client_data.preprocess(lambda ds: ds.map(lambda e: {'x': ..., 'y': ...}))."
        )
    dataset = client_data.create_tf_dataset_for_client(client_id)
    xs, ys = [], []
    for element in dataset.as_numpy_iterator():
        xs.append(element["x"])
        ys.append(element["y"])
    if not xs:
        return collections.OrderedDict(
            x=np.zeros((0,) + tuple(spec["x"].shape), np.float32),
            y=np.zeros((0,) + tuple(spec["y"].shape), spec["y"].dtype.as_numpy_dtype),
        )
    return collections.OrderedDict(x=np.stack(xs), y=np.stack(ys))
