"""The benchmark harness (benchmarks/kernels.py) on its CPU smoke preset: well-formed rows and reports.

Timings are never asserted, only that every impl produced a row (timed, or skipped with a reason), that the fields
have the documented types and that the ratios agree with the timings. Triton's CPU interpreter is switched off here
(it takes a good fraction of a second per call), so ``feddora_triton`` is one of the skipped impls.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import inspect
import math
from pathlib import Path

import pytest
import torch

from benchmarks import kernels, report, scale
from benchmarks.common import DEFAULT_DATA, REPO, markdown_table, provenance, read_jsonl, write_jsonl
from benchmarks.federated import parse_args as federated_args

FIELD_TYPES = {
    "impl": str,
    "mode": str,
    "n_tokens": int,
    "in_features": int,
    "out_features": int,
    "rank": int,
    "dtype": str,
    "ms": (float, type(None)),
    "peak_mib": type(None),  # on CPU
    "device": str,
    "date": str,
    "ratio_to_base": (float, type(None)),
    "ratio_to_peft_lora": (float, type(None)),
    "torch_version": str,
    "triton_version": (str, type(None)),
    "skipped_reason": (str, type(None)),
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, list[dict]]:
    """Exit code, output path and rows of one in-process smoke run (layer cases and end to end) on CPU."""
    out = tmp_path_factory.mktemp("bench") / "kernels.jsonl"
    with contextlib.suppress(ImportError):  # jit the kernels under conftest's TRITON_INTERPRET, for later tests
        importlib.import_module("fedlora_kernels.triton_feddora")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        patch.delenv(kernels.BACKEND_ENV, raising=False)
        exit_code = kernels.main(["--preset", "smoke", "--device", "cpu", "--end-to-end", "--out", str(out)])
    return exit_code, out, read_jsonl(out, report.row_key)


def _case(row: dict) -> tuple:
    return row["mode"], row["n_tokens"], row["in_features"], row["out_features"], row["rank"], row["dtype"]


def test_smoke_run_has_no_errors(smoke: tuple[int, Path, list[dict]]) -> None:
    exit_code, _, rows = smoke
    assert exit_code == 0
    assert not [row for row in rows if (row["skipped_reason"] or "").startswith("error:")]


def test_rows_are_well_formed(smoke: tuple[int, Path, list[dict]]) -> None:
    for row in smoke[2]:
        for field, kind in FIELD_TYPES.items():
            assert isinstance(row[field], kind), (field, row)
        dt.datetime.fromisoformat(row["date"])
        ran = row["skipped_reason"] is None
        assert ran == (row["ms"] is not None), row
        assert not ran or row["ms"] > 0, row
        assert ran or row["skipped_reason"].strip(), row


def test_every_impl_has_a_row_per_case_and_mode(smoke: tuple[int, Path, list[dict]]) -> None:
    rows = smoke[2]
    layer_rows = [row for row in rows if row["mode"] in kernels.MODES]
    cases = {_case(row) for row in layer_rows}
    expected_cases = {
        (mode, case.n_tokens, case.in_features, case.out_features, case.rank, case.dtype)
        for case in kernels.PRESETS["smoke"].grids[0].cases()
        for mode in kernels.MODES
    }
    assert cases == expected_cases
    for case in cases:
        assert sorted(row["impl"] for row in layer_rows if _case(row) == case) == sorted(kernels.IMPLS)
    ran = {row["impl"] for row in layer_rows if row["skipped_reason"] is None}
    assert {"base", "peft_lora", "peft_dora", "feddora_torch"} <= ran
    e2e = sorted(row["impl"] for row in rows if row["mode"] == kernels.E2E_MODE)
    assert e2e == sorted(f"e2e_{adapter}" for adapter in kernels.ADAPTERS)


def test_ratios_match_the_timings(smoke: tuple[int, Path, list[dict]]) -> None:
    rows = smoke[2]
    for row in rows:
        same_case = {other["impl"]: other["ms"] for other in rows if _case(other) == _case(row)}
        e2e = row["mode"] == kernels.E2E_MODE
        for field, reference in (
            ("ratio_to_base", None if e2e else same_case["base"]),
            ("ratio_to_peft_lora", same_case["e2e_peft_lora" if e2e else "peft_lora"]),
        ):
            if row["ms"] is None or reference is None:
                assert row[field] is None, (field, row)
            else:
                assert math.isclose(row[field], row["ms"] / reference, rel_tol=1e-9), (field, row)


def test_markdown_report_lists_every_impl(smoke: tuple[int, Path, list[dict]]) -> None:
    md = smoke[1].with_suffix(".md").read_text()
    for impl in [*kernels.IMPLS, *(f"e2e_{adapter}" for adapter in kernels.ADAPTERS)]:
        assert f"| {impl} |" in md


def test_plot_is_written(smoke: tuple[int, Path, list[dict]]) -> None:
    pytest.importorskip("matplotlib")
    assert smoke[1].with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_resume_finds_nothing_left(smoke: tuple[int, Path, list[dict]]) -> None:
    _, out, rows = smoke
    cases = kernels.PRESETS["smoke"].grids[0].cases()
    assert kernels.pending_cases(cases, list(kernels.IMPLS), out, rows[0]["device"]) == []
    assert kernels.pending_cases(cases, list(kernels.IMPLS), out, "another device") == cases


def test_presets_and_overrides() -> None:
    def cases(*argv: str) -> list[kernels.Case]:
        args = kernels.parse_args(argv)
        return kernels.select_cases(kernels.PRESETS[args.preset], args)

    assert [(c.n_tokens, c.in_features, c.out_features) for c in cases("--preset", "targets")] == [
        (2048, 4096, 4096),
        (8192, 4096, 4096),
        (8192, 4096, 11008),
    ]
    assert {(c.rank, c.dtype) for c in cases("--preset", "targets")} == {(16, "bf16")}
    assert len(cases("--preset", "full")) == 5 * 4 * 3 * 2
    overridden = cases(
        "--preset", "full", "--shapes", "576x1536", "--tokens", "512", "--ranks", "8", "--dtypes", "fp16"
    )
    assert overridden == [kernels.Case(512, 576, 1536, 8, "fp16")]


def test_cuda_timing_calls_do_bench_by_its_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch of time_ms, with triton's do_bench replaced by a stub that checks the call against it."""
    testing = pytest.importorskip("triton.testing")
    signature = inspect.signature(testing.do_bench)
    calls = []

    def stub(*args, **kwargs) -> float:
        calls.append(signature.bind(*args, **kwargs).arguments)
        return 1.5

    monkeypatch.setattr(testing, "do_bench", stub)
    settings = kernels.Settings(torch.device("cuda"), warmup_ms=25, rep_ms=100, e2e_rep_ms=1000, cpu_compile=False)
    x = torch.ones(2, requires_grad=True)
    assert kernels.time_ms(lambda: None, [x], settings, settings.rep_ms) == 1.5
    assert calls[0]["grad_to_none"] == [x]
    assert calls[0]["return_mode"] == "median"


def test_jsonl_rows_round_trip_and_the_last_of_a_key_wins(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "rows.jsonl"
    assert read_jsonl(path) == []
    write_jsonl(path, [{"k": 1, "v": "a"}, {"k": 2, "v": "b"}])
    write_jsonl(path, [{"k": 1, "v": "c"}], append=True)
    assert [row["v"] for row in read_jsonl(path)] == ["a", "b", "c"]
    assert read_jsonl(path, key=lambda row: row["k"]) == [{"k": 1, "v": "c"}, {"k": 2, "v": "b"}]
    write_jsonl(path, [{"k": 3}])
    assert read_jsonl(path) == [{"k": 3}]


def test_markdown_table() -> None:
    assert markdown_table(["a", "b"], [[1, None], ["x", 2.5]]) == "| a | b |\n|---|---|\n| 1 | None |\n| x | 2.5 |\n"


def test_provenance_and_the_default_data_path() -> None:
    row = provenance("benchmarks.kernels", ["--tokens", "1, 2"], torch.device("cpu"))
    assert row["command"] == "python -m benchmarks.kernels --tokens '1, 2'"
    assert dt.datetime.fromisoformat(row["date"]).tzinfo is not None
    assert row["cores"] > 0 and row["device"] and row["machine"] and row["torch_version"] == torch.__version__
    assert (REPO / "benchmarks" / "common.py").is_file() and DEFAULT_DATA.is_relative_to(REPO.parent / "shared")
    assert federated_args([]).data == DEFAULT_DATA
    assert federated_args(["--data", "dolly-sample"]).data == Path("dolly-sample")


@pytest.mark.parametrize("engine", ["in-process", "flower"])
def test_scale_dry_run_measures_each_federation_in_its_own_process(engine: str, tmp_path: Path) -> None:
    """The scale benchmark's wiring at 4 and 8 clients on each engine: one row each, with the clients that really
    trained and were scored per round (read back from the runs' metrics), positive measurements, and the table and
    plot written."""
    if engine == "flower":
        pytest.importorskip("ray")  # flwr[simulation], in the dev extra
    out, results_dir = str(tmp_path / "runs"), str(tmp_path / "results")
    argv = ["--dry-run", "--engines", engine, "--series", "min-sample", "--out", out, "--results-dir", results_dir]
    results = scale.main(argv)
    rows = read_jsonl(results)
    assert [(row["engine"], row["series"], row["clients"]) for row in rows] == [
        (engine, "min-sample", 4),
        (engine, "min-sample", 8),
    ]
    for row in rows:
        assert (row["sampled"], row["scored"]) == (2, 2)  # --sampled, whatever the federation's size
        assert f"data.max_examples={8 * row['clients']}" in row["settings"]  # the same rows per client
        assert row["peak_rss_mib"] >= max(row["rss_before_run_mib"], row["rss_end_mib"]) > 0
        assert row["s_per_round"] > 0 and len(row["round_s"]) == row["rounds"] - 1 == 2
        assert row["dir_mib"] > 0 and row["startup_s"] > 0 and row["commit"] and row["config_hash"]
        assert {"server.fraction=0.25", "server.min_clients=2", "eval.clients=2"} <= set(row["settings"])
    table = results.with_suffix(".md").read_text()
    assert f"| {engine} | min-sample | 8 | 2 | 2 |" in table
    assert results.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
