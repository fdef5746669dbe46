import os

import pytest

# Under pytest-xdist (make test runs two workers) each worker gets its share of the cores: torch's intra-op threads
# here, and OMP_NUM_THREADS for the processes a test starts (benchmarks' smoke runs, ClientApps, Ray workers).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    import torch

    torch.set_num_threads(_THREADS)


@pytest.fixture(scope="session")
def tiny():
    """The tiny random Llama and the SmolLM2 tokenizer (deterministic, ~0.4 s)."""
    from hetlora.models.loading import load_base_model

    return load_base_model("tiny")


@pytest.fixture(scope="session")
def chitchat_small(tiny):
    """Chitchat restricted to a few senders by a high min-examples filter."""
    from hetlora.data import load_data

    _, tok = tiny
    return load_data("chitchat", tok, min_examples=400, max_length=48, eval_size=12, seed=0)


@pytest.fixture
def make_host(tiny, chitchat_small):
    """A ClientHost on the tiny model and the small chitchat, with local settings overridden."""
    from dataclasses import replace

    from hetlora.config import RunConfig
    from hetlora.device.host import ClientHost

    def make(seed: int = 0, precision: str = "fp32", **local):
        model, tok = tiny
        host = ClientHost(RunConfig(model="tiny", seed=seed, device="cpu", precision=precision, r_max=32), model, tok, chitchat_small)
        host.local = replace(host.local, **local)
        return host

    return make


@pytest.fixture
def gguf_model_file(tmp_path, monkeypatch):
    """A tiny llama written as a GGUF with its linear and embedding weights in Q8_0 blocks (tests/models/gguf_files.py),
    and a model cache of the test's own."""
    from gguf import GGMLQuantizationType

    from tests.models.gguf_files import tiny_hf_model, write_gguf

    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "cache"))
    return write_gguf(tiny_hf_model("llama"), "llama", tmp_path / "tiny-q8.gguf", int(GGMLQuantizationType.Q8_0))
