"""Tables and plots of benchmark rows (the JSON lines written by :mod:`benchmarks.kernels`).

``python -m benchmarks.report RESULTS.jsonl`` rewrites ``RESULTS.md`` and ``RESULTS.png`` from a results file, e.g. on
a machine with matplotlib after a GPU run on one without it. When a file holds several runs of one configuration (same
impl, mode, shape, rank, dtype, device and model), the last row wins.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import markdown_table, read_jsonl

KEY_FIELDS = ("impl", "mode", "n_tokens", "in_features", "out_features", "rank", "dtype", "device", "model")
"""Fields that identify one measurement; a later row with the same values replaces an earlier one."""
CASE_FIELDS = ("mode", "dtype", "rank", "model", "in_features", "out_features", "n_tokens")
"""Fields that group the rows of all impls measured on one problem, in table order."""
COLUMNS = ("mode", "dtype", "r", "shape", "tokens", "impl", "ms", "× base", "× peft_lora", "peak MiB", "tokens/s")

Row = dict


def row_key(row: Row) -> tuple:
    """The identity of a row's measurement (see :data:`KEY_FIELDS`)."""
    return tuple(row.get(field) for field in KEY_FIELDS)


def _sorted_by_case(rows: Sequence[Row]) -> list[Row]:
    """Rows grouped by problem (sorted on :data:`CASE_FIELDS`), impls in first-appearance order within a problem."""
    impl_order: dict[str, int] = {}
    for row in rows:
        impl_order.setdefault(row["impl"], len(impl_order))

    def key(row: Row) -> tuple:
        case = tuple((value is None, value if isinstance(value, int) else str(value)) for value in _case(row))
        return case, impl_order[row["impl"]]

    return sorted(rows, key=key)


def _case(row: Row) -> tuple:
    return tuple(row.get(field) for field in CASE_FIELDS)


def _shape(row: Row) -> str:
    """``k→d`` of a layer, or the model's name with its hidden→intermediate sizes for an end-to-end row."""
    layer = f"{row['in_features']}→{row['out_features']}"
    return f"{row['model']} {layer}" if row.get("model") else layer


def _number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _cells(row: Row) -> tuple:
    """The table cells of one row (:data:`COLUMNS`)."""
    ms = "skipped" if row.get("skipped_reason") else _number(row["ms"], 4)
    return (
        row["mode"],
        row["dtype"],
        row["rank"],
        _shape(row),
        row["n_tokens"],
        row["impl"],
        ms,
        _number(row.get("ratio_to_base"), 2),
        _number(row.get("ratio_to_peft_lora"), 2),
        _number(row.get("peak_mib"), 1),
        _number(row.get("tokens_per_s"), 0),
    )


def results_table(rows: Sequence[Row]) -> str:
    """A markdown table of ``rows`` (grouped by problem), then one line per distinct reason rows were skipped."""
    ordered = _sorted_by_case(rows)
    skipped: dict[str, list[str]] = {}
    for row in ordered:
        if row.get("skipped_reason"):
            skipped.setdefault(row["skipped_reason"], []).append(row["impl"])
    notes = "".join(f"- skipped {', '.join(dict.fromkeys(impls))}: {reason}\n" for reason, impls in skipped.items())
    return markdown_table(COLUMNS, map(_cells, ordered)) + (f"\n{notes}" if notes else "")


def _case_label(row: Row) -> str:
    """Short x-axis label of a row's problem."""
    return f"{_shape(row)}\nN={row['n_tokens']} r={row['rank']} {row['dtype']}"


def plot(rows: Sequence[Row], path: Path) -> None:
    """A PNG with one panel per mode: grouped bars of ms (log scale), one group per problem, one bar per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [row for row in _sorted_by_case(rows) if row.get("ms") is not None]
    modes = list(dict.fromkeys(row["mode"] for row in timed))
    impls = list(dict.fromkeys(row["impl"] for row in timed))
    n_cases = max((len({_case(row) for row in timed if row["mode"] == mode}) for mode in modes), default=1)
    width = min(60.0, max(8.0, 0.25 * n_cases * max(len(impls), 1)))
    fig, axes = plt.subplots(max(len(modes), 1), 1, figsize=(width, 4.5 * max(len(modes), 1)), squeeze=False)
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}
    for ax, mode in zip(axes[:, 0], modes, strict=False):
        _plot_mode(ax, [row for row in timed if row["mode"] == mode], mode, colors)
    if not modes:
        axes[0, 0].set_title("no timed rows")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _plot_mode(ax, rows: Sequence[Row], mode: str, colors: dict[str, str]) -> None:
    """Grouped bars of one mode's rows onto ``ax``, each impl in its colour."""
    cases = list(dict.fromkeys(_case(row) for row in rows))
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    labels = {_case(row): _case_label(row) for row in rows}
    bar = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        ms = {_case(row): row["ms"] for row in rows if row["impl"] == impl}
        positions = [c + (i - (len(impls) - 1) / 2) * bar for c, case in enumerate(cases) if case in ms]
        ax.bar(positions, [ms[case] for case in cases if case in ms], width=bar, label=impl, color=colors[impl])
    ax.set_xticks(range(len(cases)), [labels[case] for case in cases], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median, log scale)")
    ax.set_title(f"{mode}: {rows[0]['device']}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", which="both", alpha=0.3)


def _environments(rows: Sequence[Row]) -> str:
    """One markdown list item per distinct device, torch and triton version among ``rows``, with its dates."""
    dates: dict[tuple, list[str]] = {}
    for row in rows:
        dates.setdefault((row["device"], row["torch_version"], row["triton_version"]), []).append(row["date"])
    return "".join(
        f"- {device}, torch {torch_version}, triton {triton_version}: {min(when)} to {max(when)}\n"
        for (device, torch_version, triton_version), when in dates.items()
    )


def write_reports(jsonl: Path) -> tuple[Path, Path | None]:
    """Write ``<stem>.md`` (the table) and ``<stem>.png`` (the plot) next to ``jsonl``, from all of its rows.

    Returns their paths; the PNG's is None, with the reason printed, when matplotlib is missing or plotting fails.
    """
    rows = read_jsonl(jsonl, row_key)
    md_path, png_path = jsonl.with_suffix(".md"), jsonl.with_suffix(".png")
    md_path.write_text(f"# {jsonl.name}\n\n{_environments(rows)}\n{results_table(rows)}")
    try:
        plot(rows, png_path)
    except Exception as exc:  # the table and the JSON lines are the results; the plot is a convenience
        print(f"report: no plot written ({type(exc).__name__}: {exc}); rerun `python -m benchmarks.report {jsonl}`")
        return md_path, None
    return md_path, png_path


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the .md and .png of each given results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON-lines files written by benchmarks.kernels")
    for jsonl in parser.parse_args(argv).results:
        for path in write_reports(jsonl):
            if path is not None:
                print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
