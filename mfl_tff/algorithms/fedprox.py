"""FedProx: FedAvg whose clients keep close to the global model (Li et al., "Federated
Optimization in Heterogeneous Networks", arXiv 1812.06127).

Each client runs local SGD on f(w) + mu/2 ||w - w_global||^2, which bounds how far heterogeneous
clients drift within a round; the server averages the deltas as FedAvg does. This module is also
the README's example of adding an algorithm: a client function (here FedAvg's, with the proximal
term switched on), one `Algorithm` record, and one line in `mfl_tff.algorithms.catalog`. It is
tested against an independent float64 implementation of the paper's update, not against TFF 0.87's
`build_weighted_fed_prox`, whose client adds mu * (w_global - w) to the gradient: the opposite
sign of the proximal term's gradient (`tests/fedprox_test.py` pins that down).
"""

from __future__ import annotations

from mfl_tff.algorithms import checks, fedavg
from mfl_tff.algorithms.algorithm import Algorithm, AlgorithmOptions, ClientPhase, check_common


def _check(options: AlgorithmOptions) -> None:
    check_common(options)
    checks.check_positive_rate("proximal_strength", options.proximal_strength)


FEDPROX = Algorithm(
    name="fedprox",
    paper="Federated Optimization in Heterogeneous Networks, arXiv 1812.06127",
    phases=lambda model, options: (
        ClientPhase(
            "",
            fedavg.local_sgd_client_fn(
                model,
                learning_rate=options.inner_lr,
                local_epochs=options.local_epochs,
                proximal_strength=options.proximal_strength,
            ),
        ),
    ),
    default_server_optimizer=("sgd", 1.0),
    check=_check,
)
