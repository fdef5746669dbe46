"""The ClientApp's host: a SuperNode chooses how it holds the frozen weights (node config ``base-weights``)."""

import pytest
from flwr.app import Context, RecordDict

from hetlora.config import RunConfig
from hetlora.flower import client_app


@pytest.mark.parametrize("node_config, expected", [({}, "gguf"), ({"base-weights": "dense"}, "dense"), ({"base-weights": "gguf"}, "gguf")])
def test_a_supernode_may_choose_its_base_in_its_node_config(gguf_model_file, node_config, expected):
    cfg = RunConfig(model=str(gguf_model_file), device="cpu", precision="fp32", r_max=8, r_min=2, min_examples=400,
                    max_length=48, eval_size=12)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, **node_config}, state=RecordDict(), run_config={})
    client_app._HOSTS.clear()
    try:
        assert client_app.client_host(cfg, context).base == expected  # the run says auto: a device client's default is gguf
    finally:
        client_app._HOSTS.clear()


def test_a_node_config_base_that_cannot_be_is_one_clear_error(gguf_model_file):
    cfg = RunConfig(model=str(gguf_model_file), method="fft", device="cpu")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "base-weights": "gguf"}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="fft trains them"):
        client_app.client_host(cfg, context)


def test_a_lean_device_holds_only_its_partitions_data_and_swaps_data_not_model(tiny, chitchat_small, monkeypatch):
    """--release-memory on a SuperNode: the host keeps the data of its partition's client only (the same id, the
    same number of examples as the whole federation's host reports), and a simulation worker asked for another
    partition reloads the data and keeps its model."""
    from hetlora.device.host import ClientHost

    model, tok = tiny
    monkeypatch.setattr("hetlora.models.loading.load_tokenizer", lambda name: tok)
    monkeypatch.setattr("hetlora.models.loading.load_base_model", lambda name, tokenizer=None, base="dense": (model, tok))
    cfg = RunConfig(model="tiny", device="cpu", precision="fp32", r_max=8, r_min=2, min_examples=400, max_length=48,
                    eval_size=12, release_memory=True)
    whole = ClientHost(RunConfig(model="tiny", device="cpu", precision="fp32", r_max=8, r_min=2), model, tok, chitchat_small)

    def context(pid):
        return Context(run_id=1, node_id=7, node_config={"partition-id": pid}, state=RecordDict(), run_config={})

    client_app._HOSTS.clear()
    try:
        host = client_app.client_host(cfg, context(1))
        cid = client_app.my_client_id(host, context(1))
        assert cid == whole.client_ids[1] and list(host.data.train) == [cid]
        assert host.data.num_examples(cid) == whole.data.num_examples(cid)
        same = client_app.client_host(cfg, context(2))
        assert same is host and same.model is model and list(same.data.train) == [whole.client_ids[2]]
        with pytest.raises(ValueError, match="partition-id 99 is outside the"):
            client_app.client_host(cfg, context(99))
    finally:
        client_app._HOSTS.clear()


#: the import names of the ``server`` extra's distributions (pyproject.toml): what a device install lacks
SERVER_ONLY = {"flwr[simulation]": "ray", "matplotlib": "matplotlib", "dp-accounting": "dp_accounting", "scipy": "scipy",
               "rouge-score": "rouge_score"}

DEVICE_INSTALL = """
import importlib.abc, importlib.util, json, sys
ABSENT = set(json.loads(sys.argv[1]))
found = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] in ABSENT else found(name, package)

ATTEMPTED = []  # every import of a server-only package tried, even one a try/except would swallow


class NotInstalled(importlib.abc.MetaPathFinder):  # an import of a server-only package fails, as on a device
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ABSENT:
            ATTEMPTED.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (a device install)", name=name)

sys.meta_path.insert(0, NotInstalled())
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hetlora.clients import get_kind
from hetlora.config import RunConfig
from hetlora.flower import client_app
from hetlora.flower.common import encode_config, to_array_record

cfg = RunConfig(model=sys.argv[2], device="cpu", precision="fp32", r_max=8, r_min=2, min_examples=400, max_length=48,
                eval_size=12, local_steps=1, batch_size=2, release_memory=True).validate()
context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
host = client_app.client_host(cfg, context)
lora = get_kind("lora")
payload = lora.payload(lora.initial_state(host, cfg.r_max, 0), host.client_ids[0], 4, 0, 0)
content = RecordDict({"config": ConfigRecord({"hetlora-config": encode_config(cfg)}), "adapter": to_array_record(payload),
                      "task": ConfigRecord({"client-id": host.client_ids[0], "rank": 4, "round": 1, "base-version": 0})})
TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 0
reply = client_app.app(Message(content, dst_node_id=1, message_type="train"), context)
result = reply.content.config_records["result"]
print(json.dumps({"error": result.get("error"), "base": host.base, "trained": sorted(reply.content.array_records),
                  "imported": sorted(m for m in ABSENT if m in sys.modules), "attempted": sorted(set(ATTEMPTED))}))
"""


def test_the_server_extra_is_what_a_device_does_not_install():
    """pyproject: the ``server`` extra holds exactly the packages listed here, and none of them is a core dependency."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    names = {d.split("=")[0].split(">")[0].split("<")[0].strip() for d in project["optional-dependencies"]["server"]}
    core = {d.split("=")[0].split(">")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert names == set(SERVER_ONLY) and not names & core


def test_a_device_install_trains_a_round_without_the_server_extra(gguf_model_file, tmp_path):
    """A SuperNode installed with ``pip install hetlora`` (no ``server`` extra) trains a round over the GGUF's blocks:
    the ClientApp's path imports none of the server-only packages, and transformers, finding no scipy, imports none
    (36 MB of a SmolLM2 device's resident memory; benchmarks/footprint.py --device-venv)."""
    import json
    import os
    import subprocess
    import sys

    env = os.environ | {"HETLORA_CACHE": os.environ.get("HETLORA_CACHE", str(tmp_path / "cache"))}
    out = subprocess.run([sys.executable, "-c", DEVICE_INSTALL, json.dumps(sorted(SERVER_ONLY.values())), str(gguf_model_file)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["error"] is None and seen["base"] == "gguf" and seen["trained"]
    assert seen["attempted"] == [] and seen["imported"] == []  # not even an import a try/except would have swallowed
