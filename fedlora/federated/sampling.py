"""Which clients a run scores: one seeded sample of them, drawn once per run, so every round scores the same ones.

Both engines score the clients the round driver draws here (:func:`eval_clients`), from ``eval.clients`` or
``eval.fraction`` (see :class:`~fedlora.federated.config.EvalSettings`) and the run's seed; the draw is its own
stream, apart from the rounds' training samples (:meth:`~fedlora.federated.server.FederatedServer.sample`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.federated.config import EvalSettings

EVAL_STREAM = 0x65766131  # the seed sequence [seed, EVAL_STREAM] is the evaluation draw's; training uses [seed, round]


def eval_sample_size(settings: EvalSettings, num_clients: int) -> int:
    """How many of ``num_clients`` clients are scored: ``min(clients, N)`` when ``settings.clients`` is set, else
    ``max(1, round(fraction · N))``."""
    if settings.clients is not None:
        return min(settings.clients, num_clients)
    return max(1, round(settings.fraction * num_clients))


def eval_clients(settings: EvalSettings, seed: int, client_ids: Sequence[str]) -> list[str]:
    """The clients scored every round, in the given order: a seeded draw without replacement of
    :func:`eval_sample_size` of ``client_ids`` (all of them, in order, when that is every client)."""
    count = eval_sample_size(settings, len(client_ids))
    if count == len(client_ids):
        return list(client_ids)
    chosen = np.random.default_rng([seed, EVAL_STREAM]).choice(len(client_ids), size=count, replace=False)
    return [client_ids[i] for i in sorted(chosen.tolist())]
