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
