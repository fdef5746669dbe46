"""One HetLoRA round under SecAgg+ (``--secure-aggregation``; docs/algorithm.md §6.1).

Flower 1.42 offers SecAgg+ through its compatibility layer: :class:`SecAggPlusWorkflow` drives the
four protocol stages over a ``LegacyContext`` whose legacy strategy is asked for the fit
instructions and handed the result. Here the instructions are each node's usual train message
(its own truncated adapter), and the "result" is the unmasked *sum* of the clients' contributions
v_k = (w_k/s · pad(B_k), w_k/s · pad(A_k), w_k/s); :func:`hetlora.core.secure_sum.read_sum` turns it
into the aggregate. No code on the server holds a client's update: the replies carry masked
integers and each client's report (id, rank after pruning, round, train metrics).

Quantisation: SecAgg+ maps each entry to an integer grid of ``QUANTIZATION_RANGE`` levels over
±``VALUE_RANGE``; with 2³⁰ levels the grid step is 1.5e-8, far below the factors' scale.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, ndarray_to_bytes, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from ..core.adapter import ClientUpdate
from ..core.secure_sum import (cover_problem, covered_rank, layout, merge_covered, min_holders, read_sum, round_scale,
                               sum_problem, weight_sum)

log = logging.getLogger(__name__)

VALUE_RANGE = 8.0  # entries of v_k must lie in ±8 (a client outside refuses; SecAgg+ itself would clip silently)
QUANTIZATION_RANGE = 2**30  # levels over ±VALUE_RANGE (the quantiser casts to int32)
MODULUS_RANGE = 2**40  # masks are drawn mod 2⁴⁰: the sum of < 1024 clients' 2³⁰-level entries cannot wrap


class _SumCollector(LegacyStrategy):
    """The legacy strategy SecAgg+ talks to: it names the round's nodes and receives the unmasked sum."""

    def __init__(self, proxies: dict[int, GridClientProxy]):
        self.proxies = proxies
        self.sums: list[np.ndarray] | None = None
        self.reports: list[tuple[int, dict[str, Any]]] = []
        self.failures: list[Any] = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, FitIns(Parameters(tensors=[], tensor_type=""), {})) for proxy in self.proxies.values()]

    def aggregate_fit(self, server_round, results, failures):
        self.failures = list(failures)
        self.reports = [(proxy.node_id, dict(fitres.metrics)) for proxy, fitres in results]
        if results:  # SecAgg+ gives every result the same parameters: the mean of the clients' v_k
            self.sums = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager):  # pragma: no cover - not used by the workflow
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):  # pragma: no cover
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # pragma: no cover
        return None, {}

    def evaluate(self, server_round, parameters):  # pragma: no cover
        return None


class _HetLoRASecAgg(SecAggPlusWorkflow):
    """SecAgg+ whose masked-vector stage carries each node's own train message (its truncated adapter), and
    that unmasks nothing when the masked vectors that arrived no longer cover every component m times."""

    def __init__(self, contents: dict[int, RecordDict], timeout: float, rank_of: dict[int, int], cover: int, min_clients: int):
        super().__init__(num_shares=1.0, reconstruction_threshold=0.5, max_weight=1.0, clipping_range=VALUE_RANGE,
                         quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE, timeout=timeout)
        self.contents = contents
        self.rank_of, self.cover, self.min_clients = rank_of, cover, min_clients
        self.halted: str | None = None  # why the sum was not unmasked

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {nid: self.contents[nid] for nid in state.nid_to_fitins}
        return ok

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        ok = super().collect_masked_vectors_stage(grid, context, state)
        self.halted = cover_problem([self.rank_of[n] for n in state.active_node_ids], self.cover, self.min_clients)
        if ok and self.halted is None:
            return True
        self.halted = self.halted or "too few clients left for SecAgg+ to unmask the sum"
        context.strategy.reports = [(proxy.node_id, dict(fitres.metrics)) for proxy, fitres in state.legacy_results]
        return False  # the round ends here, masked: the reports of those that sent a vector stay, the sum is never read


def contribution_bytes(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    """Bytes of one client's masked vector on the wire (int64 entries in NumPy's format, one array per key)."""
    return _wire_bytes(tuple(shape for _, shape in shapes))


@functools.lru_cache(maxsize=4)
def _wire_bytes(shapes: tuple[tuple[int, ...], ...]) -> int:
    """Serialised once per layout (a run's layout never changes), not every round."""
    return sum(len(ndarray_to_bytes(np.zeros(shape, dtype=np.int64))) for shape in ((1,),) + shapes)


def secure_round(strategy, grid: Grid, t: int, messages: list[Message]) -> dict[str, Any]:
    """Run round ``t`` of ``strategy``'s federation (a :class:`hetlora.flower.server_app.HetLoRAStrategy`) as one
    SecAgg+ protocol; the strategy closes the round from the sum (``complete_secure``). Returns the round's row."""
    fed = strategy.fed
    rule = fed.method.secure_weight
    clients = [str(m.content.config_records["task"]["client-id"]) for m in messages]
    examples = [strategy.examples_of[c] for c in clients]
    scale = round_scale(rule, fed.state["global"], examples)
    rank_of = {m.metadata.dst_node_id: strategy.sent[c] for m, c in zip(messages, clients)}
    min_clients = min_holders(fed.cfg.secure_min_clients, len(messages))
    cover = covered_rank(list(rank_of.values()), min_clients)
    for m in messages:  # every client of the round: the same public scale, range, covered rank and clip
        task = m.content.config_records["task"]
        task["secure-scale"], task["secure-range"] = scale, VALUE_RANGE
        task["secure-rank"], task["secure-clip"] = cover, strategy.secure_clip
    contents = {m.metadata.dst_node_id: m.content for m in messages}
    collector = _SumCollector({node: GridClientProxy(node, grid, 0) for node in contents})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=collector, client_manager=SimpleClientManager())
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: t + 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat_empty_params()
    started = time.perf_counter()
    workflow = _HetLoRASecAgg(contents, strategy.timeout, rank_of, cover, min_clients)
    workflow(grid, context)
    seconds = time.perf_counter() - started
    plan = SecurePlan(cover=cover, min_clients=min_clients, scale=scale, clip=strategy.secure_clip, rule=rule,
                      halted=workflow.halted)
    return strategy.complete_secure(t, collector, plan, seconds)


@dataclass(frozen=True)
class SecurePlan:
    """What the server fixed for a secure round before any client trained (all public), and why it
    stopped early, if it did (docs/algorithm.md §6.1)."""

    cover: int  # r_c: components below it are in the sum, each held by ≥ min_clients clients
    min_clients: int
    scale: float
    clip: float
    rule: str
    halted: str | None = None

    def shapes(self, global_adapter) -> list[tuple[str, tuple[int, ...]]]:
        return layout(global_adapter, self.cover)

    def aggregate(self, sums: dict[str, torch.Tensor], previous, clients: int,
                  examples: float) -> tuple[dict[str, torch.Tensor] | None, str | None]:
        """(the new global adapter, None), or (None, why the sum is refused): checked against what clipped
        clients can sum to, the covered components from the sum, the rest kept from ``previous``. ``sums``:
        what SecAgg+ unmasks, the *mean* of the ``clients`` contributions that arrived (Flower divides by them)."""
        sums = {key: value * clients for key, value in sums.items()}
        aggregate = read_sum(sums)
        entries = sum(v.numel() for v in sums.values())
        problem = sum_problem(aggregate, weight_sum(sums), clients=clients, clip=self.clip, cover=self.cover,
                              scale=self.scale, rule=self.rule, examples=examples, entries=entries)
        return (None, problem) if problem else (merge_covered(aggregate, previous), None)


def compat_empty_params():
    from flwr.compat.common import recorddict_compat as compat

    return compat.parameters_to_arrayrecord(Parameters(tensors=[], tensor_type=""), keep_input=True)


def sums_to_tensors(sums: list[np.ndarray], shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """The unmasked arrays by key (the layout both sides agreed), each checked against its shape."""
    if len(sums) != len(shapes):
        raise ValueError(f"the secure sum has {len(sums)} arrays, the layout {len(shapes)}")
    out = {}
    for array, (key, shape) in zip(sums, shapes):
        if tuple(array.shape) != shape:
            raise ValueError(f"the secure sum's {key} has shape {tuple(array.shape)}, expected {shape}")
        out[key] = torch.from_numpy(np.asarray(array, dtype=np.float64))
    return out


def reports_as_updates(reports: list[tuple[int, dict[str, Any]]]) -> list[ClientUpdate]:
    """Each client's report as an update without tensors (rank, round and metrics; nothing of its update)."""
    return [
        ClientUpdate({}, int(r["num-examples"]), client_id=str(r["client-id"]), rank=int(r["rank"]) or None,
                     round=int(r["round"]), metrics={k[len("metric."):]: v for k, v in r.items() if k.startswith("metric.")})
        for _, r in reports
    ]


__all__ = ["secure_round"]
