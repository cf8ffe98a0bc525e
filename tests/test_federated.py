"""Federated engine: messages per strategy, aggregation math, run directory, resume, config errors, client stages."""

from __future__ import annotations

import gc
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedlora.data import build_federated_data
from fedlora.evaluation import evaluate_loss
from fedlora.federated import (
    ClientState,
    FedAdam,
    FedAvgM,
    FederatedClient,
    FederatedServer,
    FedYogi,
    FitIns,
    FitRes,
    RunConfig,
    ServerOptimizer,
    build_config,
    evaluate_run,
    load_config,
    train,
    weighted_average,
)
from fedlora.federated.build import build_client
from fedlora.federated.config import EvalSettings, ServerSettings
from fedlora.federated.report import GLOBAL_MODEL
from fedlora.federated.run import build_federation
from fedlora.federated.rundir import storage
from fedlora.federated.sampling import eval_clients
from tests.tiny import tiny_llama, tiny_tokenizer

LABELS = ("open_qa", "summarization", "brainstorming", "classification")
MODULES = [
    f"base_model.model.model.layers.{layer}.self_attn.{proj}" for layer in (0, 1) for proj in ("q_proj", "v_proj")
]
FEDDORA = [f"feddora_{f}.default.{p}" for f in "AB" for p in ("direction", "magnitude")]


def names(*suffixes: str) -> set[str]:
    return {f"{module}.{suffix}" for module in MODULES for suffix in suffixes}


DIRECTIONS = names("feddora_A.default.direction", "feddora_B.default.direction")
MAGNITUDES = names("feddora_A.default.magnitude", "feddora_B.default.magnitude")
LORA_A, LORA_B = names("lora_A.default.weight"), names("lora_B.default.weight")
# strategy -> (tensors every message carries, personal tensors that must never be sent)
COMMUNICATION = {
    "fedlora-opt": (DIRECTIONS, MAGNITUDES),
    "fedit": (LORA_A | LORA_B, set()),
    "ffa-lora": (LORA_B, set()),
    "fedsa-lora": (LORA_A, LORA_B),
    "fed-dora": (names(*FEDDORA), set()),
    "local": (set(), names(*FEDDORA)),
    "centralized": (names(*FEDDORA), set()),
}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """72 short synthetic instruction rows over four labels."""
    rows = [
        {
            "instruction": f"Question {i} about {LABELS[i % 4]}: what is {i} plus {i}?",
            "context": "Numbers like 1, 2, 3 appear in text too." if i % 3 == 0 else "",
            "response": f"The answer is {2 * i}. A fruit or a vegetable.",
            "category": LABELS[i % 4],
        }
        for i in range(72)
    ]
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def tiny_config(data_file: Path, output_dir: Path, *overrides: str) -> RunConfig:
    base = [
        f"data.path={data_file}",
        "data.num_clients=3",
        "data.alpha=1.0",
        "data.min_examples=8",
        "data.max_length=48",
        "data.global_test_size=6",
        "adapter.r=4",
        "client.batch_size=4",
        "client.steps=2",
        "client.local_steps=1",
        "client.global_steps=1",
        "rounds=1",
        "eval.rouge_examples=0",
        f"output_dir={output_dir}",
    ]
    return build_config({}, [*base, *overrides])


def tiny_train(config: RunConfig, tokenizer, resume: bool = False) -> Path:
    return train(config, resume=resume, model=tiny_llama(len(tokenizer)), tokenizer=tokenizer, progress=False)


@pytest.fixture
def make_config(data_file, tmp_path):
    return lambda *overrides: tiny_config(data_file, tmp_path / "run", *overrides)


@pytest.fixture
def run(tokenizer):
    return lambda config, resume=False: tiny_train(config, tokenizer, resume)


@pytest.fixture
def exchanges(monkeypatch) -> list[tuple[FitIns, FitRes]]:
    """Every (FitIns, FitRes) pair that crosses the client boundary."""
    recorded: list[tuple[FitIns, FitRes]] = []
    fit = FederatedClient.fit

    def spy(self, state, ins):
        result = fit(self, state, ins)
        recorded.append((ins, result))
        return result

    monkeypatch.setattr(FederatedClient, "fit", spy)
    return recorded


def server_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the server's files: the checkpoint and the global adapter."""
    tensors = {}
    for file in [*(run_dir / "checkpoint").glob("*.safetensors"), run_dir / "global_adapter/adapter_model.safetensors"]:
        tensors.update({f"{file.parent.name}/{file.name}/{k}": v for k, v in load_file(file).items()})
    return tensors


# ------------------------------------------------------------------------------------------------- communication


@pytest.mark.parametrize("strategy", list(COMMUNICATION))
def test_messages_carry_exactly_the_shared_tensors(strategy, make_config, run, exchanges):
    shared, personal = COMMUNICATION[strategy]
    config = make_config(f"strategy={strategy}")
    run_dir = run(config)

    clients = {res.client_id for _, res in exchanges}
    assert clients == ({"pooled"} if strategy == "centralized" else {"client_0", "client_1", "client_2"})
    for ins, res in exchanges:
        assert set(ins.tensors) == shared
        assert set(res.tensors) == shared
        assert not set(res.tensors) & personal
        assert res.num_examples > 0 and res.metrics
    if strategy == "centralized":
        clients = build_federated_data(config.data).clients
        assert exchanges[0][1].num_examples == sum(c.num_train_examples for c in clients)  # the pooled train splits

    assert set(load_file(run_dir / "checkpoint/global.safetensors")) == shared
    client_files = sorted((run_dir / "clients").glob("*/personal.safetensors"))
    assert len(client_files) == (3 if personal else 0)
    # The server's files hold personal tensors only at their initial values (in the PEFT-format global adapter);
    # no value a client trained ever reaches them.
    adapter = load_file(run_dir / "global_adapter/adapter_model.safetensors")
    on_server = list(server_tensors(run_dir).values())
    trained = []
    for file in client_files:
        kept = load_file(file)
        assert set(kept) == personal
        trained += [v for n, v in kept.items() if not torch.equal(v, adapter[n.replace(".default", "")])]
    assert bool(trained) == bool(personal)
    for value in trained:
        assert not any(v.shape == value.shape and torch.equal(v, value) for v in on_server)


def test_no_raw_example_reaches_the_server(make_config, run, exchanges, data_file):
    """A client sends tensors, its example count and float training metrics; no text of its examples (instruction,
    context or response) appears in any message or in any file outside the clients' own directories."""
    run_dir = run(make_config())
    for _, res in exchanges:
        assert all(isinstance(value, float) for value in res.metrics.values())
    server_files = [
        p for p in run_dir.rglob("*") if p.is_file() and not p.relative_to(run_dir).parts[0].startswith("clients")
    ]
    assert {p.relative_to(run_dir).parts[0] for p in server_files} >= {"checkpoint", "global_adapter", "metrics.jsonl"}
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    texts = {row[key] for row in rows for key in ("instruction", "context", "response") if row[key]}
    contents = [p.read_bytes() for p in server_files]
    assert not [text for text in texts if any(text.encode() in content for content in contents)]


# ------------------------------------------------------------------------------------------------- aggregation


def test_weighted_average_by_example_counts():
    states = [
        {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.0)},
        {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor(4.0)},
    ]
    average = weighted_average(states, [1, 3])
    torch.testing.assert_close(average["w"], torch.tensor([2.5, 5.0]))  # (1·1 + 3·3)/4, (1·2 + 3·6)/4
    torch.testing.assert_close(average["b"], torch.tensor(3.0))
    with pytest.raises(ValueError, match="different tensors"):
        weighted_average([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average(states, [0, 0])


def test_server_app_aggregates_messages_weighted():
    server = FederatedServer({"w": torch.tensor([0.0])}, ServerSettings(), seed=0)
    server.aggregate([FitRes("a", {"w": torch.tensor([1.0])}, 1, {}), FitRes("b", {"w": torch.tensor([5.0])}, 3, {})])
    torch.testing.assert_close(server.global_tensors["w"], torch.tensor([4.0]))  # (1 + 15) / 4
    with pytest.raises(RuntimeError, match="not in the shared set"):
        server.aggregate([FitRes("a", {"w": torch.tensor([1.0]), "m": torch.tensor([1.0])}, 1, {})])


def test_client_sampling_is_seeded():
    server = FederatedServer({}, ServerSettings(fraction=0.5), seed=3)
    ids = ["c0", "c1", "c2", "c3"]
    picks = [server.sample(r, ids) for r in range(1, 6)]
    assert all(len(p) == 2 and p == sorted(p) for p in picks)
    assert picks == [FederatedServer({}, ServerSettings(fraction=0.5), seed=3).sample(r, ids) for r in range(1, 6)]
    assert len({tuple(p) for p in picks}) > 1


@pytest.mark.parametrize(
    ("fraction", "min_clients", "clients", "sampled"),
    [
        (0.01, 1, 10, 1),
        (0.01, 1, 1000, 10),
        (0.01, 10, 10, 10),
        (0.01, 10, 100, 10),
        (0.01, 10, 1000, 10),
        (0.01, 10, 2000, 20),
        (0.5, 3, 4, 3),
        (1.0, 1, 7, 7),
    ],
)
def test_a_round_samples_fraction_of_the_clients_and_at_least_min_clients(fraction, min_clients, clients, sampled):
    server = FederatedServer({}, ServerSettings(fraction=fraction, min_clients=min_clients), seed=0)
    assert len(server.sample(1, [f"c{i}" for i in range(clients)])) == sampled  # Flower's min_fit_clients


def test_eval_sample_is_seeded_and_at_least_one_client():
    ids = [f"c{i:03d}" for i in range(100)]
    picks = eval_clients(EvalSettings(clients=10), 3, ids)
    assert len(picks) == 10 and picks == sorted(picks) and picks == eval_clients(EvalSettings(clients=10), 3, ids)
    assert picks != eval_clients(EvalSettings(clients=10), 4, ids)  # another seed, another sample
    assert eval_clients(EvalSettings(fraction=0.1), 3, ids) == picks  # 10 of 100 either way
    assert len(eval_clients(EvalSettings(fraction=0.001), 3, ids)) == 1  # a fraction giving 0 scores one client
    assert eval_clients(EvalSettings(clients=500), 3, ids) == ids == eval_clients(EvalSettings(), 3, ids)


def steps(optimizer: ServerOptimizer, deltas: list[float], x0: float = 1.0) -> list[float]:
    x = {"x": torch.tensor([x0], dtype=torch.float64)}
    out = []
    for delta in deltas:
        x = optimizer.step(x, {"x": torch.tensor([delta], dtype=torch.float64)})
        out.append(x["x"].item())
    return out


def test_fedavg_and_fedavgm():
    assert steps(ServerOptimizer(lr=0.5), [2.0, -1.0]) == pytest.approx([2.0, 1.5])
    # m1 = 2, x = 1 + 2 = 3;  m2 = 0.9·2 − 1 = 0.8, x = 3 + 0.8 = 3.8
    assert steps(FedAvgM(lr=1.0, momentum=0.9), [2.0, -1.0]) == pytest.approx([3.0, 3.8])


def test_fedadam_matches_hand_computation():
    # η=0.5, β1=0.9, β2=0.99, τ=0.1, v0 = τ² = 0.01
    # Δ=2:  m = 0.2,  v = 0.99·0.01 + 0.01·4 = 0.0499,     x = 1 + 0.5·0.2/(√0.0499 + 0.1)
    # Δ=−1: m = 0.9·0.2 − 0.1 = 0.08,  v = 0.99·0.0499 + 0.01·1 = 0.059401,  x += 0.5·0.08/(√0.059401 + 0.1)
    x1 = 1 + 0.5 * 0.2 / (0.0499**0.5 + 0.1)
    x2 = x1 + 0.5 * 0.08 / (0.059401**0.5 + 0.1)
    assert steps(FedAdam(lr=0.5, beta1=0.9, beta2=0.99, tau=0.1), [2.0, -1.0]) == pytest.approx([x1, x2], rel=1e-12)


def test_fedyogi_matches_hand_computation():
    # Δ=2:    Δ²=4 > v0=0.01, so v = 0.01 + 0.01·4 = 0.05;           m = 0.2
    # Δ=0.05: Δ²=0.0025 < v, so v = 0.05 − 0.01·0.0025 = 0.049975;   m = 0.9·0.2 + 0.1·0.05 = 0.185
    x1 = 1 + 0.5 * 0.2 / (0.05**0.5 + 0.1)
    x2 = x1 + 0.5 * 0.185 / (0.049975**0.5 + 0.1)
    assert steps(FedYogi(lr=0.5, beta1=0.9, beta2=0.99, tau=0.1), [2.0, 0.05]) == pytest.approx([x1, x2], rel=1e-12)


# ------------------------------------------------------------------------------------------------- client stages


def stage_client(fed, config, **settings) -> FederatedClient:
    """A client app on ``fed``'s model with other client settings (and ``fed``'s common personal values)."""
    client = FederatedClient(
        fed.model, fed.tokenizer, fed.strategy, replace(config.client, **settings), config.eval, max_length=48, seed=0,
        progress=False,
    )  # fmt: skip
    client.common = fed.app.common
    return client


@pytest.mark.parametrize("order", ["global-then-local", "local-first"])
def test_fedlora_opt_stages_touch_only_their_tensors(order, make_config, tokenizer):
    config = make_config(f"client.order={order}")
    fed = build_federation(
        config, build_client(config, model=tiny_llama(len(tokenizer)), tokenizer=tokenizer, progress=False)
    )
    app = fed.app
    assert set(app.names["shared"]) == DIRECTIONS and set(app.names["personal"]) == MAGNITUDES
    state = app.new_state(fed.data.clients[0])
    ins = FitIns(1, app.snapshot(app.names["shared"]))

    result = stage_client(fed, config, local_steps=2, global_steps=0).fit(state, ins)  # local stage only
    assert all(torch.equal(result.tensors[n], ins.tensors[n]) for n in DIRECTIONS)
    assert all(not torch.equal(state.personal[n], app.common[n]) for n in MAGNITUDES)
    assert set(result.metrics) == {"train_loss_local"}

    personal_before = dict(state.personal)
    result = stage_client(fed, config, local_steps=0, global_steps=2).fit(state, FitIns(2, ins.tensors))
    assert all(not torch.equal(result.tensors[n], ins.tensors[n]) for n in DIRECTIONS)  # global stage only
    assert all(torch.equal(personal_before[n], state.personal[n]) for n in MAGNITUDES)
    assert set(result.metrics) == {"train_loss_global"}


def test_global_stage_trains_the_global_model(make_config, tokenizer):
    """In ``global-then-local`` the directions are trained under the common magnitudes, whatever the client's own
    are: the sent directions equal those of a client at its common start; the local stage then moves only the
    client's magnitudes (from its own values) and the sent directions are the global stage's."""
    config = make_config("client.local_steps=2", "client.global_steps=2")
    fed = build_federation(
        config, build_client(config, model=tiny_llama(len(tokenizer)), tokenizer=tokenizer, progress=False)
    )
    app, data = fed.app, fed.data.clients[0]
    ins = FitIns(3, app.snapshot(app.names["shared"]))
    personalised = app.new_state(data)
    personalised.personal = {n: t * 1.5 for n, t in personalised.personal.items()}
    personal_before = dict(personalised.personal)
    sent_personalised = app.fit(personalised, ins).tensors
    fresh = app.new_state(data)
    global_only = stage_client(fed, config, local_steps=0).fit(fresh, ins).tensors
    assert all(torch.equal(sent_personalised[n], global_only[n]) for n in DIRECTIONS)
    assert all(not torch.equal(personalised.personal[n], personal_before[n]) for n in MAGNITUDES)
    assert all(torch.equal(fresh.personal[n], app.common[n]) for n in MAGNITUDES)  # no local stage: untouched


def test_shared_magnitudes_variant_refines_the_global_magnitudes(make_config, run, exchanges, tokenizer):
    """``fedlora-opt-shared-magnitudes`` (outside the paper's rule) sends all four tensors, as trained in the global
    stage, and keeps the magnitudes its local stage refines from there."""
    run_dir = run(make_config("strategy=fedlora-opt-shared-magnitudes", "client.local_steps=2"))
    for _, result in exchanges:
        assert (
            set(result.tensors) == DIRECTIONS | MAGNITUDES
        )  # one round: each client's kept magnitudes are its sent ones, refined
        kept = load_file(run_dir / "clients" / result.client_id / "personal.safetensors")
        assert set(kept) == MAGNITUDES
        assert all(not torch.equal(kept[n], result.tensors[n]) for n in MAGNITUDES)


def test_fedlora_opt_joint_order_steps_both_optimizers_on_every_batch(make_config, tokenizer):
    config = make_config("client.order=joint", "client.local_steps=1", "client.global_steps=1")
    fed = build_federation(
        config, build_client(config, model=tiny_llama(len(tokenizer)), tokenizer=tokenizer, progress=False)
    )
    app, state = fed.app, fed.app.new_state(fed.data.clients[0])
    everything = [n for role in app.names.values() for n in role]
    before = app.snapshot(everything)
    result = app.fit(state, FitIns(1, app.snapshot(app.names["shared"])))
    after = app.snapshot(everything)
    # One stage of 1 + 1 steps: at the first only m_A has a gradient (A = 0), at the second every tensor does.
    assert {n for n in everything if not torch.equal(before[n], after[n])} == DIRECTIONS | MAGNITUDES
    assert set(result.metrics) == {"train_loss_joint"} and set(result.tensors) == DIRECTIONS
    assert {int(entry["step"]) for entry in state.optimizer_state["state"].values()} == {2}  # the local optimizer's


# ------------------------------------------------------------------------------------------------- run directory


def test_two_round_run_directory(make_config, run, tokenizer):
    config = make_config("rounds=2", "eval.rouge_examples=2", "eval.max_new_tokens=4", "server.optimizer=fedavgm")
    run_dir = run(config)

    for path in ["config.yaml", "metrics.jsonl", "scores.png", "checkpoint/state.json", "checkpoint/rng.pt"]:
        assert (run_dir / path).is_file(), path
    assert (run_dir / "scores.png").read_bytes().startswith(b"\x89PNG")
    # The saved config is the run's, with data.prompt_format "auto" resolved (the tiny tokenizer has no chat template).
    assert load_config(run_dir / "config.yaml") == replace(config, data=replace(config.data, prompt_format="alpaca"))
    assert json.loads((run_dir / "checkpoint/state.json").read_text())["round"] == 2
    for client in ("client_0", "client_1", "client_2"):
        assert {p.name for p in (run_dir / "clients" / client).iterdir()} == {
            "personal.safetensors",
            "optimizer.pt",
            "state.json",
            "manifest.json",
        }
    assert not list(run_dir.rglob(".*.tmp")) and not list(run_dir.rglob("*.pending"))

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for round_ in (1, 2):
        for split, clients in (("global", {GLOBAL_MODEL}), ("local", {"client_0", "client_1", "client_2"})):
            per_client = [r for r in rows if r["round"] == round_ and r["split"] == split and "client" in r]
            assert {r["client"] for r in per_client} == clients  # the global model is scored once
            assert all({"loss", "perplexity", "rougeL"} <= set(r) for r in per_client)
            (mean,) = [r for r in rows if r["round"] == round_ and r["split"] == split and "client" not in r]
            assert mean["loss"] == pytest.approx(sum(r["loss"] for r in per_client) / len(clients))
            assert {"loss_std", "perplexity_std", "rougeL_std"} <= set(mean)
        assert len([r for r in rows if r["round"] == round_ and r["split"] == "train"]) == 3
    # Round 0 (committed with round 1) scores the initial adapter, i.e. the base model.
    assert [r["round"] for r in rows if "client" not in r][:2] == [0, 0]
    base = tiny_llama(len(tokenizer))
    initial = {(r["split"], r["client"]): r["loss"] for r in rows if r["round"] == 0 and "client" in r}
    assert len(initial) == 4 and not [r for r in rows if r["round"] == 0 and r["split"] == "train"]
    data = build_federated_data(config.data, tokenizer)
    global_loss = evaluate_loss(base, data.global_test, tokenizer.pad_token_id)["loss"]
    assert initial["global", GLOBAL_MODEL] == pytest.approx(global_loss, rel=1e-5)

    # The global adapter is a plain PEFT FedDoRA adapter: the global directions with the common magnitudes. It is
    # a trained model (its logits differ from the base model's), and it is exactly what the global score evaluates.
    loaded = PeftModel.from_pretrained(tiny_llama(len(tokenizer)), run_dir / "global_adapter").eval()
    params = dict(loaded.named_parameters())
    global_tensors = load_file(run_dir / "checkpoint/global.safetensors")
    assert set(global_tensors) == DIRECTIONS
    assert all(torch.equal(params[name], value) for name, value in global_tensors.items())
    tokens = torch.tensor([[0, 5, 7, 9]])
    with torch.no_grad():
        assert (loaded(input_ids=tokens).logits - base(input_ids=tokens).logits).abs().max() > 1e-3
    final_global = next(r for r in rows if r["round"] == 2 and r["split"] == "global" and "client" in r)
    adapter_loss = evaluate_loss(loaded, data.global_test, tokenizer.pad_token_id)["loss"]
    assert adapter_loss == pytest.approx(final_global["loss"], rel=1e-5)

    # `fedlora eval` re-scores the saved run exactly as the last training-time evaluation did.
    evaluated = evaluate_run(run_dir, model=tiny_llama(len(tokenizer)), tokenizer=tokenizer, progress=False)
    last = {(r["split"], r["client"]): r for r in rows if r["round"] == 2 and "client" in r and r["split"] != "train"}
    for row in (r for r in evaluated if "client" in r):
        assert row["loss"] == pytest.approx(last[row["split"], row["client"]]["loss"], rel=1e-5)
        assert row["rougeL"] == pytest.approx(last[row["split"], row["client"]]["rougeL"])
    assert (run_dir / "eval.jsonl").is_file()


def test_existing_output_dir_needs_resume(make_config, run):
    config = make_config()
    out = Path(config.output_dir)
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        run(config)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_resume_refuses_a_different_configuration(make_config, run):
    run(make_config())
    with pytest.raises(ValueError, match=r"client\.lr"):
        run(make_config("client.lr=0.5", "rounds=2"), resume=True)


def test_a_round_holds_only_its_own_clients_states(make_config, run, monkeypatch):
    """One client of three trains a round: while a client trains or is scored, only the states of that round's
    clients exist (the others are read from the run directory when needed, one at a time)."""
    alive: dict[str, list[int]] = {"fit": [], "evaluate": []}
    fit, evaluate = FederatedClient.fit, FederatedClient.evaluate
    gc.collect()
    earlier = {id(obj) for obj in gc.get_objects() if isinstance(obj, ClientState)}  # other tests' leftovers

    def count(kind: str) -> None:
        alive[kind].append(sum(isinstance(obj, ClientState) and id(obj) not in earlier for obj in gc.get_objects()))

    def counting_fit(self, state, ins):
        count("fit")
        return fit(self, state, ins)

    def counting_evaluate(self, state, shared, datasets):
        if state is not None:
            count("evaluate")
        return evaluate(self, state, shared, datasets)

    monkeypatch.setattr(FederatedClient, "fit", counting_fit)
    monkeypatch.setattr(FederatedClient, "evaluate", counting_evaluate)
    run(make_config("server.fraction=0.34", "rounds=3"))
    assert alive["fit"] == [1, 1, 1]  # the sampled client's
    assert len(alive["evaluate"]) == 4 * 3 and max(alive["evaluate"]) <= 2  # the scored one and the round's trained one


def test_scored_clients_are_a_seeded_sample_the_same_every_round(make_config, run, tokenizer):
    config = make_config("eval.clients=2", "server.fraction=0.34", "rounds=3")
    rows = [json.loads(line) for line in (run(config) / "metrics.jsonl").read_text().splitlines()]
    expected = eval_clients(config.eval, config.seed, ["client_0", "client_1", "client_2"])
    for round_ in range(4):  # round 0: the initial adapter
        scored = [r["client"] for r in rows if r["round"] == round_ and r["split"] == "local" and "client" in r]
        assert scored == expected
        global_rows = [r for r in rows if r["round"] == round_ and r["split"] == "global"]
        assert [r.get("client") for r in global_rows] == [GLOBAL_MODEL, None]  # scored once, and its summary
        (local,) = [r for r in rows if r["round"] == round_ and r["split"] == "local" and "client" not in r]
        assert (local["clients"], local["clients_total"]) == (2, 3)


# ------------------------------------------------------------------------------------------------- resume


class Interrupt(KeyboardInterrupt):
    pass


def interrupt_at(monkeypatch, where: str) -> None:
    """Raise (like Ctrl-C) in round 2: while a client trains, just before the checkpoint commit, or just after
    (the checkpoint rotated in, the clients' states not yet)."""
    if where == "mid-round":
        fit, calls = FederatedClient.fit, []

        def failing_fit(self, state, ins):
            calls.append(ins.round)
            if calls.count(2) == 2:  # the second client of round 2, after the first one trained
                raise Interrupt
            return fit(self, state, ins)

        monkeypatch.setattr(FederatedClient, "fit", failing_fit)
    elif where == "before-commit":
        atomic_dir = storage.atomic_dir

        def failing_atomic_dir(path):
            if path.name == "checkpoint.pending" and path.with_name("checkpoint").exists():
                raise Interrupt
            return atomic_dir(path)

        monkeypatch.setattr(storage, "atomic_dir", failing_atomic_dir)
    else:
        rotate = storage._rotate

        def failing_rotate(pending, current, prev):
            if current.parent.name == "clients" and json.loads((pending / "state.json").read_text())["round"] == 2:
                raise Interrupt
            rotate(pending, current, prev)

        monkeypatch.setattr(storage, "_rotate", failing_rotate)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = {f"adapter/{k}": v for k, v in load_file(run_dir / "global_adapter/adapter_model.safetensors").items()}
    state |= {f"server/{k}": v for k, v in load_file(run_dir / "checkpoint/server_optimizer.safetensors").items()}
    for file in sorted((run_dir / "clients").glob("*/personal.safetensors")):
        state |= {f"{file.parent.name}/{k}": v for k, v in load_file(file).items()}
    return state


RESUME_SETTINGS = ("server.fraction=0.67", "server.optimizer=fedadam", "server.lr=0.01", "client.lr=0.01")


@pytest.fixture(scope="module")
def uninterrupted(data_file, tokenizer, tmp_path_factory) -> Path:
    """A 2-round run (2 of 3 clients per round, FedAdam) that nothing interrupts."""
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    return tiny_train(tiny_config(data_file, output_dir, *RESUME_SETTINGS, "rounds=2"), tokenizer)


@pytest.mark.parametrize("where", ["extend", "mid-round", "before-commit", "after-commit"])
def test_resume_equals_an_uninterrupted_run(where, uninterrupted, make_config, run, monkeypatch):
    if where == "extend":  # a finished 1-round run, continued to 2 rounds
        run(make_config(*RESUME_SETTINGS, "rounds=1"))
    else:
        with monkeypatch.context() as patch:
            interrupt_at(patch, where)
            with pytest.raises(Interrupt):
                run(make_config(*RESUME_SETTINGS, "rounds=2"))
    resumed = run(make_config(*RESUME_SETTINGS, "rounds=2"), resume=True)

    expected, got = final_state(uninterrupted), final_state(resumed)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    assert read(resumed / "metrics.jsonl") == read(uninterrupted / "metrics.jsonl")


# ------------------------------------------------------------------------------------------------- configuration


def test_config_defaults_are_the_quickstart():
    config = build_config({})
    assert config.strategy == "fedlora-opt" and config.model.name == "smollm2-135m-instruct"
    assert config.data.path == "dolly-sample" and config.data.partition == "dirichlet" and config.data.num_clients == 4


def test_config_files_and_overrides(tmp_path):
    (tmp_path / "run.toml").write_text(
        'strategy = "fedit"\nrounds = 5\n[client]\nlr = 0.01\n[adapter]\ntarget_modules = ["q_proj", "k_proj"]\n'
    )
    (tmp_path / "run.yaml").write_text(
        "strategy: fedit\nrounds: 5\nclient:\n  lr: 0.01\nadapter:\n  target_modules: [q_proj, k_proj]\n"
    )
    from_toml, from_yaml = load_config(tmp_path / "run.toml"), load_config(tmp_path / "run.yaml")
    assert from_toml == from_yaml and from_toml.rounds == 5 and from_toml.client.lr == 0.01

    config = load_config(
        tmp_path / "run.toml",
        [
            "rounds=7",
            "client.lr=3e-4",
            "client.max_grad_norm=none",
            "data.num_clients=null",
            "data.partition=label",  # the number of clients follows from the labels
            "adapter.target_modules=q_proj,v_proj",
            "data.source=file",  # columns apply to it
            'data.columns={"label": "topic"}',
            "server.optimizer=fedyogi",
        ],
    )
    assert (config.rounds, config.client.lr, config.client.max_grad_norm) == (7, 3e-4, None)
    assert config.data.num_clients is None and config.adapter.target_modules == ["q_proj", "v_proj"]
    assert config.data.columns == {"label": "topic"} and config.server.optimizer == "fedyogi"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("bogus=1", "unknown config key 'bogus'"),
        ("client.lrr=1", "unknown config key 'client.lrr'"),
        ("rounds=abc", "rounds must be an int"),
        ("rounds=0", "rounds must be at least 1"),
        ("client.lr=-1", "client.lr must be positive"),
        ("client.lr=fast", "client.lr must be a float"),
        ("server.fraction=1.5", r"server.fraction must be in \(0, 1\]"),
        ("strategy=fedprox", "strategy must be one of .*; got 'fedprox'"),
        ("server.optimizer=sgd", "server.optimizer must be one of"),
        ("client.order=random", "client.order must be one of"),
        ("model.dtype=float33", "model.dtype must be a torch dtype name"),
        ("client=3", "client must be a table"),
        ("rounds.sub=3", "rounds must be an int"),
        ("rounds", "must look like key.sub=value"),
        ("eval.fraction=0", r"eval.fraction must be in \(0, 1\]"),
        ("eval.clients=0", "eval.clients must be at least 1"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        build_config({}, [override])


def test_eval_clients_and_fraction_are_alternatives():
    with pytest.raises(ValueError, match="eval.clients=3 and eval.fraction=0.5 are alternatives"):
        build_config({}, ["eval.clients=3", "eval.fraction=0.5"])


def test_config_file_errors(tmp_path):
    (tmp_path / "bad.toml").write_text("[client]\nbogus = 1\n")
    with pytest.raises(ValueError, match="unknown config key 'client.bogus'"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "bad.yaml").write_text("rounds: three\n")
    with pytest.raises(ValueError, match="rounds must be an int"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "run.ini").write_text("")
    with pytest.raises(ValueError, match="unsupported type"):
        load_config(tmp_path / "run.ini")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")


# ------------------------------------------------------------------------------------------------- tensor roles


def test_tensor_roles_share_only_the_a_directions(make_config, run, exchanges):
    config = make_config('adapter.tensor_roles={"B.direction": "personal"}')
    run_dir = run(config)

    a_directions = names("feddora_A.default.direction")
    assert exchanges and all(set(ins.tensors) == set(res.tensors) == a_directions for ins, res in exchanges)
    assert set(load_file(run_dir / "checkpoint/global.safetensors")) == a_directions
    for file in (run_dir / "clients").glob("*/personal.safetensors"):
        assert set(load_file(file)) == MAGNITUDES | names("feddora_B.default.direction")


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "strategy, roles, message",
    [
        ("fedlora-opt", '{"A": "shared"}', r"adapter.tensor_roles.A: 'A' is not a tensor kind of the feddora"),
        ("fedit", '{"A.direction": "shared"}', "adapter.tensor_roles.A.direction: 'A.direction' is not a tensor"),
        ("fedit", '{"B": "global"}', r"adapter.tensor_roles.B must be one of \['shared', 'personal', 'frozen'\]"),
        ("ffa-lora", '{"B": "frozen"}', "adapter.tensor_roles.B: every tensor kind would be frozen"),
    ],
)
def test_tensor_roles_errors_name_the_kind(strategy, roles, message):
    with pytest.raises(ValueError, match=message):
        build_config({}, [f"strategy={strategy}", f"adapter.tensor_roles={roles}"])
