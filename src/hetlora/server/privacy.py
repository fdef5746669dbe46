"""Privacy accounting for user-level DP-FedAvg, matched to how hetlora samples clients.

The server draws a fixed-size set of K of the N registered clients each round, without
replacement (hetlora.server.federation.sample_clients). The matching accountant event is
dp-accounting's ``SampledWithoutReplacementDpEvent`` (Wang, Balle & Kasiviswanathan,
AISTATS 2019), whose neighbouring relation is *replace one* (the population size is
fixed). Replacing one client changes the sum of clipped updates by at most 2C in L2, so
noise of standard deviation σC is a Gaussian mechanism with noise multiplier σ/2
relative to that sensitivity. ε is computed at ``delta`` with the RDP accountant.

What the accountant assumes, and :class:`ServerPrivacy` provides: the noise is unknown to
anyone but the server (it comes from OS entropy, never from the run's seed, which is in
``config.json``), the sample of clients is secret (amplification by sampling; it is drawn
from the same private entropy), and nothing released depends on a client's data except
through the noised aggregate (no rank pruning, no per-client metrics).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..core.seeds import derive_seed

# Per-client values a round row may not release under DP: each depends on who was sampled or on
# one client's data (its loss, its time, its memory, its rank, why it was dropped).
PER_CLIENT_KEYS = ("clients", "dropped", "ranks", "client_ranks_in", "train_loss", "client_seconds", "peak_rss_mb")
# Values that depend on *which* clients were sampled even without naming one: ranks are public, so a round's
# bytes are Σ of the sampled ranks' bytes and identify the sample; its time and memory follow the sampled
# clients' data and ranks. Under DP they are withheld (time, memory) or released as their expectation over
# the secret sample, the same every round (bytes). Whether a round closed at its deadline follows the sampled
# clients' speed, so it is withheld too.
SAMPLE_DEPENDENT_KEYS = ("seconds", "server_rss_mb", "secure_seconds", "closed_by")


@dataclass(frozen=True)
class ServerPrivacy:
    """The server-private randomness of a DP run: 63 bits from OS entropy (``secrets``).

    It seeds the Gaussian noise of each round and the sampling of clients. It is kept only
    in the run's checkpoints (so a resumed run continues bit-identically), never in
    config.json, summary.json, metrics.jsonl, plots or exports: a DP run's checkpoints are
    server-private.
    """

    secret: int

    @classmethod
    def fresh(cls) -> "ServerPrivacy":
        return cls(secrets.randbits(63))

    def noise_generator(self, round_index: int) -> torch.Generator:
        """The generator of round ``round_index``'s noise (a pure function of the secret and the round)."""
        return torch.Generator().manual_seed(derive_seed("dp-noise", self.secret, round_index))

    @property
    def sampling_seed(self) -> int:
        return derive_seed("dp-sample", self.secret)

    def released(self, row: Mapping[str, Any], expected_bytes: tuple[float, float]) -> dict[str, Any]:
        """A round's row as it may be published: counts instead of the per-client values, nothing that
        depends on which clients were sampled (docs/algorithm.md §6). ``expected_bytes``: (up, down) per
        round averaged over every possible sample, which replace the round's own byte counts."""
        out = {k: v for k, v in row.items() if k not in PER_CLIENT_KEYS + SAMPLE_DEPENDENT_KEYS}
        return out | {"clients": [], "dropped": [], "ranks": {}, "clients_count": len(row.get("clients", [])),
                      "dropped_count": len(row.get("dropped", [])), "train_loss": None,
                      "bytes_up": expected_bytes[0], "bytes_down": expected_bytes[1], "bytes_are": "expected over the secret sample",
                      **{k: None for k in SAMPLE_DEPENDENT_KEYS if k in row}}

    def state(self) -> dict[str, str]:
        return {"dp_secret": str(self.secret)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "ServerPrivacy":
        if "dp_secret" not in state:
            raise ValueError("the checkpoint of this DP run holds no server-private noise state; it cannot be resumed exactly")
        return cls(int(state["dp_secret"]))


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
