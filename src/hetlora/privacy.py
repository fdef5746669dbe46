"""RDP accounting for user-level DP-FedAvg (Poisson-sampled Gaussian mechanism, dp-accounting)."""

from __future__ import annotations


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """ε after ``steps`` rounds at ``delta`` with an RDP accountant (Mironov et al.)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(sampling_rate, dp_event.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))
