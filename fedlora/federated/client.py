"""The client app: local training and evaluation of one client at a time on a single shared PEFT model.

The base model is loaded once; running a client only swaps adapter tensors in and out of it (copies into the
existing parameters), so no client ever owns a model copy. A client's state between rounds is its personal
tensors and the state of the optimizer that trains them (:class:`ClientState`).
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
from fedlora.federated.strategy import FederatedStrategy


@dataclass
class ClientState:
    """What a client keeps between rounds; ``last_round`` is the last round it trained in (0: never)."""

    client_id: str
    data: ClientData
    personal: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None = None
    last_round: int = 0


@dataclass
class _Stage:
    name: str
    steps: int
    names: list[str]
    optimizers: list[torch.optim.Optimizer]


def derive_seed(seed: int, round_: int, client_id: str) -> int:
    """A seed for one client in one round, independent of which clients ran before it."""
    return int(np.random.SeedSequence([seed, round_, zlib.crc32(client_id.encode())]).generate_state(1)[0])


class FederatedClient:
    """Trains and evaluates clients on ``model`` (a PEFT model with the strategy's adapter).

    ``fit`` loads the global shared tensors and the client's personal tensors, trains, and returns a
    :class:`FitRes` carrying only the shared tensors. With a ``two_stage`` strategy the local optimizer trains
    the personal tensors and a fresh global optimizer the shared ones, one stage after the other in
    ``settings.order`` (``local-first``, ``global-first``), or both stepping on every batch of one stage of
    ``local_steps + global_steps`` steps (``joint``); otherwise both optimizers step together on every batch. In each stage only that stage's
    tensors require gradients, so a stage cannot change any other tensor.
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

    def new_state(self, data: ClientData) -> ClientState:
        """A client that has not trained yet: its personal tensors are the model's current (initial) values."""
        return ClientState(data.client_id, data, self.snapshot(self.names["personal"]))

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

    def fit(self, state: ClientState, ins: FitIns) -> FitRes:
        """Train one client for one round (updating ``state`` in place) and return what it sends."""
        self.load(ins.tensors)
        self.load(state.personal)
        seed = derive_seed(self.seed, ins.round, state.client_id)
        torch.manual_seed(seed)  # dropout
        batches = self._batches(state.data.train, torch.Generator().manual_seed(seed))
        local = self._optimizer(self.names["personal"], self._lr("local"))
        if local is not None and state.optimizer_state is not None:
            local.load_state_dict(state.optimizer_state)
        shared = self._optimizer(self.names["shared"], self._lr("global"))
        stages = [stage for stage in self._stages(local, shared) if stage.steps and stage.names]

        self.model.train()
        metrics: dict[str, float] = {}
        total = sum(stage.steps for stage in stages)
        with tqdm(
            total=total, desc=f"round {ins.round} {state.client_id}", leave=False, disable=not self.progress
        ) as bar:
            for stage in stages:
                losses = self._train(stage, batches, bar)
                metrics[f"train_loss_{stage.name}"] = float(np.mean(losses))
        self._set_trainable(self.names["shared"] + self.names["personal"])

        state.personal = self.snapshot(self.names["personal"])
        state.optimizer_state = local.state_dict() if local is not None else None
        state.last_round = ins.round
        return FitRes(state.client_id, self.snapshot(self.names["shared"]), len(state.data.train), metrics)

    def evaluate(
        self, state: ClientState, shared: Mapping[str, Tensor], datasets: Mapping[str, Dataset]
    ) -> dict[str, dict[str, float]]:
        """The client's model (``shared`` + its personal tensors) scored on each named dataset."""
        self.load(shared)
        self.load(state.personal)
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

    def _lr(self, stage: str) -> float:
        if not self.strategy.two_stage:
            return self.settings.lr
        return self.settings.local_lr if stage == "local" else self.settings.global_lr

    def _stages(self, local: torch.optim.Optimizer | None, shared: torch.optim.Optimizer | None) -> list[_Stage]:
        personal, global_ = self.names["personal"], self.names["shared"]
        if not self.strategy.two_stage:
            optimizers = [opt for opt in (local, shared) if opt is not None]
            return [_Stage("joint", self.settings.steps, personal + global_, optimizers)]
        local_opt, shared_opt = [local] if local is not None else [], [shared] if shared is not None else []
        if self.settings.order == "joint":
            steps = self.settings.local_steps + self.settings.global_steps
            return [_Stage("joint", steps, personal + global_, local_opt + shared_opt)]
        stages = [
            _Stage("local", self.settings.local_steps, personal, local_opt),
            _Stage("global", self.settings.global_steps, global_, shared_opt),
        ]
        return stages if self.settings.order == "local-first" else stages[::-1]

    def _optimizer(self, names: list[str], lr: float) -> torch.optim.Optimizer | None:
        if not names:
            return None
        params = [self._params[name] for name in names]
        if self.settings.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, weight_decay=self.settings.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.settings.weight_decay)

    def _train(self, stage: _Stage, batches: Iterator[dict[str, Tensor]], bar: tqdm) -> list[float]:
        self._set_trainable(stage.names)
        params = [self._params[name] for name in stage.names]
        losses = []
        for _ in range(stage.steps):
            loss = self.model(**next(batches)).loss
            loss.backward()
            if self.settings.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
            for optimizer in stage.optimizers:
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
