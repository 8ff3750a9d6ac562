"""Tests of `mfl_tff.training.privacy`: epsilon against independent computations, and refusals.

The references are built here, not through the module: `dp_accounting`'s events composed one round
at a time, its PLD accountant (another method), and the number Abadi et al. published for the
moments accountant.
"""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from mfl_tff.training import privacy
from tests import testing


# Composing round by round costs about 75 ms a round (the RDP of every order is recomputed), so
# the counts are a few dozen: the accountant's self-composition must match at any count.
@pytest.mark.parametrize(
    "z, q, rounds, delta", [(1.0, 0.01, 30, 1e-5), (0.8, 0.005, 20, 5e-5), (2.0, 1.0, 3, 1e-3)]
)
def test_epsilon_matches_dp_accounting_composed_round_by_round(z, q, rounds, delta):
    accountant = privacy.PrivacyAccountant(noise_multiplier=z, sampling_rate=q, delta=delta)
    expected = testing.rdp_epsilon_round_by_round(q, z, rounds, delta)
    assert accountant.epsilon(rounds) == pytest.approx(expected, rel=1e-9)


def test_epsilon_agrees_with_the_published_moments_accountant_value():
    """Abadi et al. 2016, section 3.1: q=0.01, sigma=4, delta=1e-5, 10,000 steps: epsilon ~1.26
    with the moments accountant. RDP over finer orders is at most that, and not far below."""
    epsilon = privacy.PrivacyAccountant(noise_multiplier=4.0, sampling_rate=0.01, delta=1e-5)
    got = epsilon.epsilon(10_000)
    assert 1.0 < got <= 1.26, got


def test_rdp_epsilon_is_an_upper_bound_close_to_the_pld_accountant():
    """PLD accounting is tighter than RDP (here by about 1.7x); both bound the same mechanism."""
    z, q, rounds, delta = 1.0, 0.005, 500, 1e-5
    pld_accountant = pld.PLDAccountant()
    pld_accountant.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
        )
    )
    tight = pld_accountant.get_epsilon(delta)
    got = privacy.PrivacyAccountant(noise_multiplier=z, sampling_rate=q, delta=delta).epsilon(
        rounds
    )
    assert tight <= got <= 2.0 * tight, (got, tight)


def test_two_streams_at_sqrt2_times_the_noise_cost_one_stream_at_the_noise():
    """mfl and meta_sgd noise their model and alpha streams with z*sqrt(2) each
    (`aggregation.build_aggregators`); accounted as one Gaussian at z, that must be exact."""
    z, q, rounds, delta = 1.0, 0.01, 200, 1e-5
    both = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z * math.sqrt(2))] * 2)
    accountant = rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, both), rounds)
    )
    ours = privacy.PrivacyAccountant(noise_multiplier=z, sampling_rate=q, delta=delta)
    assert ours.epsilon(rounds) == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    low = privacy.PrivacyAccountant(noise_multiplier=0.8, sampling_rate=0.02, delta=1e-5)
    high = privacy.PrivacyAccountant(noise_multiplier=1.6, sampling_rate=0.02, delta=1e-5)
    assert low.epsilon(0) == 0.0
    values = [low.epsilon(r) for r in (1, 10, 100, 1000)]
    assert values == sorted(values) and values[0] > 0
    assert high.epsilon(100) < low.epsilon(100)


def test_for_training_rate_default_delta_and_report():
    accountant = privacy.PrivacyAccountant.for_training(
        noise_multiplier=1.1, clients_per_round=50, num_train_clients=2000
    )
    assert accountant.sampling_rate == pytest.approx(0.025)
    assert accountant.delta == pytest.approx(1 / 2000)
    report = accountant.report(12)
    assert set(report) == testing.PRIVACY_REPORT_KEYS
    assert report["epsilon"] == pytest.approx(
        testing.rdp_epsilon_round_by_round(0.025, 1.1, 12, 1 / 2000), rel=1e-9
    )
    assert report["rounds"] == 12 and report["accountant"] == privacy.ACCOUNTANT
    explicit = privacy.PrivacyAccountant.for_training(
        noise_multiplier=1.1, clients_per_round=50, num_train_clients=2000, delta=1e-6
    )
    assert explicit.delta == 1e-6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise_multiplier=0.0, sampling_rate=0.1, delta=1e-5), "noise_multiplier"),
        (dict(noise_multiplier=-1.0, sampling_rate=0.1, delta=1e-5), "noise_multiplier"),
        (dict(noise_multiplier=float("nan"), sampling_rate=0.1, delta=1e-5), "noise_multiplier"),
        (dict(noise_multiplier=1.0, sampling_rate=1.5, delta=1e-5), "sampling rate"),
        (dict(noise_multiplier=1.0, sampling_rate=0.0, delta=1e-5), "sampling rate"),
        (dict(noise_multiplier=1.0, sampling_rate=0.1, delta=0.0), "delta"),
        (dict(noise_multiplier=1.0, sampling_rate=0.1, delta=1.0), "delta"),
    ],
)
def test_undefined_accounting_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        privacy.PrivacyAccountant(**kwargs)


def test_more_clients_per_round_than_clients_is_refused():
    with pytest.raises(ValueError, match="sampling rate would be above 1"):
        privacy.PrivacyAccountant.for_training(
            noise_multiplier=1.0, clients_per_round=11, num_train_clients=10
        )
    accountant = privacy.PrivacyAccountant(noise_multiplier=1.0, sampling_rate=0.1, delta=1e-5)
    with pytest.raises(ValueError, match="rounds"):
        accountant.epsilon(-1)
