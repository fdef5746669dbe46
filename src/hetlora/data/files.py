"""User data: ``.jsonl`` / ``.csv`` with a ``client_id`` column and ``prompt``/``response`` or ``text``.

One client per distinct ``client_id``. A ``prompt``/``response`` row is a one-turn chat
(the loss is on the response); a ``text`` row is plain text (the loss is on all of it).
Each client's rows are split into train/test with the seed. Malformed input raises
``ValueError`` naming the file, the line and the problem.

Typing rules: a client id is a string, or an integer (which becomes its decimal string,
so ``1`` and ``"1"`` are one client); floats, booleans, lists and objects are refused.
Text fields must be strings. A UTF-8 byte-order mark is accepted; CSV is read with a
real CSV reader over the whole file, so quoted fields keep their newlines and line
numbers stay right. Exact duplicate rows are dropped (the count is logged and kept as
``FederatedData.duplicates_dropped``) so that no copy lands on both sides of the split.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from .federated import FederatedData, RawExample, split_by_group

log = logging.getLogger(__name__)
TEXT_FIELDS = ("prompt", "response", "text")


def _client_id(value, where: str) -> str:
    if value is None:
        raise ValueError(f"{where}: missing client_id")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: client_id must be a string or an integer, got {type(value).__name__} {value!r}")
    cid = str(value).strip()
    if not cid:
        raise ValueError(f"{where}: missing client_id")
    return cid


def _text(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key} must be a string, got {type(value).__name__}")
    return value


def _row_example(row: dict, where: str) -> tuple[str, RawExample]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with client_id, got {type(row).__name__}")
    cid = _client_id(row.get("client_id"), where)
    prompt, response, text = (_text(row, k, where) for k in TEXT_FIELDS)
    if prompt is not None and response is not None:
        if not response.strip():
            raise ValueError(f"{where}: empty response")
        return cid, RawExample((("user", prompt),), response)
    if text is not None:
        if not text.strip():
            raise ValueError(f"{where}: empty text")
        return cid, RawExample((), text)
    raise ValueError(f"{where}: needs prompt and response, or text")


def _decode(path: Path) -> str:
    """The file as text (UTF-8, an optional BOM); a bad byte is reported by line, not byte offset."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: unreadable: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x}); save the file as UTF-8") from None


def _csv_rows(path: Path, content: str, needs_id: bool) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    columns = set(reader.fieldnames or [])
    if (needs_id and "client_id" not in columns) or not ({"prompt", "response"} <= columns or "text" in columns):
        raise ValueError(f"{path}:1: header needs client_id and prompt,response or text; got {sorted(columns)}")
    rows = []
    line = 2
    try:
        for row in reader:
            rows.append((f"{path}:{line}", {k: v for k, v in row.items() if k is not None}))
            line = reader.line_num + 1
    except csv.Error as err:
        raise ValueError(f"{path}:{reader.line_num}: bad CSV: {err}") from None
    return rows


def read_rows(path: Path, partition: dict | None = None) -> list[tuple[str, RawExample]]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    content = _decode(path)
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
        raw = _csv_rows(path, content, needs_id=partition is None)
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
    min_examples: int = 1,
    partition: dict | None = None,
) -> FederatedData:
    """``partition`` (e.g. ``{"scheme": "dirichlet", "num_clients": 10, "seed": 0, "label_column": "label",
    "alpha": 0.5}``) assigns clients to rows that have none, through Flower Datasets' partitioners.
    Clients with fewer than ``min_examples`` training examples are dropped."""
    path = Path(source)
    per_client: dict[str, dict[str, list[RawExample]]] = {}
    seen: set[tuple[str, RawExample]] = set()
    duplicates = 0
    for i, (cid, example) in enumerate(read_rows(path, partition)):
        if (cid, example) in seen:
            duplicates += 1
            continue
        seen.add((cid, example))
        per_client.setdefault(cid, {})[f"{i:09d}"] = [example]
    if duplicates:
        log.warning("%s: dropped %d exact duplicate row(s)", path, duplicates)
    train, test = {}, {}
    for cid, rows in per_client.items():
        tr, te = split_by_group(rows, test_fraction, seed, cid)
        if len(tr) >= min_examples:
            train[cid], test[cid] = tr, te
    if not train:
        raise ValueError(f"{path}: no client has {min_examples} training example(s) (min_examples)")
    data = FederatedData(path.name, train, test, tokenizer, max_length, eval_size, seed)
    data.duplicates_dropped = duplicates
    return data
