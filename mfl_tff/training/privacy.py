"""Privacy accounting of user-level DP training: epsilon at delta after a number of rounds.

A round of `dp` aggregation (`mfl_tff.algorithms.aggregation`) is a sampled Gaussian mechanism
over clients: each client's contribution is clipped, the sum gets Gaussian noise of
`noise_multiplier` times the clip (the effective multiplier of the round, whatever the number of
noised streams), and each client takes part with probability `clients_per_round /
num_train_clients`. `dp_accounting`'s Renyi-DP accountant composes `rounds` such events and
converts to (epsilon, delta):

    PoissonSampledDpEvent(q, GaussianDpEvent(noise_multiplier)) self-composed `rounds` times

under add-or-remove-one-client adjacency (user-level DP: one client's whole data).

What it assumes, and what it does not cover:
* Poisson sampling. The training program samples exactly `clients_per_round` clients a round,
  uniformly without replacement; accounting for that as Poisson sampling with the same rate is the
  usual approximation in federated DP work (McMahan et al., arXiv 1710.06963), not an exact bound.
* The released model and alpha. The training metrics (losses, update norms, example and client
  counts) are aggregated without noise, as in TFF's own DP-FedAvg, and are not covered.
* Held-out evaluation clients (personalization) are not part of training and are not covered.
* With adaptive clipping the multiplier is TFF's effective total: the noise on the clipped-count
  that adapts the clip is inside the same budget (`DifferentiallyPrivateFactory.gaussian_adaptive`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import dp_accounting

ACCOUNTANT = "rdp_poisson_subsampled_gaussian"


def _is_real(value) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class PrivacyAccountant:
    """Epsilon at `delta` of `rounds` rounds of a sampled Gaussian mechanism over clients.

    Attributes:
      noise_multiplier: The round's effective noise multiplier, > 0.
      sampling_rate: q, the probability that a client takes part in a round, in (0, 1].
      delta: The delta of the (epsilon, delta) guarantee, in (0, 1).

    Raises:
      ValueError: When the accounting is undefined: no noise, q outside (0, 1], delta outside
        (0, 1).
    """

    noise_multiplier: float
    sampling_rate: float
    delta: float

    def __post_init__(self):
        z, q, delta = self.noise_multiplier, self.sampling_rate, self.delta
        if not _is_real(z) or z <= 0:
            raise ValueError(
                f"noise_multiplier must be a finite number > 0 for a privacy guarantee, got {z!r} "
                "(without noise epsilon is infinite)."
            )
        if not _is_real(q) or not 0 < q <= 1:
            raise ValueError(
                f"sampling rate clients_per_round / num_train_clients must be in (0, 1], got {q!r}."
            )
        if not _is_real(delta) or not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}.")

    @classmethod
    def for_training(
        cls,
        *,
        noise_multiplier: float,
        clients_per_round: int,
        num_train_clients: int,
        delta: Optional[float] = None,
    ) -> PrivacyAccountant:
        """The accountant of a run sampling `clients_per_round` of `num_train_clients` a round.

        `delta` defaults to 1 / num_train_clients.
        """
        for name, value in (
            ("clients_per_round", clients_per_round),
            ("num_train_clients", num_train_clients),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if clients_per_round > num_train_clients:
            raise ValueError(
                f"clients_per_round={clients_per_round} exceeds num_train_clients="
                f"{num_train_clients}: the sampling rate would be above 1."
            )
        return cls(
            noise_multiplier=float(noise_multiplier),
            sampling_rate=clients_per_round / num_train_clients,
            delta=1.0 / num_train_clients if delta is None else float(delta),
        )

    def epsilon(self, rounds: int) -> float:
        """Epsilon at `self.delta` after `rounds` rounds (0 rounds: 0)."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds must be an int >= 0, got {rounds!r}.")
        if rounds == 0:
            return 0.0
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
            ),
            rounds,
        )
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(event)
        return float(accountant.get_epsilon(self.delta))

    def report(self, rounds: int) -> dict:
        """The `privacy` entry of personalization.json after `rounds` rounds."""
        return {
            "epsilon": self.epsilon(rounds),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "rounds": rounds,
            "accountant": ACCOUNTANT,
        }
