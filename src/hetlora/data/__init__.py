"""Federated text data: one client per natural user, examples tokenised only when used.

An example is a chat ``prompt`` (list of messages) and a ``target`` string; the loss
is on the target tokens only. ``load_data`` picks the source: ``chitchat`` (the
default, packaged offline) or a ``.jsonl`` / ``.csv`` file with a ``client_id`` column.
"""

from __future__ import annotations

from typing import Callable

from .federated import Example, FederatedData, RawExample, collate, device_view, end_of_turn_id, tokenize_example

__all__ = ["Example", "FederatedData", "RawExample", "collate", "load_data", "tokenize_example"]


def load_data(source: str, tokenizer, keep: Callable[[list[str]], list[str]] | None = None, **kwargs) -> FederatedData:
    """``chitchat`` or a path to a ``.jsonl`` / ``.csv`` file (see :mod:`hetlora.data.files`).

    ``keep`` (a lean device): maps the federation's client ids to the ones whose data this process keeps;
    the rest is parsed once, never cached, and freed (:func:`hetlora.data.federated.device_view`)."""
    if keep is None:
        return _load(source, tokenizer, cached=True, **kwargs)
    # the chat template compiled (and its type caches filled) before the parse, not among its objects, whose
    # freed arenas these few long-lived objects would pin (~60 MB, measured)
    end_of_turn_id(tokenizer)
    return device_view(lambda: _load(source, tokenizer, cached=False, **kwargs), keep)


def _load(source: str, tokenizer, cached: bool, **kwargs) -> FederatedData:
    if source == "chitchat":
        from .chitchat import load_chitchat

        return load_chitchat(tokenizer, cached=cached, **kwargs)
    from .files import load_file

    return load_file(source, tokenizer, **kwargs)
