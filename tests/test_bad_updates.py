"""Robust aggregation: bad client updates are rejected, failing clients are left out, clipping, median and trimmed
mean, client-level DP (DP-FedAvg noise and its ε), and the configuration keys of all of them."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from fedlora.federated import FederatedClient, FederatedServer, FitRes, build_config, weighted_average
from fedlora.federated.aggregation import clip_update, coordinate_median, trimmed_mean, update_norm
from fedlora.federated.config import PrivacySettings, ServerSettings
from fedlora.federated.message import Rejection
from fedlora.federated.privacy import epsilon, noise_generator

# the fixtures of the federated engine's tests, imported so that pytest finds them here (arguments redefine them)
# ruff: noqa: F811
from tests.test_federated import data_file, make_config, run, tiny_config, tiny_train, tokenizer  # noqa: F401

SHARED = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}


def result(client_id: str, value: float = 1.0, num_examples: int = 1, **tensors) -> FitRes:
    """A client's reply: every shared tensor filled with ``value``, then ``tensors`` (None drops a name)."""
    sent = {name: torch.full_like(x, value) for name, x in SHARED.items()} | tensors
    return FitRes(client_id, {name: t for name, t in sent.items() if t is not None}, num_examples, {})


def server(**settings) -> FederatedServer:
    return FederatedServer(SHARED, ServerSettings(**settings), seed=0)


def with_nan() -> torch.Tensor:
    w = torch.ones(2, 3)
    w[1, 2] = math.nan
    return w


# ------------------------------------------------------------------------------------------------- validation

BAD_UPDATES = {
    "missing key": ({"b": None}, r"missing tensors \['b'\]"),
    "extra key": ({"c": torch.ones(1)}, r"extra tensors \['c'\] \(not in the shared set\)"),
    "wrong shape": ({"w": torch.ones(3, 2)}, r"w has shape \(3, 2\), expected \(2, 3\)"),
    "wrong dtype": ({"w": torch.ones(2, 3, dtype=torch.float64)}, "w has dtype torch.float64, expected torch.float32"),
    "not a tensor": ({"w": [[1.0] * 3] * 2}, "w is a list, not a tensor"),
    "NaN": ({"w": with_nan()}, "w holds NaN values"),
    "Inf": ({"b": torch.tensor([1.0, -math.inf, 1.0])}, "b holds Inf values"),
    "huge norm": ({"w": torch.full((2, 3), 1e6)}, r"update norm 2\.449e\+06 is above server\.max_update_norm=100000"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", list(BAD_UPDATES))
def test_a_bad_update_is_rejected_and_the_others_aggregate(kind, caplog):
    tensors, reason = BAD_UPDATES[kind]
    app = server()
    with caplog.at_level(logging.WARNING, logger="fedlora.federated.server"):
        rejected = app.aggregate([result("a", 1.0, 1), result("bad", 5.0, 2, **tensors), result("c", 4.0, 3)], 7)

    [(client_id, why)] = rejected
    assert client_id == "bad" and re.search(reason, why), why
    [record] = caplog.records
    assert record.name == "fedlora.federated.server" and "round 7" in record.message and "client bad" in record.message
    for name in SHARED:  # the example-weighted mean of the good ones: (1 · 1 + 4 · 3) / 4
        torch.testing.assert_close(app.global_tensors[name], torch.full_like(SHARED[name], 3.25))


@pytest.mark.bad_input
def test_a_non_positive_example_count_is_rejected():
    assert server().validate(result("a", num_examples=0)) == "num_examples is 0, not a positive count"


@pytest.mark.bad_input
def test_max_update_norm_none_disables_the_norm_check():
    app = server(max_update_norm=None)
    assert app.aggregate([result("a", 1e6)]) == []
    torch.testing.assert_close(app.global_tensors["w"], torch.full((2, 3), 1e6))


@pytest.mark.bad_input
def test_all_bad_raises_naming_the_round_and_every_reason():
    app = server()
    bad = [result("nan", w=with_nan()), result("short", b=None)]
    failed = [Rejection("gone", "fit raised OSError: disk gone")]
    message = (
        r"round 4: 0 of 3 sampled client\(s\) sent a valid update, fewer than server\.min_clients=1; nothing was "
        r"aggregated\. Excluded: gone: fit raised OSError: disk gone; nan: w holds NaN values; short: missing tensors"
    )
    with pytest.raises(RuntimeError, match=message):
        app.aggregate(bad, 4, failures=failed)
    assert all(torch.equal(app.global_tensors[name], SHARED[name]) for name in SHARED)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("min_clients", "replies", "failed", "enough"),
    [
        (2, ["good", "good"], 0, True),
        (2, ["good", "nan"], 0, False),
        (2, ["good"], 1, False),
        (3, ["good", "good", "good", "nan"], 0, True),
        (3, ["good", "good", "nan"], 1, False),
    ],
)
def test_min_clients_counts_failed_and_rejected_clients(min_clients, replies, failed, enough):
    app = server(min_clients=min_clients)
    results = [result(f"c{i}", **({"w": with_nan()} if kind == "nan" else {})) for i, kind in enumerate(replies)]
    failures = [Rejection(f"f{i}", "fit raised RuntimeError: x") for i in range(failed)]
    if enough:
        assert len(app.aggregate(results, 1, failures=failures)) == replies.count("nan")
        torch.testing.assert_close(app.global_tensors["w"], torch.ones(2, 3))
    else:
        with pytest.raises(RuntimeError, match=rf"round 1: {min_clients - 1} of .* server\.min_clients={min_clients}"):
            app.aggregate(results, 1, failures=failures)
        assert torch.equal(app.global_tensors["w"], SHARED["w"])


@pytest.mark.bad_input
def test_a_non_finite_aggregate_raises_and_changes_nothing():
    # float16 tops out at 65504: Δ = 60000 − (−60000) passes every check but x + Δ overflows
    start = {"h": torch.full((2,), -60000.0, dtype=torch.float16)}
    app = FederatedServer(start, ServerSettings(optimizer="fedavgm", max_update_norm=None), seed=0)
    app.optimizer.state = {"m/h": torch.ones(2, dtype=torch.float16)}
    with pytest.raises(RuntimeError, match=r"round 2: the new global tensors \['h'\] are not finite"):
        app.aggregate([FitRes("a", {"h": torch.full((2,), 60000.0, dtype=torch.float16)}, 1, {})], 2)
    assert torch.equal(app.global_tensors["h"], start["h"])
    assert torch.equal(app.optimizer.state["m/h"], torch.ones(2, dtype=torch.float16))


# ------------------------------------------------------------------------------------------------- clipping


def test_clip_update_scales_to_the_norm_over_all_tensors():
    update = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}  # ‖Δ‖ = 5
    assert update_norm(update) == 5.0
    clipped = clip_update(update, 1.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([0.8]))
    assert update_norm(clipped) == pytest.approx(1.0)
    assert all(torch.equal(clip_update(update, 5.0)[n], update[n]) for n in update)  # never scaled up


def test_server_clip_norm_clips_each_update_before_the_mean():
    app = FederatedServer({"x": torch.zeros(2)}, ServerSettings(clip_norm=1.0), seed=0)
    # Δ_a = (3, 4) is clipped to (0.6, 0.8); Δ_b = (0.5, 0) is under the norm; weights 1 and 3
    app.aggregate(
        [FitRes("a", {"x": torch.tensor([3.0, 4.0])}, 1, {}), FitRes("b", {"x": torch.tensor([0.5, 0.0])}, 3, {})]
    )
    torch.testing.assert_close(app.global_tensors["x"], torch.tensor([(0.6 + 1.5) / 4, 0.8 / 4]))


# ------------------------------------------------------------------------------------------------- robust aggregators

COLUMNS = [[1.0, 10.0, -1.0], [2.0, 20.0, -2.0], [3.0, 30.0, -3.0], [100.0, -50.0, 7.0], [4.0, 40.0, -4.0]]


@pytest.mark.parametrize(
    ("clients", "aggregator", "trim_fraction", "expected"),
    [
        (3, "median", 0.1, [2.0, 20.0, -2.0]),  # odd count: the middle value
        (4, "median", 0.1, [2.5, 15.0, -1.5]),  # even: (2 + 3) / 2, (10 + 20) / 2, (−2 − 1) / 2
        (5, "median", 0.1, [3.0, 20.0, -2.0]),
        (5, "trimmed-mean", 0.2, [3.0, 20.0, -2.0]),  # k = 1: mean(2, 3, 4), mean(10, 20, 30), mean(−3, −2, −1)
        (4, "trimmed-mean", 0.25, [2.5, 15.0, -1.5]),  # k = 1 of 4
        (5, "trimmed-mean", 0.1, [22.0, 10.0, -0.6]),  # k = ⌊0.5⌋ = 0: the unweighted mean
    ],
)
def test_median_and_trimmed_mean_match_hand_computed_values(clients, aggregator, trim_fraction, expected):
    updates = [{"x": torch.tensor(column, dtype=torch.float64)} for column in COLUMNS[:clients]]
    direct = coordinate_median(updates) if aggregator == "median" else trimmed_mean(updates, trim_fraction)
    torch.testing.assert_close(direct["x"], torch.tensor(expected, dtype=torch.float64))

    # through the server, from x_t = 1 and with uneven example counts (which these aggregators ignore)
    app = FederatedServer({"x": torch.ones(3)}, ServerSettings(aggregator=aggregator, trim_fraction=trim_fraction), 0)
    replies = [
        FitRes(f"c{i}", {"x": 1 + torch.tensor(column)}, 10**i, {}) for i, column in enumerate(COLUMNS[:clients])
    ]
    assert app.aggregate(replies) == []
    torch.testing.assert_close(app.global_tensors["x"], 1 + torch.tensor(expected))


@pytest.mark.bad_input
@pytest.mark.parametrize(("aggregator", "trim_fraction"), [("median", 0.1), ("trimmed-mean", 0.25)])
def test_a_poisoned_client_cannot_move_the_robust_aggregate_out_of_the_honest_range(aggregator, trim_fraction):
    honest = [1.0, 2.0, 3.0]
    # ±3e4 in all 9 elements is an update of norm 9e4, under max_update_norm: only the aggregator stands in its way
    for poison in (-3e4, 3e4):
        replies = [result(f"h{i}", value) for i, value in enumerate(honest)] + [result("evil", poison, 1000)]
        robust = server(aggregator=aggregator, trim_fraction=trim_fraction)
        mean = server()
        robust.aggregate(replies)
        mean.aggregate(replies)
        assert torch.all((robust.global_tensors["w"] >= 1.0) & (robust.global_tensors["w"] <= 3.0))
        assert mean.global_tensors["w"].abs().min() > 1e4  # the weighted mean follows the poison


# ------------------------------------------------------------------------------------------------- differential privacy


def private_server(z: float = 1.5, clip: float = 2.0, seed: int = 0, shared=None, **settings) -> FederatedServer:
    shared = SHARED if shared is None else shared
    return FederatedServer(shared, ServerSettings(**settings), seed, PrivacySettings(z, clip, 1e-5))


def test_dp_noise_std_is_z_c_over_m():
    shared = {"big": torch.zeros(400_000)}
    app = private_server(z=1.5, clip=2.0, shared=shared)
    app.aggregate([FitRes(f"c{i}", {"big": torch.zeros(400_000)}, 1, {}) for i in range(4)], 1)  # Δᵢ = 0
    noise = app.global_tensors["big"].double()
    assert noise.std().item() == pytest.approx(1.5 * 2.0 / 4, rel=0.01)  # the std's relative error is ~0.1 %
    assert abs(noise.mean().item()) < 0.01


def test_dp_clips_sums_and_divides_by_the_sampled_count():
    """Δ_t = (Σ clip(Δᵢ, C) + z C ξ) / m, over accepted clients, m counting a failed one; weights play no part."""
    app = private_server(z=0.5, clip=1.0, seed=3, shared={"x": torch.zeros(2)})
    replies = [
        FitRes("a", {"x": torch.tensor([3.0, 4.0])}, 1, {}),  # clipped to (0.6, 0.8)
        FitRes("b", {"x": torch.tensor([0.0, 0.5])}, 50, {}),  # under C
        FitRes("bad", {"x": torch.tensor([math.nan, 0.0])}, 1, {}),  # rejected: adds nothing
    ]
    app.aggregate(replies, 5, failures=[Rejection("gone", "fit raised OSError: x")])
    xi = torch.randn(2, generator=noise_generator(3, 5), dtype=torch.float64)
    expected = (torch.tensor([0.6, 1.3], dtype=torch.float64) + 0.5 * 1.0 * xi) / 4
    torch.testing.assert_close(app.global_tensors["x"], expected.float())


def test_dp_noise_is_reproducible_by_seed_and_round():
    def noised(seed: int, round_: int) -> torch.Tensor:
        app = private_server(seed=seed)
        app.aggregate([result("a", 0.0), result("b", 0.0)], round_)
        return app.global_tensors["w"]

    assert torch.equal(noised(0, 1), noised(0, 1))
    assert not torch.equal(noised(0, 1), noised(0, 2))
    assert not torch.equal(noised(0, 1), noised(1, 1))


def test_dp_needs_the_round():
    with pytest.raises(ValueError, match="seeded by the round"):
        private_server().aggregate([result("a")])


def test_epsilon_falls_with_more_noise_and_grows_with_rounds_and_sampling_rate():
    eps = {z: epsilon(z, 0.5, 10, 1e-5) for z in (0.8, 1.0, 2.0, 4.0)}
    assert eps[0.8] > eps[1.0] > eps[2.0] > eps[4.0] > 0
    assert epsilon(1.0, 0.5, 5, 1e-5) < epsilon(1.0, 0.5, 10, 1e-5)
    assert epsilon(1.0, 0.1, 10, 1e-5) < epsilon(1.0, 0.5, 10, 1e-5)
    assert epsilon(1.0, 0.5, 0, 1e-5) == 0


def test_epsilon_matches_the_rdp_bound_of_the_gaussian_mechanism():
    # q = 1 (every client every round): T rounds of the Gaussian mechanism have RDP T·α / (2 z²) at order α, and
    # ε = min over α of RDP + log((α − 1)/α) − (log δ + log α)/(α − 1) (Balle et al. 2020, as opacus converts it)
    z, rounds, delta = 2.0, 10, 1e-5
    by_hand = min(
        rounds * a / (2 * z**2) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        for a in RDPAccountant.DEFAULT_ALPHAS
    )
    app = private_server(z=z, fraction=1.0)
    assert app.epsilon(rounds, num_clients=4) == pytest.approx(by_hand, rel=1e-12)


def test_server_epsilon_uses_the_sampling_rate_of_the_server():
    app = private_server(z=1.1, fraction=0.3)  # 3 of 10 clients per round: q = 0.3
    accountant = RDPAccountant()
    accountant.history = [(1.1, 0.3, 7)]
    assert app.epsilon(7, num_clients=10) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    with pytest.raises(ValueError, match="privacy is off"):
        server().epsilon(1, 10)


# ------------------------------------------------------------------------------------------------- configuration


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["server.min_clients=0"], "server.min_clients must be at least 1"),
        (["server.max_update_norm=-1"], "server.max_update_norm must be positive"),
        (["server.clip_norm=0"], "server.clip_norm must be positive"),
        (["server.aggregator=krum"], "server.aggregator must be one of"),
        (["server.trim_fraction=0.5"], r"server.trim_fraction must be in \[0, 0.5\)"),
        (["privacy.noise_multiplier=-1"], "privacy.noise_multiplier must be at least 0"),
        (["privacy.noise_multiplier=inf", "privacy.clip_norm=1"], "privacy.noise_multiplier must be finite"),
        (["privacy.delta=1"], r"privacy.delta must be in \(0, 1\)"),
        (["privacy.bogus=1"], "unknown config key 'privacy.bogus'"),
        (["privacy.noise_multiplier=1"], r"privacy.clip_norm is required when privacy.noise_multiplier > 0"),
        (["privacy.clip_norm=1"], "privacy.clip_norm is set but privacy.noise_multiplier is 0"),
        (
            ["privacy.noise_multiplier=1", "privacy.clip_norm=1", "server.aggregator=median"],
            "privacy.noise_multiplier > 0 needs server.aggregator=mean, not 'median'",
        ),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config({}, overrides)


def test_config_defaults_and_overrides():
    defaults = build_config({})
    assert (defaults.server.min_clients, defaults.server.max_update_norm, defaults.server.clip_norm) == (1, 1e5, None)
    assert defaults.server.aggregator == "mean" and not defaults.privacy.enabled
    config = build_config(
        {},
        ["server.max_update_norm=none", "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.1", "privacy.delta=1e-6"],
    )
    assert config.server.max_update_norm is None and config.privacy == PrivacySettings(
        noise_multiplier=0.8, clip_norm=0.1, delta=1e-6
    )
    with pytest.raises(ValueError, match="needs server.aggregator=mean"):  # also when the server is built directly
        FederatedServer(SHARED, ServerSettings(aggregator="median"), 0, PrivacySettings(1.0, 1.0))


# ------------------------------------------------------------------------------------------------- in a real run

FAILING = "client_1"


def out_of_memory(*args, **kwargs):
    raise MemoryError("injected after backward()")


def inject(monkeypatch, fault: str) -> dict[str, FitRes]:
    """Make FAILING's fit fail in the way ``fault`` names; returns what the other clients sent."""
    fit, sent = FederatedClient.fit, {}

    def faulty_fit(self, state, ins):
        if state.client_id != FAILING:
            sent[state.client_id] = fit(self, state, ins)
            return sent[state.client_id]
        if fault == "raises-at-start":
            raise RuntimeError("injected failure")
        if fault == "raises-after-backward":  # gradients are filled, the optimizer has not stepped
            with monkeypatch.context() as patch:
                patch.setattr(torch.nn.utils, "clip_grad_norm_", out_of_memory)
                return fit(self, state, ins)
        reply = fit(self, state, ins)
        next(iter(reply.tensors.values())).view(-1)[0] = math.nan
        return reply

    monkeypatch.setattr(FederatedClient, "fit", faulty_fit)
    return sent


@pytest.fixture(scope="module")
def reference(data_file, tokenizer, tmp_path_factory) -> dict[str, FitRes]:
    """What every client sends in round 1 of a 1-round run where nothing fails."""
    sent = {}
    with pytest.MonkeyPatch.context() as patch:
        fit = FederatedClient.fit
        patch.setattr(
            FederatedClient, "fit", lambda self, state, ins: sent.setdefault(state.client_id, fit(self, state, ins))
        )
        tiny_train(tiny_config(data_file, tmp_path_factory.mktemp("reference") / "run"), tokenizer)
    return sent


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.fault
@pytest.mark.parametrize(
    ("fault", "status", "reason"),
    [
        ("raises-at-start", "failed", "fit raised RuntimeError: injected failure"),
        ("raises-after-backward", "failed", "fit raised MemoryError: injected after backward()"),
        ("sends-nan", "rejected", "holds NaN values"),
    ],
)
def test_a_failing_client_is_left_out_and_the_run_completes(
    fault,
    status,
    reason,
    reference,
    make_config,
    run,
    monkeypatch,
    caplog,
    capsys,
):
    sent = inject(monkeypatch, fault)
    with caplog.at_level(logging.WARNING, logger="fedlora.federated"):
        run_dir = run(make_config())

    # the others trained exactly as in a run where nothing failed (same seeds, no gradients left behind)
    assert set(sent) == {"client_0", "client_2"}
    for client_id, res in sent.items():
        assert res.num_examples == reference[client_id].num_examples and res.metrics == reference[client_id].metrics
        assert all(torch.equal(res.tensors[n], reference[client_id].tensors[n]) for n in res.tensors)
    # and the global tensors are their example-weighted average
    global_tensors = load_file(run_dir / "checkpoint/global.safetensors")
    average = weighted_average([r.tensors for r in sent.values()], [r.num_examples for r in sent.values()])
    for name, value in global_tensors.items():
        assert value.isfinite().all()
        torch.testing.assert_close(value, average[name])

    train = {row["client"]: row for row in metrics(run_dir) if row["split"] == "train"}
    assert train["client_0"]["status"] == train["client_2"]["status"] == "ok"
    assert train[FAILING]["status"] == status and train[FAILING]["reason"].endswith(reason)
    assert ("num_examples" in train[FAILING]) == (status == "rejected")
    assert any(FAILING in record.message and record.levelno == logging.WARNING for record in caplog.records)
    assert "3 client(s) (1 left out)" in capsys.readouterr().out


@pytest.mark.fault
def test_a_round_with_too_few_valid_clients_commits_nothing_and_resume_retries_it(make_config, run, monkeypatch):
    settings = ("server.min_clients=3",)
    run_dir = run(make_config(*settings, "rounds=1"))
    committed = metrics(run_dir)
    with monkeypatch.context() as patch:
        inject(patch, "raises-at-start")
        message = r"round 2: 2 of 3 sampled client\(s\) .* server\.min_clients=3; .* client_1: fit raised RuntimeError"
        with pytest.raises(RuntimeError, match=message):
            run(make_config(*settings, "rounds=2"), resume=True)
    assert json.loads((run_dir / "checkpoint/state.json").read_text())["round"] == 1
    assert metrics(run_dir) == committed

    run(make_config(*settings, "rounds=2"), resume=True)
    rows = [row for row in metrics(run_dir) if row["round"] == 2 and row["split"] == "train"]
    assert sorted(row["client"] for row in rows) == ["client_0", "client_1", "client_2"]
    assert all(row["status"] == "ok" for row in rows)


def test_a_private_run_reports_epsilon_every_round_across_resume(make_config, run, capsys):
    settings = ("privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5", "server.fraction=0.67")  # 2 of 3 clients
    run(make_config(*settings, "rounds=1"))
    run_dir = run(make_config(*settings, "rounds=2"), resume=True)

    rows = [row for row in metrics(run_dir) if row["split"] == "privacy"]
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        accountant = RDPAccountant()
        accountant.history = [(1.0, 2 / 3, row["round"])]
        assert row["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12) and row["delta"] == 1e-5
    assert rows[0]["epsilon"] < rows[1]["epsilon"]
    assert f"ε {rows[1]['epsilon']:.3g} at δ 1e-05" in capsys.readouterr().out
    assert all(value.isfinite().all() for value in load_file(run_dir / "checkpoint/global.safetensors").values())
