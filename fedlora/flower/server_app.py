"""The Flower ServerApp: fedlora's federated loop over the SuperNodes connected to the SuperLink.

:func:`serve` waits for the SuperNodes, asks each for its client id, then runs the rounds of the in-process
engine (:func:`fedlora.federated.train`) with messages instead of function calls: the sampled clients train and
send back their shared tensors, :class:`~fedlora.flower.strategy.FedLoraStrategy` (optionally wrapped by a Flower
DP wrapper) aggregates them, and every ``eval.every`` rounds (and after the last) every client scores the new
global tensors with its personal tensors. The run directory on the SuperLink's machine gets what the in-process
engine writes there except client state (which stays on the nodes) and the resume checkpoint:
``config.yaml``, ``metrics.jsonl``, ``scores.png`` and ``global_adapter/`` (PEFT format).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from fedlora.data import resolve_prompt_format
from fedlora.federated.config import RunConfig, save_config
from fedlora.federated.report import format_table, plot_scores, privacy_rows, round_title, summarize, train_rows
from fedlora.federated.run import publish_adapter
from fedlora.federated.server import ServerApp as FedLoraServer
from fedlora.federated.storage import RunDir, atomic_write
from fedlora.federated.strategy import STRATEGIES
from fedlora.flower.config import FlowerSettings, fresh_output_dir, from_run_config
from fedlora.flower.node import build_adapter
from fedlora.flower.records import CLIENT_ID, CONFIG, to_record, to_tensors
from fedlora.flower.strategy import FedLoraStrategy, check_privacy, with_privacy

POLL_SECONDS = 0.2
logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``: the configuration comes from the run config (see :mod:`fedlora.flower.config`)."""
    serve(grid, *from_run_config(context.run_config))


def serve(grid: Grid, config: RunConfig, settings: FlowerSettings) -> Path:
    """Run the federation described by ``config`` on ``grid``'s SuperNodes; returns the run directory."""
    if STRATEGIES[config.strategy].pooled:
        raise ValueError(f"strategy {config.strategy!r} trains one pooled client and cannot run on Flower")
    check_privacy(config, settings)
    config = fresh_output_dir(config)
    run_dir = RunDir(config.output_dir)
    adapter = build_adapter(config)
    prompt_format = resolve_prompt_format(config.data.prompt_format, adapter.tokenizer)  # as the nodes resolve it
    config = replace(config, data=replace(config.data, prompt_format=prompt_format))
    initial_personal = adapter.snapshot(adapter.names["personal"])
    node_ids = wait_for_nodes(grid, settings.min_nodes_for(config), settings.node_timeout)
    nodes = identify(grid, node_ids, settings.round_timeout)
    server = FedLoraServer(adapter.snapshot(adapter.names["shared"]), config.server, config.seed, config.privacy)
    fedlora = FedLoraStrategy(server, nodes)
    strategy = with_privacy(fedlora, settings, len(server.sample(1, list(nodes))))
    strategy.summary()
    run_dir.path.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir.config, lambda tmp: save_config(config, tmp))
    arrays = to_record(server.global_tensors)
    publish_adapter(adapter, server.global_tensors, initial_personal, run_dir)
    tqdm.write(f"fedlora {config.strategy} on Flower: clients {list(nodes)}, run dir {run_dir.path}")
    started = time.perf_counter()  # round 0: the initial adapter (the base model), committed with round 1
    strategy.aggregate_evaluate(
        0, exchange(grid, strategy.configure_evaluate(0, arrays, ConfigRecord(), grid), settings.round_timeout)
    )
    initial = summarize(0, fedlora.scores)
    rows = [{"round": 0, **row} for row in fedlora.scores] + initial
    title = f"round 0/{config.rounds} · {config.strategy} · initial adapter · {time.perf_counter() - started:.1f} s"
    tqdm.write(format_table(title, initial))

    for round_ in range(1, config.rounds + 1):
        started = time.perf_counter()
        replies = exchange(grid, strategy.configure_train(round_, arrays, ConfigRecord(), grid), settings.round_timeout)
        aggregated, _ = strategy.aggregate_train(round_, replies)
        if aggregated is None:
            raise RuntimeError(f"round {round_}: the strategy did not aggregate the replies (see the log above)")
        arrays = aggregated
        rows += train_rows(round_, fedlora.results, fedlora.rejected, fedlora.failures)
        epsilon = server.epsilon(round_, len(nodes)) if server.privacy else None
        rows += privacy_rows(round_, epsilon, config.privacy.delta)
        evaluated = round_ % config.eval.every == 0 or round_ == config.rounds
        if evaluated:
            messages = strategy.configure_evaluate(round_, arrays, ConfigRecord(), grid)
            strategy.aggregate_evaluate(round_, exchange(grid, messages, settings.round_timeout))
            summaries = summarize(round_, fedlora.scores)
            rows += [{"round": round_, **row} for row in fedlora.scores] + summaries
            sampled = len(fedlora.results) + len(fedlora.failures)
            seconds = time.perf_counter() - started
            tqdm.write(
                format_table(round_title(round_, rows, config.rounds, config.strategy, sampled, seconds), summaries)
            )
        run_dir.append_metrics(rows)
        if evaluated:
            plot_scores(run_dir.read_metrics(), run_dir.plot)
        publish_adapter(adapter, to_tensors(arrays), initial_personal, run_dir)
        rows = []
    return run_dir.path


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """The ids of the connected SuperNodes once there are at least ``count``."""
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(node_ids)} of {count} SuperNodes connected within {timeout:.0f} s")
        time.sleep(POLL_SECONDS)
    return node_ids


def identify(grid: Grid, node_ids: Iterable[int], timeout: float) -> dict[str, int]:
    """Client id -> node id for every node, in client-id order (which is the in-process engine's client order)."""
    messages = [
        Message(RecordDict({CONFIG: ConfigRecord()}), dst_node_id=node_id, message_type=MessageType.QUERY)
        for node_id in node_ids
    ]
    replies = exchange(grid, messages, timeout)
    if len(replies) < len(messages):
        raise TimeoutError(f"{len(messages) - len(replies)} SuperNode(s) did not reply within {timeout:.0f} s")
    nodes: dict[str, int] = {}
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"SuperNode {reply.metadata.src_node_id} failed: {reply.error.reason}")
        client_id = str(reply.content.config_records[CONFIG][CLIENT_ID])
        if client_id in nodes:
            raise ValueError(f"SuperNodes {nodes[client_id]} and {reply.metadata.src_node_id} both hold {client_id!r}")
        nodes[client_id] = reply.metadata.src_node_id
    return dict(sorted(nodes.items()))


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Send ``messages`` and return the replies (error replies included) that arrive within ``timeout`` seconds.

    A node that fails replies with an error; one that died gets an error reply from the SuperLink once it misses
    its heartbeats, or no reply before the deadline. Either way the caller sees fewer good replies than messages.
    """
    messages = list(messages)
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending and time.monotonic() <= deadline:
        time.sleep(POLL_SECONDS)
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
    if pending:
        logger.warning("%d of %d message(s) got no reply within %.0f s", len(pending), len(messages), timeout)
    return replies
