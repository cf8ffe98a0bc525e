"""``fedlora export`` and its Python API: an exported adapter and a merged model give the logits of the client's
model as the run evaluates it (the checkpoint's global tensors + that client's personal tensors), and the global
model's; bad requests fail before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedlora.cli import main
from fedlora.export import export_all_clients, export_client, export_global
from fedlora.federated import build_config, train
from fedlora.federated.build import build_client
from fedlora.federated.config import load_run_config
from fedlora.federated.rundir.storage import RunDir
from tests.tiny import save_tiny_model

TOKENS = torch.tensor([[0, 5, 17, 42, 99, 3, 250, 7]])
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def tiny_run(root: Path, strategy: str) -> Path:
    """A one-round run of ``strategy`` on a tiny Llama (saved as a local model) over two clients."""
    model_dir = save_tiny_model(root / "tiny-llama")
    rows = [
        {"instruction": f"What is {i} plus {i}?", "context": "", "response": f"It is {2 * i}.", "category": f"c{i % 2}"}
        for i in range(40)
    ]
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = build_config(
        {},
        [
            f"model.name={model_dir}",
            f"data.path={root / 'rows.jsonl'}",
            "data.num_clients=2",
            "data.min_examples=5",
            "data.max_length=40",
            "adapter.r=2",
            "client.local_lr=0.05",
            f"strategy={strategy}",
            "rounds=1",
            "eval.rouge_examples=0",
            f"output_dir={root / 'run'}",
        ],
    )
    return train(config, progress=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A fedlora-opt run: the magnitudes are personal, so each client's model differs from the global one."""
    return tiny_run(tmp_path_factory.mktemp("export"), "fedlora-opt")


def evaluated_logits(run_dir: Path, client_id: str | None) -> torch.Tensor:
    """The logits of a client's model (None: the global model) built as ``fedlora eval`` builds it."""
    run = RunDir(run_dir)
    app = build_client(load_run_config(run.config), adapter_dir=run.global_adapter, progress=False)
    checkpoint = run.load_checkpoint()
    app.load(checkpoint.global_tensors)
    if client_id is not None:
        app.load(run.load_client(client_id, checkpoint.client_rounds[client_id])[0])
    app.model.eval()
    with torch.no_grad():
        return app.model(TOKENS).logits


def adapter_logits(adapter_dir: Path) -> torch.Tensor:
    """The logits of ``adapter_dir`` loaded onto a fresh base model, as any PEFT user loads it."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(TOKENS).logits


def merged_logits(model_dir: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()(TOKENS).logits


def test_exports_give_the_models_the_run_evaluates(finished_run, tmp_path):
    adapters = export_all_clients(finished_run, tmp_path / "adapters")
    merged = export_all_clients(finished_run, tmp_path / "merged", merge=True)
    assert set(adapters) == set(merged) == {"client_0", "client_1"}
    global_adapter = export_global(finished_run, tmp_path / "global")
    global_merged = export_global(finished_run, tmp_path / "global-merged", merge=True)
    assert (global_merged / "model.safetensors").is_file() and (global_merged / "tokenizer.json").is_file()

    expected_global = evaluated_logits(finished_run, None)
    torch.testing.assert_close(adapter_logits(global_adapter), expected_global, **TOLERANCE)
    torch.testing.assert_close(merged_logits(global_merged), expected_global, **TOLERANCE)
    for client_id in ("client_0", "client_1"):
        expected = evaluated_logits(finished_run, client_id)
        assert not torch.allclose(expected, expected_global, **TOLERANCE)  # its personal tensors matter
        torch.testing.assert_close(adapter_logits(adapters[client_id]), expected, **TOLERANCE)
        torch.testing.assert_close(merged_logits(merged[client_id]), expected, **TOLERANCE)


def test_lora_clients_export_too(tmp_path):
    """fedsa-lora: PEFT LoRA, with lora_B personal."""
    run = tiny_run(tmp_path, "fedsa-lora")
    adapter = export_client(run, "client_0", tmp_path / "adapter")
    merged = export_client(run, "client_0", tmp_path / "merged", merge=True)
    expected = evaluated_logits(run, "client_0")
    assert not torch.allclose(expected, evaluated_logits(run, None), **TOLERANCE)
    torch.testing.assert_close(adapter_logits(adapter), expected, **TOLERANCE)
    torch.testing.assert_close(merged_logits(merged), expected, **TOLERANCE)


def test_export_command_writes_one_client(finished_run, tmp_path, capsys):
    out = tmp_path / "client_1"
    assert main(["export", "--run-dir", str(finished_run), "--client", "client_1", "--out", str(out)]) == 0
    assert f"wrote {out} (PEFT adapter)" in capsys.readouterr().out
    torch.testing.assert_close(adapter_logits(out), evaluated_logits(finished_run, "client_1"), **TOLERANCE)


def fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.bad_input
def test_bad_exports_fail_before_writing(finished_run, tmp_path, capsys):
    run = ["export", "--run-dir", str(finished_run)]
    out = tmp_path / "out"
    err = fails([*run, "--client", "bob", "--out", str(out)], capsys)
    assert "fedlora: error: client 'bob' is not a client of the run in" in err
    assert "its clients are ['client_0', 'client_1']" in err
    assert "fedlora: error: " in fails(["export", "--run-dir", str(tmp_path), "--global", "--out", str(out)], capsys)
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert "exists and is not empty" in fails([*run, "--global", "--out", str(out)], capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(SystemExit):  # one of --global, --client, --all-clients is required
        main([*run, "--out", str(tmp_path / "none")])
    with pytest.raises(ValueError, match="not a client of the run"):
        export_client(finished_run, "client_7", tmp_path / "api")
    assert not (tmp_path / "api").exists()
