"""User data: ``.jsonl`` / ``.csv`` with a ``client_id`` column and ``prompt``/``response`` or ``text``.

One client per distinct ``client_id``. A ``prompt``/``response`` row is a one-turn chat
(the loss is on the response); a ``text`` row is plain text (the loss is on all of it).
Each client's rows are split into train/test with the seed. Malformed input raises
``ValueError`` naming the file, the line and the problem.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .federated import FederatedData, RawExample, split_by_group


def _row_example(row: dict, where: str) -> tuple[str, RawExample]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with client_id, got {type(row).__name__}")
    cid = row.get("client_id")
    if cid is None or str(cid).strip() == "":
        raise ValueError(f"{where}: missing client_id")
    if row.get("prompt") is not None and row.get("response") is not None:
        prompt, response = str(row["prompt"]), str(row["response"])
        if not response.strip():
            raise ValueError(f"{where}: empty response")
        return str(cid), RawExample((("user", prompt),), response)
    if row.get("text") is not None:
        if not str(row["text"]).strip():
            raise ValueError(f"{where}: empty text")
        return str(cid), RawExample((), str(row["text"]))
    raise ValueError(f"{where}: needs prompt and response, or text")


def read_rows(path: Path, partition: dict | None = None) -> list[tuple[str, RawExample]]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: unreadable: {err}") from None
    raw: list[tuple[str, dict]] = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i}: bad JSON: {err.msg}") from None
    elif path.suffix == ".csv":
        reader = csv.DictReader(content.splitlines())
        columns = set(reader.fieldnames or [])
        needs_id = partition is None
        if (needs_id and "client_id" not in columns) or not ({"prompt", "response"} <= columns or "text" in columns):
            raise ValueError(f"{path}:1: header needs client_id and prompt,response or text; got {sorted(columns)}")
        raw = [(f"{path}:{i}", row) for i, row in enumerate(reader, 2)]
    else:
        raise ValueError(f"{path}: unsupported format {path.suffix!r}; use .jsonl or .csv")
    if not raw:
        raise ValueError(f"{path}: no examples")
    if partition is not None:
        from .partition import partition_rows

        bad = [where for where, row in raw if not isinstance(row, dict)]
        if bad:
            raise ValueError(f"{bad[0]}: expected an object")
        parted = partition_rows([row | {"_where": where} for where, row in raw], **partition)
        raw = [(row.pop("_where"), row) for row in parted]
    return [_row_example(row, where) for where, row in raw]


def load_file(
    source: str,
    tokenizer,
    *,
    test_fraction: float = 0.2,
    max_length: int = 128,
    eval_size: int = 256,
    seed: int = 0,
    partition: dict | None = None,
) -> FederatedData:
    """``partition`` (e.g. ``{"scheme": "dirichlet", "num_clients": 10, "seed": 0, "label_column": "label",
    "alpha": 0.5}``) assigns clients to rows that have none, through Flower Datasets' partitioners."""
    path = Path(source)
    per_client: dict[str, dict[str, list[RawExample]]] = {}
    for i, (cid, example) in enumerate(read_rows(path, partition)):
        per_client.setdefault(cid, {})[f"{i:09d}"] = [example]
    train, test = {}, {}
    for cid, rows in per_client.items():
        train[cid], test[cid] = split_by_group(rows, test_fraction, seed, cid)
    return FederatedData(path.name, train, test, tokenizer, max_length, eval_size, seed)
