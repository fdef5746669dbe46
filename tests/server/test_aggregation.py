"""A round's replies to its aggregate through the server's one path (hetlora.server.aggregation), with the real
spill store: a module-wise round over safetensors files on disk gives the list round's aggregate and base update,
and leaves no file behind."""

import glob
import os
from dataclasses import replace

import pytest
import torch

from hetlora import METHODS
from hetlora.core.adapter import num_bytes
from hetlora.methods.base import AggregationContext
from hetlora.server import spill
from hetlora.server.aggregation import aggregate_replies
from tests.helpers import SHAPES, make_adapter, make_update


def run(method, replies, ctx, stream):
    return aggregate_replies(METHODS[method], ctx, iter(replies), assigned_ranks=None, exact_rank=False, min_clients=1,
                             upload_bytes=lambda u: num_bytes(u.adapter), stream=stream)


@pytest.mark.parametrize("open_readers", [512, 1])  # 1: every file but the first is opened for each read
@pytest.mark.parametrize("method", ["flora", "recon-svd"])
def test_a_spilled_modulewise_round_is_the_list_round(method, open_readers, monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(spill.tempfile, "tempdir", None)  # TMPDIR is read again
    monkeypatch.setattr(spill, "MAX_OPEN_READERS", open_readers)
    reads, read = [], spill.SpillStore.read
    monkeypatch.setattr(spill.SpillStore, "read", lambda store, index, keys: reads.append(index) or read(store, index, keys))
    ranks = [2, 8, 5, 3, 6]
    updates = [make_update(r, seed=s, n=10 + 7 * s) for s, r in enumerate(ranks)]
    nan = replace(make_update(4, seed=9), adapter={k: v * float("nan") for k, v in make_update(4, seed=9).adapter.items()})
    ctx = AggregationContext(r_max=8, norm_bound=1.5, shapes=SHAPES, previous=make_adapter(8, seed=99))
    listed = run(method, updates + [nan], ctx, stream=False)
    streamed = run(method, [updates[3], nan, *updates[:3], updates[4]], ctx, stream=True)
    assert [d["client"] for d in streamed.dropped] == [d["client"] for d in listed.dropped] == [nan.client_id]
    assert streamed.bytes_up == listed.bytes_up and [u.client_id for u in streamed.kept] == [u.client_id for u in listed.kept]
    assert all(u.adapter == {} for u in streamed.kept) and sorted(reads) == sorted(list(range(5)) * len(SHAPES))  # a module at a time
    for want, have in ((listed.new, streamed.new), (listed.base_update or {}, streamed.base_update or {})):
        assert sorted(have) == sorted(want)
        for key in want:
            torch.testing.assert_close(have[key], want[key], rtol=1e-6, atol=1e-6 * float(want[key].abs().max()))
    assert not glob.glob(os.path.join(tmp_path, "hetlora-spill-*"))  # the round's files went with it


def test_a_dp_round_streams_through_the_servers_path_and_draws_no_noise_for_a_round_it_does_not_release(monkeypatch):
    """DP-FedAvg through :func:`aggregate_replies`: the change round (no update kept, nothing spilled: DP has no
    norm bound) gives the list round's release from identically seeded generators; a round below its minimum of
    clients releases nothing and leaves the server's generator untouched (no noise drawn that nothing used)."""
    from hetlora.methods import streaming
    from hetlora.methods.dp import DPFedAvg

    dp = DPFedAvg(METHODS["hetlora"], clip_norm=0.5, noise_multiplier=0.8, expected_clients=5)
    previous = make_adapter(8, seed=99)
    updates = [make_update(r, seed=s, n=10 + s) for s, r in enumerate([2, 8, 5, 3])]
    kinds, result = [], streaming.ChangeRound.result
    monkeypatch.setattr(streaming.ChangeRound, "result", lambda self: kinds.append(type(self).__name__) or result(self))

    def round_(replies, stream, min_clients=1):
        gen = torch.Generator().manual_seed(11)
        ctx = AggregationContext(r_max=8, norm_bound=1.5, shapes=SHAPES, previous=previous, generator=gen)
        done = aggregate_replies(dp, ctx, iter(replies), assigned_ranks=None, exact_rank=False, min_clients=min_clients,
                                 upload_bytes=lambda u: num_bytes(u.adapter), stream=stream)
        return done, gen

    listed, _ = round_(updates, stream=False)
    streamed, _ = round_(updates[::-1], stream=True)
    assert kinds == ["ChangeRound"] and all(u.adapter == {} for u in streamed.kept)
    for key in listed.new:
        torch.testing.assert_close(streamed.new[key], listed.new[key], rtol=1e-6, atol=1e-7)
    untouched = torch.Generator().manual_seed(11).get_state()
    for stream in (True, False):
        short, gen = round_(updates[:2], stream=stream, min_clients=3)
        assert short.new is None and torch.equal(gen.get_state(), untouched)
    with pytest.raises(ValueError, match="clip_norm > 0"):
        DPFedAvg(METHODS["hetlora"], clip_norm=0.0, noise_multiplier=0.8, expected_clients=5)
