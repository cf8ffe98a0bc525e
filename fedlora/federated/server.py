"""The server app: client sampling, checks on the clients' messages, aggregation, and the global shared tensors."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from torch import Tensor

from fedlora.federated.aggregation import aggregate_updates, clip_update, make_server_optimizer, update_norm
from fedlora.federated.config import PrivacySettings, ServerSettings
from fedlora.federated.message import FitIns, FitRes, Rejection
from fedlora.federated.privacy import dp_fedavg, epsilon
from fedlora.federated.sampling import draw, train_sample_size

logger = logging.getLogger(__name__)


class RoundError(RuntimeError):
    """A round could not be aggregated (too few valid updates, or new global tensors that are not finite); nothing
    of it was changed or committed."""


class FederatedServer:
    """Holds the global shared tensors x_t and updates them from the clients' :class:`FitRes` messages.

    Each round it samples ``max(round(fraction · N), min_clients)`` of the N clients (all of them when N is fewer),
    seeded by the run seed and the round, and sends them x_t. From their replies it keeps those that pass :meth:`validate`, turns each into an update Δᵢ = yᵢ − x_t
    (clipped to ``settings.clip_norm`` if set) and combines them into Δ_t with ``settings.aggregator`` (with
    ``privacy`` enabled: DP-FedAvg's clipped, noised, unweighted mean), then sets x_{t+1} = server_optimizer(x_t, Δ_t)
    (see :mod:`fedlora.federated.aggregation` and :mod:`fedlora.federated.privacy`). It never sees personal tensors:
    it only ever receives messages.
    """

    def __init__(
        self,
        global_tensors: Mapping[str, Tensor],
        settings: ServerSettings,
        seed: int,
        privacy: PrivacySettings | None = None,
    ) -> None:
        self.global_tensors = dict(global_tensors)
        self.settings = settings
        self.optimizer = make_server_optimizer(settings)
        self.seed = seed
        if privacy is not None:
            privacy.check(settings)
        self.privacy = privacy if privacy is not None and privacy.dp_fedavg else None  # None: no DP-FedAvg here

    def sample_size(self, num_clients: int) -> int:
        """How many of ``num_clients`` clients train in a round (:func:`~fedlora.federated.sampling.train_sample_size`)."""
        return train_sample_size(self.settings, num_clients)

    def sample(self, round_: int, client_ids: Sequence[str]) -> list[str]:
        """The clients that train in ``round_``, in the given order (a seeded draw without replacement)."""
        return draw([self.seed, round_], client_ids, self.sample_size(len(client_ids)))

    def fit_ins(self, round_: int) -> FitIns:
        """What every sampled client receives: the round and the global shared tensors."""
        return FitIns(round_, {name: tensor.clone() for name, tensor in self.global_tensors.items()})

    def validate(self, result: FitRes) -> str | None:
        """Why ``result`` cannot be aggregated, or None: its tensors must be exactly the shared set, each a tensor of
        the global one's shape and dtype with only finite values; ``num_examples`` at least 1; and its update norm
        ‖y − x_t‖₂ over all shared tensors at most ``settings.max_update_norm`` (when set)."""
        missing = sorted(set(self.global_tensors) - set(result.tensors))
        extra = sorted(set(result.tensors) - set(self.global_tensors))
        if missing:
            return f"missing tensors {_listed(missing)}"
        if extra:
            return f"extra tensors {_listed(extra)} (not in the shared set)"
        for name, expected in self.global_tensors.items():
            value = result.tensors[name]
            if not isinstance(value, Tensor):
                return f"{name} is a {type(value).__name__}, not a tensor"
            if value.shape != expected.shape:
                return f"{name} has shape {tuple(value.shape)}, expected {tuple(expected.shape)}"
            if value.dtype != expected.dtype:
                return f"{name} has dtype {value.dtype}, expected {expected.dtype}"
            if value.isnan().any():
                return f"{name} holds NaN values"
            if value.isinf().any():
                return f"{name} holds Inf values"
        if result.num_examples < 1:
            return f"num_examples is {result.num_examples}, not a positive count"
        limit = self.settings.max_update_norm
        if limit is not None and (norm := update_norm(self._update(result))) > limit:
            return f"update norm {norm:.4g} is above server.max_update_norm={limit:g}"
        return None

    def aggregate(
        self, results: Sequence[FitRes], round_: int | None = None, *, failures: Sequence[Rejection] = ()
    ) -> list[Rejection]:
        """Aggregate the valid ``results`` and apply the server optimizer; returns the rejected results' reasons.

        Each rejection is logged (logger ``fedlora.federated.server``). ``failures`` are the other sampled clients,
        whose fit failed: with ``results`` they make up the m sampled clients, and they count against
        ``settings.min_clients`` like the rejected ones. ``round_`` names the round in messages and seeds the DP noise
        (required with privacy). With fewer valid results than ``settings.min_clients``, or when the new global
        tensors would not be finite, this raises a :class:`RoundError` (a RuntimeError) naming the round and every
        excluded client's reason, and the global tensors and the optimizer state stay as they were.
        """
        where = "aggregation" if round_ is None else f"round {round_}"
        valid, rejected = [], []
        for result in results:
            reason = self.validate(result)
            if reason is None:
                valid.append(result)
            else:
                logger.warning("%s: rejected the update of client %s: %s", where, result.client_id, reason)
                rejected.append(Rejection(result.client_id, reason))
        sampled = len(results) + len(failures)
        if len(valid) < self.settings.min_clients:
            excluded = "; ".join(f"{client_id}: {reason}" for client_id, reason in [*failures, *rejected])
            raise RoundError(
                f"{where}: {len(valid)} of {sampled} sampled client(s) sent a valid update, fewer than "
                f"server.min_clients={self.settings.min_clients}; nothing was aggregated. "
                f"Excluded: {excluded or 'none'}"
            )
        if self.global_tensors:
            self._step(self._aggregated_update(valid, sampled, round_), where, valid)
        return rejected

    def epsilon(self, rounds: int, num_clients: int) -> float:
        """The ε (at ``privacy.delta``) spent after ``rounds`` DP-FedAvg rounds over ``num_clients`` clients, with
        sampling rate q = :meth:`sample_size` / ``num_clients`` (see :func:`fedlora.federated.privacy.epsilon`)."""
        if self.privacy is None:
            raise ValueError("differential privacy is off (privacy.noise_multiplier is 0): there is no ε")
        q = self.sample_size(num_clients) / num_clients
        return epsilon(self.privacy.noise_multiplier, q, rounds, self.privacy.delta)

    def _update(self, result: FitRes) -> dict[str, Tensor]:
        """Δᵢ = yᵢ − x_t in float64."""
        return {name: result.tensors[name].double() - value.double() for name, value in self.global_tensors.items()}

    def _aggregated_update(self, valid: Sequence[FitRes], sampled: int, round_: int | None) -> dict[str, Tensor]:
        """Δ_t in float64 from the valid results (``sampled``: the number of clients sampled, m)."""
        updates = [self._update(result) for result in valid]
        if self.settings.clip_norm is not None:
            updates = [clip_update(update, self.settings.clip_norm) for update in updates]
        if self.privacy is None:
            weights = [result.num_examples for result in valid]
            return aggregate_updates(updates, weights, self.settings.aggregator, self.settings.trim_fraction)
        if round_ is None:
            raise ValueError("with differential privacy the noise is seeded by the round: pass round_")
        z, clip_norm = self.privacy.noise_multiplier, self.privacy.clip_norm
        return dp_fedavg(updates, sampled, z, clip_norm, self.seed, round_)

    def _step(self, update: Mapping[str, Tensor], where: str, valid: Sequence[FitRes]) -> None:
        """x_{t+1} = server_optimizer(x_t, Δ_t), unless x_{t+1} is not finite (then raise and change nothing)."""
        delta = {name: update[name].to(value.dtype) for name, value in self.global_tensors.items()}
        before = self.optimizer.state_dict()
        new = self.optimizer.step(self.global_tensors, delta)
        not_finite = [name for name, value in new.items() if not value.isfinite().all()]
        if not_finite:
            self.optimizer.load_state_dict(before)
            raise RoundError(
                f"{where}: the new global tensors {_listed(not_finite)} are not finite (aggregating clients "
                f"{[result.client_id for result in valid]}); nothing was changed"
            )
        self.global_tensors = new


def _listed(names: Sequence[str], shown: int = 3) -> str:
    """The first ``shown`` names, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{list(names[:shown])}{more}"
