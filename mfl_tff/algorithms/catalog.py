"""The algorithm registry: names -> `Algorithm` records, one line per algorithm.

    record = catalog.get("mfl")
    process = composer.compose(record, task.model_fn, task.client_data_type(), options)

A new algorithm is one module exporting an `Algorithm` record (its client functions, defaults and
checks; see `mfl_tff.algorithms.fedprox` for a short one) plus one line below, or a call to
`catalog.register` from the user's own code.
"""

from __future__ import annotations

from mfl_tff.algorithms import fedavg, fedmeta, fedprox, meta_sgd, mfl, per_fedavg
from mfl_tff.algorithms.algorithm import Algorithm

_RECORDS: dict[str, Algorithm] = {}


def register(record: Algorithm, *, overwrite: bool = False) -> None:
    """Makes `record` available by its name.

    Raises:
      ValueError: If the name is taken and `overwrite` is False.
    """
    if not isinstance(record, Algorithm):
        raise TypeError(f"register takes an Algorithm record, got {type(record).__name__}.")
    if record.name in _RECORDS and not overwrite:
        raise ValueError(
            f"Algorithm {record.name!r} is registered; pass overwrite=True to replace."
        )
    _RECORDS[record.name] = record


def get(name: str) -> Algorithm:
    """The record of algorithm `name`.

    Raises:
      ValueError: For an unknown name (the message lists the choices).
    """
    if name not in _RECORDS:
        raise ValueError(f"Unknown algorithm {name!r}; choose one of: {', '.join(names())}.")
    return _RECORDS[name]


def names() -> tuple[str, ...]:
    """Registered algorithm names, in registration order."""
    return tuple(_RECORDS)


register(fedavg.FEDAVG)
register(fedmeta.MAML)
register(fedmeta.FOMAML)
register(meta_sgd.META_SGD)
register(fedmeta.REPTILE)
register(per_fedavg.PER_FEDAVG_FO)
register(per_fedavg.PER_FEDAVG_HF)
register(mfl.MFL)
register(fedprox.FEDPROX)
