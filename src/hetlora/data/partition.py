"""Clients for data without natural ones: Flower Datasets' IID and Dirichlet(α) partitioners."""

from __future__ import annotations


def partition_rows(rows: list[dict], scheme: str, num_clients: int, seed: int, label_column: str = "label", alpha: float = 0.5) -> list[dict]:
    """Return ``rows`` with a ``client_id`` column from ``iid`` or ``dirichlet`` partitioning."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if num_clients < 1:
        raise ValueError(f"num_clients must be ≥ 1, got {num_clients}")
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
        data = Dataset.from_list(rows).shuffle(seed=seed)
    elif scheme == "dirichlet":
        missing = [i + 1 for i, r in enumerate(rows) if r.get(label_column) is None]
        if missing:
            raise ValueError(f"dirichlet partitioning needs a {label_column!r} column; row(s) {missing[:3]} lack it")
        partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by=label_column, alpha=alpha, min_partition_size=1, seed=seed)
        data = Dataset.from_list([r | {label_column: str(r[label_column])} for r in rows])
    else:
        raise ValueError(f"unknown partitioning {scheme!r}; use iid or dirichlet")
    partitioner.dataset = data
    out = []
    for i in range(num_clients):
        out += [r | {"client_id": f"client-{i:04d}"} for r in partitioner.load_partition(i).to_list()]
    return out
