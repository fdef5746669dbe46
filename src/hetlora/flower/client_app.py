"""The ClientApp: one SuperNode holds one client's data and trains it with the shared client code.

A node knows its ``partition-id`` (from its node config); the client it holds is the
``partition-id``-th client id of the federation, so identity is stable across rounds.
The model and data are built once per process (a simulation actor keeps them; a
deployed SuperNode starts a fresh process per message and loads the model from the
safetensors cache, never from GGUF).
"""

from __future__ import annotations

import traceback

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..clients import Job, get_kind
from ..config import RunConfig
from ..host import ClientHost
from ..methods import get_method
from .common import config_from_run_config, encode_config, from_array_record, to_array_record

app = ClientApp()
_HOSTS: dict[str, ClientHost] = {}


def client_host(cfg: RunConfig) -> ClientHost:
    """This device's model, data and local settings, built once per process and config."""
    key = encode_config(cfg)
    if key not in _HOSTS:
        _HOSTS.clear()
        _HOSTS[key] = ClientHost(cfg, device_client=True)  # a device: gradient checkpointing on unless configured
    return _HOSTS[key]


def my_client_id(host: ClientHost, context: Context) -> str:
    pid = int(context.node_config.get("partition-id", 0))
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
    host = client_host(_config(message, context))
    cid = my_client_id(host, context)
    identity = {"client-id": cid, "num-examples": host.data.num_examples(cid)}
    if "memory-budget-mb" in context.node_config:  # the device states what it can afford; the server picks its rank
        identity["memory-budget-mb"] = float(context.node_config["memory-budget-mb"])
    reply = RecordDict({"identity": ConfigRecord(identity)})
    return Message(reply, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One local round: the received truncated adapter in, the trained (maybe pruned) one out."""
    cfg = _config(message, context)
    host = client_host(cfg)
    cid = my_client_id(host, context)
    task = message.content.config_records["task"]
    if str(task["client-id"]) != cid:
        raise ValueError(f"asked to train client {task['client-id']} but this node holds {cid}")
    records = message.content.array_records
    job = Job(cid, int(task["rank"]), int(task["round"]), from_array_record(records["adapter"]),
              from_array_record(records["base"]) if "base" in records else {}, int(task.get("base-version", 0)))
    try:
        (update,) = get_kind(get_method(cfg.method).client_kind).train(host, [job], prune=cfg.prunes)
    except Exception:
        error = traceback.format_exc(limit=3)
        return Message(RecordDict({"result": ConfigRecord({"client-id": cid, "error": error})}), reply_to=message)
    metrics = {k: float(v) for k, v in update.metrics.items() if isinstance(v, (int, float))}
    reply = RecordDict(
        {
            "adapter": to_array_record(update.adapter),
            "metrics": MetricRecord(metrics),
            "result": ConfigRecord(
                {"client-id": cid, "num-examples": update.num_examples, "rank": int(update.rank or 0), "round": int(task["round"])}
            ),
        }
    )
    return Message(reply, reply_to=message)


__all__ = ["app"]
