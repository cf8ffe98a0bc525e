"""The client app: local training and evaluation of one client at a time on a single shared PEFT model.

The base model is loaded once; running a client only swaps adapter tensors in and out of it (copies into the
existing parameters), so no client ever owns a model copy. A client's state between rounds is the tensors it
keeps (its personal tensors and, for a strategy's ``refined`` kinds, its refined values of shared ones) and the
state of the optimizer that trains them (:class:`ClientState`). The global model is the shared tensors with the
personal ones at their common values (the adapter's initial values, :attr:`FederatedClient.common`).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedlora.data import CausalLMCollator, ClientData
from fedlora.evaluation import evaluate
from fedlora.federated.config import ClientSettings, EvalSettings
from fedlora.federated.message import FitIns, FitRes
from fedlora.federated.strategy import FederatedStrategy, Stage


@dataclass
class ClientState:
    """What a client keeps between rounds (``personal``: the values of the tensors it keeps, by parameter name);
    ``last_round`` is the last round it trained in (0: never)."""

    client_id: str
    data: ClientData
    personal: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None = None
    last_round: int = 0


def derive_seed(seed: int, round_: int, client_id: str) -> int:
    """A seed for one client in one round, independent of which clients ran before it."""
    return int(np.random.SeedSequence([seed, round_, zlib.crc32(client_id.encode())]).generate_state(1)[0])


class FederatedClient:
    """Trains and evaluates clients on ``model`` (a PEFT model with the strategy's adapter).

    ``fit`` loads the global shared tensors, runs the strategy's stages (:meth:`FederatedStrategy.stages
    <fedlora.federated.strategy.FederatedStrategy.stages>`) and returns a :class:`FitRes` carrying only the shared
    tensors, as the last stage that trained them left them. Shared tensors are trained by a global optimizer
    (fresh every round), personal and refined ones by a local optimizer whose state the client keeps. In each stage
    only that stage's tensors require gradients, so a stage cannot change any other tensor.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        strategy: FederatedStrategy,
        settings: ClientSettings,
        eval_settings: EvalSettings,
        *,
        max_length: int,
        seed: int,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.strategy = strategy
        self.settings = settings
        self.eval_settings = eval_settings
        self.max_length = max_length
        self.seed = seed
        self.progress = progress
        self.names = strategy.tensor_names(model)
        self._params = dict(model.named_parameters())
        self._device = next(model.parameters()).device
        self.common = self.snapshot(self.names["personal"])
        """The personal tensors' common values (the adapter's start): with the shared tensors, the global model."""

    @property
    def kept_names(self) -> list[str]:
        """The tensors a client keeps after training: its personal ones and its refined values of shared ones."""
        return self.names["personal"] + self.names["refined"]

    def new_state(self, data: ClientData) -> ClientState:
        """A client that has not trained yet: its personal tensors at their common values."""
        return ClientState(data.client_id, data, dict(self.common))

    def snapshot(self, names: Sequence[str]) -> dict[str, Tensor]:
        """Detached CPU copies of the named adapter tensors."""
        return {name: self._params[name].detach().to("cpu", copy=True) for name in names}

    def load(self, tensors: Mapping[str, Tensor]) -> None:
        """Copy the given adapter tensors into the model."""
        unknown = set(tensors) - set(self._params)
        if unknown:
            raise KeyError(f"the model has no adapter tensors named {sorted(unknown)[:3]}")
        with torch.no_grad():
            for name, value in tensors.items():
                self._params[name].copy_(value)

    def load_model(self, shared: Mapping[str, Tensor], state: ClientState | None = None) -> None:
        """Load the global model (``shared`` with the common personal values) or, given ``state``, that client's
        model (its kept tensors over the global model)."""
        self.load(shared)
        self.load(self.common)
        if state is not None:
            self.load(state.personal)

    def fit(self, state: ClientState, ins: FitIns) -> FitRes:
        """Train one client for one round (updating ``state`` in place) and return what it sends."""
        self.load_model(ins.tensors)
        seed = derive_seed(self.seed, ins.round, state.client_id)
        torch.manual_seed(seed)  # dropout
        batches = self._batches(state.data.train, torch.Generator().manual_seed(seed))
        local = self._optimizer(self.kept_names, self.strategy.lr("personal", self.settings))
        if local is not None and state.optimizer_state is not None:
            local.load_state_dict(state.optimizer_state)
        shared = self._optimizer(self.names["shared"], self.strategy.lr("shared", self.settings))
        optimizers = {"shared": shared, "personal": local, "refined": local}
        stages = [stage for stage in self.strategy.stages(self.settings) if stage.steps and self._trained(stage)]

        self.model.train()
        metrics: dict[str, float] = {}
        sent = self.snapshot(self.names["shared"])
        personalised = False
        with tqdm(
            total=sum(stage.steps for stage in stages),
            desc=f"round {ins.round} {state.client_id}",
            leave=False,
            disable=not self.progress,
        ) as bar:
            for stage in stages:
                if stage.personal and not personalised:
                    self._load_personal(state)
                    personalised = True
                stage_optimizers = list({id(o): o for g in stage.trains if (o := optimizers[g]) is not None}.values())
                losses = self._train(stage, stage_optimizers, batches, bar)
                metrics[f"train_loss_{stage.name}"] = float(np.mean(losses))
                if "shared" in stage.trains:
                    sent = self.snapshot(self.names["shared"])
        self._set_trainable(self.names["shared"] + self.names["personal"])
        if not personalised:  # no stage trained the client's own tensors: it keeps them as they were
            self._load_personal(state)
        state.personal = self.snapshot(self.kept_names)
        state.optimizer_state = local.state_dict() if local is not None else None
        state.last_round = ins.round
        return FitRes(state.client_id, sent, state.data.num_train_examples, metrics)

    def evaluate(
        self, state: ClientState | None, shared: Mapping[str, Tensor], datasets: Mapping[str, Dataset]
    ) -> dict[str, dict[str, float]]:
        """The global model (``state`` None) or a client's model (see :meth:`load_model`) scored on each named
        dataset."""
        self.load_model(shared, state)
        return {
            split: evaluate(
                self.model,
                self.tokenizer,
                dataset,
                batch_size=self.eval_settings.batch_size,
                rouge_examples=self.eval_settings.rouge_examples,
                max_new_tokens=self.eval_settings.max_new_tokens,
                max_prompt_length=self.max_length,
                seed=self.seed,
            )
            for split, dataset in datasets.items()
        }

    def _load_personal(self, state: ClientState) -> None:
        """Load the client's own personal tensors (not its refined ones: those continue from the current values)."""
        self.load({name: state.personal[name] for name in self.names["personal"]})

    def _stage_names(self, stage: Stage) -> list[str]:
        return [name for group in stage.trains for name in self.names[group]]

    def _trained(self, stage: Stage) -> bool:
        return bool(self._stage_names(stage))

    def _optimizer(self, names: list[str], lr: float) -> torch.optim.Optimizer | None:
        if not names:
            return None
        params = [self._params[name] for name in names]
        if self.settings.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, weight_decay=self.settings.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.settings.weight_decay)

    def _train(
        self,
        stage: Stage,
        optimizers: Sequence[torch.optim.Optimizer],
        batches: Iterator[dict[str, Tensor]],
        bar: tqdm,
    ) -> list[float]:
        names = self._stage_names(stage)
        self._set_trainable(names)
        params = [self._params[name] for name in names]
        losses = []
        for _ in range(stage.steps):
            loss = self.model(**next(batches)).loss
            loss.backward()
            if self.settings.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix_str(f"{stage.name} loss {losses[-1]:.3f}")
            bar.update()
        return losses

    def _set_trainable(self, names: Sequence[str]) -> None:
        """Only ``names`` (among all adapter tensors) require gradients."""
        trainable = set(names)
        for role_names in self.names.values():
            for name in role_names:
                self._params[name].requires_grad_(name in trainable)

    def _batches(self, dataset: Dataset, generator: torch.Generator) -> Iterator[dict[str, Tensor]]:
        """Endless shuffled batches (a new seeded permutation every epoch), on the model's device."""
        loader = DataLoader(
            dataset.select_columns(["input_ids", "labels"]),
            batch_size=self.settings.batch_size,
            sampler=RandomSampler(dataset, generator=generator),
            collate_fn=CausalLMCollator(self.tokenizer.pad_token_id),
        )
        while True:
            for batch in loader:
                yield {name: tensor.to(self._device) for name, tensor in batch.items()}
