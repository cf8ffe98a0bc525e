"""Split example indices across federated clients (IID, Dirichlet label skew, one label per client) or sample them.

Each partitioner returns one sorted list of row indices per client; together they cover every row exactly once.
Randomness comes only from ``numpy.random.default_rng(seed)``, so the same inputs and seed give the same split.
Labels are processed in sorted order so the result does not depend on row order of first appearance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[list[int]]:
    """Shuffle the rows and deal them into ``num_clients`` near-equal shares (sizes differ by at most one)."""
    _check_num_clients(num_clients, num_examples)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [sorted(share.tolist()) for share in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: Sequence[object], num_clients: int, alpha: float, seed: int, min_examples: int = 1, max_attempts: int = 1000
) -> list[list[int]]:
    """The usual label-skew split (Hsu et al. 2019; NIID-Bench): per label, client shares ~ Dirichlet(α·1).

    Small α gives each client few dominant labels; large α approaches IID. As in NIID-Bench, a client that already
    holds its fair share ``N / num_clients`` gets no more rows, and the whole draw is repeated until every client
    has at least ``min_examples`` rows; after ``max_attempts`` draws that fail, a ``ValueError`` is raised.
    """
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be positive, got {alpha}")
    labels = np.asarray(labels)
    _check_num_clients(num_clients, len(labels))
    if num_clients * min_examples > len(labels):
        raise ValueError(f"{len(labels)} examples cannot give {num_clients} clients {min_examples} examples each")
    rng = np.random.default_rng(seed)
    rows_by_label = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    fair_share = len(labels) / num_clients
    for _ in range(max_attempts):
        clients: list[list[int]] = [[] for _ in range(num_clients)]
        for rows in rows_by_label:
            shares = rng.dirichlet(np.full(num_clients, alpha))
            open_clients = np.array([len(c) < fair_share for c in clients])
            shares = shares * open_clients
            shares = shares / shares.sum() if shares.sum() > 0 else open_clients / open_clients.sum()
            cuts = (np.cumsum(shares) * len(rows)).astype(int)[:-1]
            for client, part in zip(clients, np.split(rng.permutation(rows), cuts), strict=True):
                client.extend(part.tolist())
        if min(len(c) for c in clients) >= min_examples:
            return [sorted(c) for c in clients]
    raise ValueError(
        f"Dirichlet partition with alpha={alpha} left some of the {num_clients} clients with fewer than "
        f"{min_examples} examples in {max_attempts} attempts; raise alpha, or lower num_clients or min_examples"
    )


def label_partition(labels: Sequence[object], num_clients: int) -> list[list[int]]:
    """Client ``i`` gets every row of the ``i``-th label in sorted order; needs ``num_clients`` == number of labels."""
    labels = np.asarray(labels)
    values = np.unique(labels)
    if num_clients != len(values):
        raise ValueError(
            f"one-label-per-client partition needs num_clients == number of labels ({len(values)}: "
            f"{values.tolist()}), got num_clients={num_clients}"
        )
    return [np.flatnonzero(labels == value).tolist() for value in values]


def sample_indices(num_examples: int, size: int, rng: np.random.Generator | int) -> list[int]:
    """At most ``size`` distinct row indices, seeded and sorted; all rows when ``size >= num_examples``."""
    if size >= num_examples:
        return list(range(num_examples))
    return sorted(np.random.default_rng(rng).choice(num_examples, size, replace=False).tolist())


def _check_num_clients(num_clients: int, num_examples: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > num_examples:
        raise ValueError(f"cannot split {num_examples} examples across {num_clients} clients")
