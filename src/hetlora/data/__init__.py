"""Federated text data: one client per natural user, examples tokenised only when used.

An example is a chat ``prompt`` (list of messages) and a ``target`` string; the loss
is on the target tokens only. ``load_data`` picks the source: ``chitchat`` (the
default, packaged offline) or a ``.jsonl`` / ``.csv`` file with a ``client_id`` column.
"""

from __future__ import annotations

from .federated import Example, FederatedData, RawExample, collate, tokenize_example

__all__ = ["Example", "FederatedData", "RawExample", "collate", "load_data", "tokenize_example"]


def load_data(source: str, tokenizer, **kwargs) -> FederatedData:
    """``chitchat`` or a path to a ``.jsonl`` / ``.csv`` file (see :mod:`hetlora.data.files`)."""
    if source == "chitchat":
        from .chitchat import load_chitchat

        return load_chitchat(tokenizer, **kwargs)
    from .files import load_file

    return load_file(source, tokenizer, **kwargs)
