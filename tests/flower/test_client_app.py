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
