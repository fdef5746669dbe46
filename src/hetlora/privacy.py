"""Privacy accounting for user-level DP-FedAvg, matched to how hetlora samples clients.

The server draws a fixed-size set of K of the N registered clients each round, without
replacement (hetlora.federation.sample_clients). The matching accountant event is
dp-accounting's ``SampledWithoutReplacementDpEvent`` (Wang, Balle & Kasiviswanathan,
AISTATS 2019), whose neighbouring relation is *replace one* (the population size is
fixed). Replacing one client changes the sum of clipped updates by at most 2C in L2, so
noise of standard deviation σC is a Gaussian mechanism with noise multiplier σ/2
relative to that sensitivity. ε is computed at ``delta`` with the RDP accountant.
"""

from __future__ import annotations


def check_sampling(clients_per_round: int, num_clients: int) -> None:
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(f"DP sampling needs 1 ≤ clients_per_round ≤ clients, got {clients_per_round} of {num_clients}")


def epsilon(noise_multiplier: float, clients_per_round: int, num_clients: int, rounds: int, delta: float) -> float:
    """ε after ``rounds`` rounds that each sample ``clients_per_round`` of ``num_clients`` without replacement."""
    check_sampling(clients_per_round, num_clients)
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    gaussian = dp_event.GaussianDpEvent(noise_multiplier / 2.0)
    accountant.compose(dp_event.SampledWithoutReplacementDpEvent(num_clients, clients_per_round, gaussian), rounds)
    return float(accountant.get_epsilon(delta))
