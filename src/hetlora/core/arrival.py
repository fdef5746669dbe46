"""When a round's replies arrive, and how many clients a round asks (docs/algorithm.md §7.3).

Cross-device rounds close: at a deadline (``round_timeout``), and with over-selection (``over_select`` F)
as soon as K valid replies are in out of the ⌈K(1+F)⌉ clients asked, as production cross-device FL does
(Bonawitz et al., MLSys 2019). Deployed, the replies' real arrival decides. In simulation each client's
reply time comes from a seeded delay model (``client_delay``): a pure function of (seed, round, client), so a
run whose rounds close early is as reproducible as one that waits for every reply.

Pure functions; the delay table file is read by the caller (hetlora.config).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Mapping, Sequence

SPEC_HELP = ("fixed:S | exp:MEAN | lognormal:MEDIAN:SIGMA, optionally ',silent=P' (each client misses a round with "
             "probability P), or a JSON file {client id: seconds, or null for one that never replies}")


@dataclass(frozen=True)
class DelayModel:
    """Each sampled client's reply time in seconds after the round opens (``math.inf``: it never replies).

    ``kind``: ``fixed`` (every client ``params[0]`` s), ``exp`` (exponential, mean ``params[0]``), ``lognormal``
    (median ``params[0]``, log-sd ``params[1]``), or ``table`` (``table[client]``; clients it does not name reply
    at once). Drawn per (seed, round, client), independent of which other clients were sampled."""

    kind: str
    params: tuple[float, ...] = ()
    silent: float = 0.0
    table: Mapping[str, float] = field(default_factory=dict)

    def delay(self, seed: int, round_index: int, client_id: str) -> float:
        if self.kind == "table":
            return self.table.get(client_id, 0.0)
        if self.silent and random.Random(f"silent:{seed}:{round_index}:{client_id}").random() < self.silent:
            return math.inf  # its own stream: the same delays for the clients that reply, whatever P
        rng = random.Random(f"delay:{seed}:{round_index}:{client_id}")
        if self.kind == "fixed":
            return self.params[0]
        if self.kind == "exp":
            return rng.expovariate(1.0 / self.params[0]) if self.params[0] > 0 else 0.0
        return self.params[0] * math.exp(self.params[1] * rng.gauss(0.0, 1.0))


def parse_delay(spec: str) -> DelayModel:
    """A :class:`DelayModel` from ``fixed:S``, ``exp:MEAN`` or ``lognormal:MEDIAN:SIGMA`` (``,silent=P`` optional);
    one ValueError naming the problem otherwise."""
    head, *extras = [part.strip() for part in spec.split(",")]
    kind, _, rest = head.partition(":")
    arity = {"fixed": 1, "exp": 1, "lognormal": 2}
    if kind not in arity:
        raise ValueError(f"client_delay {spec!r}: expected {SPEC_HELP}")
    try:
        params = tuple(float(x) for x in rest.split(":")) if rest else ()
        silent = 0.0
        for extra in extras:
            key, _, value = extra.partition("=")
            if key != "silent":
                raise ValueError(f"unknown option {key!r}")
            silent = float(value)
    except ValueError as err:
        raise ValueError(f"client_delay {spec!r}: {err}; expected {SPEC_HELP}") from None
    if len(params) != arity[kind] or not all(math.isfinite(p) and p >= 0 for p in params):
        raise ValueError(f"client_delay {spec!r}: {kind} takes {arity[kind]} finite non-negative number(s)")
    if not 0.0 <= silent < 1.0:
        raise ValueError(f"client_delay {spec!r}: silent must be a probability in [0, 1), got {silent}")
    return DelayModel(kind, params, silent)


def delay_table(values: Mapping[str, object], source: str) -> DelayModel:
    """A ``table`` model from ``{client id: seconds | None}`` (None: never replies), every value checked."""
    table: dict[str, float] = {}
    for client, seconds in values.items():
        if seconds is None:
            table[str(client)] = math.inf
        elif isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds) and seconds >= 0:
            table[str(client)] = float(seconds)
        else:
            raise ValueError(f"client_delay {source}: client {client!r} has {seconds!r}; expected seconds ≥ 0 or null")
    return DelayModel("table", table=table)


def asked_count(k: int, over_select: float, registered: int) -> int:
    """How many clients a round asks: ⌈K(1+F)⌉, at most every registered client (F = 0: K)."""
    return min(registered, math.ceil(round(k * (1.0 + over_select), 9)))


def arrival_order(clients: Sequence[str], delays: Mapping[str, float], deadline: float | None, seed: int = 0,
                  round_index: int = 0) -> tuple[list[str], list[tuple[str, float]]]:
    """The clients whose replies come in time, earliest first, and ``(client, delay)`` for those whose reply would
    come after ``deadline`` seconds (never, with no deadline and an infinite delay: a round without a deadline
    waits for every reply that will come). Equal delays come in a seeded random order per (seed, round), never by
    id: over-selection would otherwise always keep the lowest ids."""
    def tie(c: str) -> float:
        return random.Random(f"arrival:{seed}:{round_index}:{c}").random()

    ordered = sorted(clients, key=lambda c: (delays[c], tie(c), c))
    limit = math.inf if deadline is None else deadline
    in_time = [c for c in ordered if delays[c] <= limit and math.isfinite(delays[c])]
    taken = set(in_time)
    late = [(c, delays[c]) for c in ordered if c not in taken]
    return in_time, late
