"""Exporting a run's models for use without fedlora's engine: the global model, or a client's.

A client's model is the run's global adapter with that client's personal tensors loaded over it, exactly as
``fedlora eval`` scores it: the newest intact checkpoint's global (shared) tensors, and the client's personal tensors
as of that checkpoint (a client that never trained keeps the initial ones ``global_adapter/`` holds). The global
model is the same with the initial personal tensors.

Each model is written as a self-contained PEFT adapter directory (every tensor folded into the adapter weights, its
tokenizer beside them), which ``PeftModel.from_pretrained(base, path)`` loads once ``fedlora`` is imported; or, with
``merge``, merged into the base model (``merge_and_unload``) and saved as a plain transformers model (safetensors)
with its tokenizer. Every destination must be absent or an empty directory, which is checked, with the client ids,
before the model loads; each is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.adapter_tensors import load_adapter_tensors

if TYPE_CHECKING:
    from fedlora.federated.rundir.storage import RunDir

GLOBAL = None
"""The target :func:`export_models` takes for the global model (every other target is a client id)."""


def export_global(run_dir: str | Path, out: str | Path, *, merge: bool = False, device: str = "cpu") -> Path:
    """Write the run's global model to ``out`` (see the module docstring); returns ``out``."""
    return export_models(run_dir, {GLOBAL: Path(out)}, merge=merge, device=device)[GLOBAL]


def export_client(
    run_dir: str | Path, client: str, out: str | Path, *, merge: bool = False, device: str = "cpu"
) -> Path:
    """Write client ``client``'s model (its id or its directory name under ``clients/``) to ``out``; returns it."""
    client_id = resolve_client(run_dir, client)
    return export_models(run_dir, {client_id: Path(out)}, merge=merge, device=device)[client_id]


def export_all_clients(
    run_dir: str | Path, out: str | Path, *, merge: bool = False, device: str = "cpu"
) -> dict[str, Path]:
    """Write every client's model to ``out/<its directory name>/``; returns each client id's directory."""
    names = client_names(run_dir)
    return export_models(run_dir, {cid: Path(out) / name for name, cid in names.items()}, merge=merge, device=device)


def export_models(
    run_dir: str | Path, targets: Mapping[str | None, Path], *, merge: bool = False, device: str = "cpu"
) -> dict[str | None, Path]:
    """Write the model of each target (a client id, or :data:`GLOBAL`) to its directory, loading the base model
    once; returns ``targets``. Raises, before the model loads, a ``FileExistsError`` for a directory that is not
    empty and a ``ValueError`` for an unknown client, a Flower run's client (its SuperNodes keep the client
    states) or ``merge`` of a quantized run."""
    from fedlora.federated.build import load_model
    from fedlora.federated.config import load_run_config
    from fedlora.federated.rundir.storage import atomic_dir, check_writable
    from fedlora.federated.strategy import STRATEGIES

    run = _open(run_dir)
    config = replace(load_run_config(run.config), device=device)
    if merge and config.model.quantization is not None:
        raise ValueError(
            f"merge: the run's base model is quantized (model.quantization={config.model.quantization}); merging "
            "would re-quantize its weights. Export the adapter (without --merge) instead"
        )
    for path in targets.values():
        _check_destination(path)
        check_writable(path)
    checkpoint = run.load_checkpoint()
    clients = [target for target in targets if target is not GLOBAL]
    if clients and checkpoint is not None and checkpoint.clients_keep_states:
        raise ValueError(
            f"{run.path}: the run's clients keep their personal states on their Flower SuperNodes, not in the run "
            "directory; only its global model can be exported"
        )
    known = set(client_names(run.path).values()) if clients else set()
    for client_id in clients:
        if client_id not in known:
            raise ValueError(_unknown_client(run.path, client_id))

    from peft import PeftModel

    model, tokenizer = load_model(config)
    peft_model = PeftModel.from_pretrained(model, run.global_adapter)
    if checkpoint is not None:
        load_adapter_tensors(peft_model, checkpoint.global_tensors)
    strategy = STRATEGIES[config.strategy].with_roles(config.adapter.tensor_roles)
    personal_names = strategy.tensor_names(peft_model)["personal"]
    params = dict(peft_model.named_parameters())
    initial = {name: params[name].detach().clone() for name in personal_names}
    client_rounds = checkpoint.client_rounds if checkpoint is not None else {}
    for target, path in targets.items():
        personal = initial
        if target is not GLOBAL and personal_names and client_rounds.get(target, 0):
            personal, _ = run.load_client(target, client_rounds[target])
        if personal:
            load_adapter_tensors(peft_model, personal)
        with atomic_dir(path.absolute()) as tmp:
            if merge:
                copy.deepcopy(peft_model).merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            else:
                peft_model.save_pretrained(tmp, save_embedding_layers=False)
            tokenizer.save_pretrained(tmp)
    return dict(targets)


def client_names(run_dir: str | Path) -> dict[str, str]:
    """The run's clients: each one's directory name under ``clients/`` and its id (``client_names.json``)."""
    run = _open(run_dir)
    if not run.client_names.is_file():
        raise FileNotFoundError(f"{run.path} has no {run.client_names.name}: no round of it has started")
    return json.loads(run.client_names.read_text(encoding="utf-8"))


def resolve_client(run_dir: str | Path, client: str) -> str:
    """The id of the run's client named ``client`` (its id or its directory name); a ``ValueError`` listing the
    run's client ids when there is none."""
    names = client_names(run_dir)
    if client in names.values():
        return client
    if client in names:
        return names[client]
    raise ValueError(_unknown_client(Path(run_dir), client))


def _unknown_client(run_dir: Path, client: str) -> str:
    known = sorted(client_names(run_dir).values())
    return f"client {client!r} is not a client of the run in {run_dir}; its clients are {known}"


def _open(run_dir: str | Path) -> RunDir:
    """The run directory at ``run_dir``, checked to hold a run (its config and global adapter) and no link."""
    from fedlora.federated.rundir.storage import RunDir

    run = RunDir(run_dir)
    if not run.config.is_file():
        raise FileNotFoundError(f"{run.path} is not a fedlora run directory (no config.yaml)")
    if not (run.global_adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{run.path} has no global adapter ({run.global_adapter}/adapter_config.json)")
    run.check_links()
    return run


def _check_destination(path: Path) -> None:
    """``path`` must not exist, or be an empty directory."""
    if path.is_dir() and any(path.iterdir()):
        raise FileExistsError(f"output directory {path} exists and is not empty; choose another one or empty it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output directory {path} is a file, not a directory")
