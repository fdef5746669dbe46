"""The ClientApp: one SuperNode holds one client's data and trains it with the shared client code.

A node knows its ``partition-id`` (from its node config); the client it holds is the
``partition-id``-th client id of the federation, so identity is stable across rounds. With
``--release-memory`` a node keeps only that client's data (parsed once, the rest freed).
The model and data are built once per process (a simulation actor keeps them; a
deployed SuperNode starts a fresh process per message). A device holds the frozen weights
in the GGUF's own blocks when the model comes from a GGUF (``base-weights`` auto; a node may
choose ``dense`` or ``gguf`` in its node config; docs/algorithm.md §7.1).
"""

from __future__ import annotations

import dataclasses
import traceback

import numpy as np

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from ..clients import Job, get_kind
from ..config import RunConfig
from ..core.secure_sum import client_share, client_weight, contribution, range_problem
from ..core.seeds import derive_seed
from ..device.host import ClientHost
from .common import config_from_run_config, encode_config, from_array_record, to_array_record

app = ClientApp()
_HOSTS: dict[str, ClientHost] = {}


def client_host(cfg: RunConfig, context: Context | None = None) -> ClientHost:
    """This device's model, data and local settings, built once per process and config.

    A SuperNode may choose how it holds the frozen weights (node config ``base-weights``: dense | gguf | auto);
    the run's setting applies otherwise."""
    node_base = (context.node_config.get("base-weights") if context is not None else None)
    if node_base is not None and node_base != cfg.base_weights:
        cfg = dataclasses.replace(cfg, base_weights=str(node_base)).validate()
    own = _partition(context) if cfg.release_memory and context is not None else None  # a lean device: its own data
    key = encode_config(cfg)
    if key not in _HOSTS:
        _HOSTS.clear()
        _HOSTS[key] = ClientHost(cfg, device_client=True, own_client=own)  # a device: gradient checkpointing on
    elif own is not None:
        _HOSTS[key].hold_only(own)  # a simulation's worker serves many partitions: swap the data, keep the model
    return _HOSTS[key]


def _partition(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def my_client_id(host: ClientHost, context: Context) -> str:
    pid = _partition(context)
    if not 0 <= pid < len(host.client_ids):
        raise ValueError(f"partition-id {pid} is outside the {len(host.client_ids)} clients of this federation")
    return host.client_ids[pid]


def _config(message: Message, context: Context) -> RunConfig:
    record = message.content.config_records.get("config")
    if record is not None and "hetlora-config" in record:
        return config_from_run_config(dict(record))
    return config_from_run_config(dict(context.run_config))


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server which client this node holds, how much data it has and (node config
    ``memory-budget-mb``) how much memory it can give a round."""
    host = client_host(_config(message, context), context)
    cid = my_client_id(host, context)
    identity = {"client-id": cid, "num-examples": host.data.num_examples(cid)}
    if "memory-budget-mb" in context.node_config:  # the device states what it can afford; the server picks its rank
        value = context.node_config["memory-budget-mb"]  # sent as given: the server checks it (a bad one leaves the node out)
        identity["memory-budget-mb"] = value if isinstance(value, (bool, int, float)) else str(value)
        identity |= footprint_statement(host)
    reply = RecordDict({"identity": ConfigRecord(identity)})
    return Message(reply, reply_to=message)


def footprint_statement(host: ClientHost) -> dict[str, str]:
    """How this device holds its base and what precision it computes in, as it runs here (both may differ from the
    server's: a node's ``base-weights``, ``auto`` resolved on its own hardware): the server fits the node's budget with
    that setting's footprint (hetlora.device.footprint.stated_setting)."""
    return {"base-weights": host.base, "precision": host.precision}


def _received_job(message: Message, context: Context) -> tuple[RunConfig, ClientHost, Job]:
    """The run config, this device's host and the job the server sent (refused if it names another client)."""
    cfg = _config(message, context)
    host = client_host(cfg, context)
    cid = my_client_id(host, context)
    task = message.content.config_records["task"]
    if str(task["client-id"]) != cid:
        raise ValueError(f"asked to train client {task['client-id']} but this node holds {cid}")
    records = message.content.array_records
    job = Job(cid, int(task["rank"]), int(task["round"]), from_array_record(records["adapter"]),
              from_array_record(records["base"]) if "base" in records else {}, int(task.get("base-version", 0)))
    return cfg, host, job


def _train_one(cfg: RunConfig, host: ClientHost, job: Job, **options):
    (update,) = get_kind(cfg.client_kind).train(host, [job], prune=cfg.prunes, **options)
    return update


def _numbers(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


@app.train()
def train(message: Message, context: Context) -> Message:
    """One local round: the received truncated adapter in, the trained (maybe pruned) one out.

    A SecAgg+ protocol message (``--secure-aggregation``) goes through Flower's ``secaggplus_mod``,
    which trains through :func:`secure_fit` at its masked-vector stage."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, secure_fit)
    cfg, host, job = _received_job(message, context)
    try:
        update = _train_one(cfg, host, job)
    except Exception:
        error = traceback.format_exc(limit=3)
        return Message(RecordDict({"result": ConfigRecord({"client-id": job.client_id, "error": error})}), reply_to=message)
    reply = RecordDict(
        {
            "adapter": to_array_record(update.adapter),
            "metrics": MetricRecord(_numbers(update.metrics)),
            "result": ConfigRecord(
                {"client-id": job.client_id, "num-examples": update.num_examples, "rank": int(update.rank or 0), "round": job.round}
            ),
        }
    )
    return Message(reply, reply_to=message)


#: what a secure reply says of the client's training, in the clear (docs/algorithm.md §6.1): its loss and the
#: ranks in and out of pruning; never its tail norms, seconds or memory.
SECURE_REPORT_METRICS = ("train_loss", "rank_in", "rank_out")


def secure_fit(message: Message, context: Context) -> Message:
    """Train, then hand ``secaggplus_mod`` this client's contribution v_k (docs/algorithm.md §6.1) to mask.

    The contribution is the client's leading min(r_k, r_c) trained components (r_c: the round's covered
    rank, so every component in the sum is held by at least m clients; a tail the client prunes is
    still sent up to r_c), bounded by the round's fixed clip (mandatory), weighted by the client's own
    w_k and padded to r_c; only the masked sum leaves the protocol. The reply says which client, its
    rank after pruning (the server truncates to it next round), its round and loss, never the update.
    A contribution outside the quantiser's range is refused: the client drops out of the sum.
    """
    cfg, host, job = _received_job(message, context)
    task = message.content.config_records["task"]
    missing = [key for key in ("secure-rank", "secure-clip", "secure-scale", "secure-range") if key not in task]
    if missing:
        raise ValueError(f"client {job.client_id}: a secure task without {', '.join(missing)} is refused")
    update = _train_one(cfg, host, job, keep_tail=True)
    adapter = client_share(update.adapter, int(task["secure-rank"]), float(task["secure-clip"]))
    weight = client_weight(adapter, update.num_examples, cfg.secure_weight)
    values = contribution(adapter, weight, int(task["secure-rank"]), float(task["secure-scale"]))
    problem = range_problem(values, float(task["secure-range"]))
    if problem:
        raise ValueError(f"client {job.client_id}: {problem}")
    rank_out = int(update.metrics.get("rank_out", update.rank or 0))
    report = {"client-id": job.client_id, "num-examples": update.num_examples, "rank": rank_out, "round": job.round}
    metrics = {k: v for k, v in _numbers(update.metrics).items() if k in SECURE_REPORT_METRICS}
    # Flower's quantiser rounds stochastically with NumPy's global generator: seeded per (run, round, client),
    # a secure run repeats its numbers (the rounding hides nothing: it is below the grid step)
    np.random.seed(derive_seed("secure-rounding", cfg.seed, job.round, job.client_id) % 2**32)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([v.numpy() for v in values.values()]), 1,
                    report | {f"metric.{k}": v for k, v in metrics.items()})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=message)


__all__ = ["app"]
