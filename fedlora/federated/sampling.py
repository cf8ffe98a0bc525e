"""Seeded samples of clients: the clients a round trains (:meth:`~fedlora.federated.server.FederatedServer.sample`,
seed sequence [seed, round], :func:`train_sample_size` of them) and the ones a run scores, drawn once per run so
every round scores the same ones.

Both engines score the clients the round driver draws here (:func:`eval_clients`), from ``eval.clients`` or
``eval.fraction`` (see :class:`~fedlora.federated.config.EvalSettings`) and the run's seed; the draw is its own
stream, apart from the rounds' training samples (:meth:`~fedlora.federated.server.FederatedServer.sample`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.federated.config import EvalSettings, ServerSettings

EVAL_STREAM = 0x65766131  # the seed sequence [seed, EVAL_STREAM] is the evaluation draw's; training uses [seed, round]


def fraction_size(fraction: float, num_clients: int) -> int:
    """``max(1, round(fraction · num_clients))``: a fraction of the clients, at least one."""
    return max(1, round(fraction * num_clients))


def train_sample_size(settings: ServerSettings, num_clients: int) -> int:
    """How many of ``num_clients`` clients train in a round: ``min(N, max(round(fraction · N), min_clients, 1))``.
    ``server.min_clients`` is also the least sample, as Flower's ``min_fit_clients``/``min_train_nodes`` is: at
    ``fraction=0.01`` and ``min_clients=10`` a federation of 10 to 1,000 clients trains 10 a round."""
    return min(num_clients, max(fraction_size(settings.fraction, num_clients), settings.min_clients))


def draw(seed: Sequence[int], client_ids: Sequence[str], count: int) -> list[str]:
    """``count`` of ``client_ids`` drawn without replacement by the seed sequence ``seed``, in the given order."""
    chosen = np.random.default_rng(list(seed)).choice(len(client_ids), size=count, replace=False)
    return [client_ids[i] for i in sorted(chosen.tolist())]


def eval_sample_size(settings: EvalSettings, num_clients: int) -> int:
    """How many of ``num_clients`` clients are scored: ``min(clients, N)`` when ``settings.clients`` is set, else
    :func:`fraction_size` of ``settings.fraction``."""
    if settings.clients is not None:
        return min(settings.clients, num_clients)
    return fraction_size(settings.fraction, num_clients)


def eval_clients(settings: EvalSettings, seed: int, client_ids: Sequence[str]) -> list[str]:
    """The clients scored every round, in the given order: a seeded draw without replacement of
    :func:`eval_sample_size` of ``client_ids`` (all of them, in order, when that is every client)."""
    count = eval_sample_size(settings, len(client_ids))
    if count == len(client_ids):
        return list(client_ids)
    return draw([seed, EVAL_STREAM], client_ids, count)
