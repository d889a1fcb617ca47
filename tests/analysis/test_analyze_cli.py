"""python -m ptpeft_kernels.analyze end to end on a tiny saved checkpoint and modified copies."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels.analysis.cli import build_parser, load_pt_batches, main, tokenize_batches

from .conftest import make_tokenizer, random_texts


def read_metrics(out_dir) -> dict[tuple[str, int], dict]:
    with open(out_dir / "metrics.csv", encoding="utf-8") as fh:
        return {(r["model"], int(r["layer"])): r for r in csv.DictReader(fh)}


def run(saved_run, out_dir, *extra: str, data: str | None = None) -> int:
    return main(
        [
            "--model",
            str(saved_run / "base"),
            "--adapters",
            str(saved_run / "changed"),
            str(saved_run / "same"),
            "--data",
            data or str(saved_run / "data.jsonl"),
            "--output-dir",
            str(out_dir),
            "--batch-size",
            "6",
            "--no-progress",
            *extra,
        ]
    )


def test_end_to_end_on_saved_models(saved_run, tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert run(saved_run, out_dir, "--layers", "all") == 0
    printed = capsys.readouterr().out
    assert "rank ratio %" in printed and "CKA vs base" in printed
    for name in ("metrics.csv", "metrics.json", "rank_ratio_per_layer.png"):
        assert (out_dir / name).stat().st_size > 0
    for layer in (0, 1, 2):
        assert (out_dir / f"cumulative_spectra_layer{layer}.png").read_bytes().startswith(b"\x89PNG")
    rows = read_metrics(out_dir)
    assert set(rows) == {(m, layer) for m in ("base", "changed", "same") for layer in (0, 1, 2)}
    for layer in (0, 1, 2):
        assert float(rows["base", layer]["deviation"]) == 0.0
        assert float(rows["base", layer]["cka"]) == pytest.approx(1.0, abs=1e-9)
        assert float(rows["same", layer]["deviation"]) == pytest.approx(0.0, abs=1e-9)
        assert float(rows["same", layer]["cka"]) == pytest.approx(1.0, abs=1e-9)
    # The changed MLP sits in the last decoder layer: earlier hidden states are untouched ...
    for layer in (0, 1):
        assert float(rows["changed", layer]["deviation"]) == pytest.approx(0.0, abs=1e-9)
    # ... the last one moves.
    assert float(rows["changed", 2]["deviation"]) > 1e-4
    assert float(rows["changed", 2]["cka"]) < 0.999
    summary = json.loads((out_dir / "metrics.json").read_text())
    assert summary["threshold"] == 0.9 and len(summary["curves"]["2"]["changed"]) > 1


def test_pt_batches_give_the_same_numbers_as_jsonl(saved_run, tmp_path):
    tok = make_tokenizer()
    texts = random_texts(20, seed=1)  # the texts of data.jsonl
    enc = tok(texts, padding=True, return_tensors="pt")
    pt_path = tmp_path / "data.pt"
    torch.save({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, pt_path)
    assert run(saved_run, tmp_path / "a", "--layers", "-1") == 0
    assert run(saved_run, tmp_path / "b", "--layers", "-1", data=str(pt_path)) == 0
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert set(a) == set(b) == {("base", 2), ("changed", 2), ("same", 2)}
    for key in a:
        for col in ("rank_ratio", "deviation", "cka"):
            assert float(a[key][col]) == pytest.approx(float(b[key][col]), abs=1e-6)


def test_tokenize_batches_pads_on_the_right():
    tok = make_tokenizer()
    tok.pad_token = None  # falls back to the eos token
    tok.padding_side = "left"
    batches = tokenize_batches(
        tok, ["the cat", "the cat sat on the mat", "a dog"], batch_size=2, max_length=4
    )
    assert [b["input_ids"].shape for b in batches] == [(2, 4), (1, 2)]
    assert batches[0]["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batches[0]["input_ids"][0, 2:].tolist() == [tok.eos_token_id] * 2


def test_load_pt_batches_forms(tmp_path):
    ids = torch.arange(10).view(5, 2)
    torch.save({"input_ids": ids}, tmp_path / "dict.pt")
    batches = load_pt_batches(str(tmp_path / "dict.pt"), batch_size=2, max_samples=3)
    assert [b["input_ids"].tolist() for b in batches] == [[[0, 1], [2, 3]], [[4, 5]]]
    torch.save([{"input_ids": ids[:3]}, {"input_ids": ids[3:]}], tmp_path / "list.pt")
    batches = load_pt_batches(str(tmp_path / "list.pt"), batch_size=99, max_samples=4)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 1]
    torch.save({"input_ids": ids, "attention_mask": ids[:4]}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="disagree on the number of rows"):
        load_pt_batches(str(tmp_path / "bad.pt"), batch_size=2)


def test_bad_command_lines(saved_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(saved_run, tmp_path, "--names", "only-one")
    assert e.value.code == 2 and "--names has 1 labels for 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(saved_run, tmp_path, data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(SystemExit):
        run(saved_run, tmp_path, "--layers", "last")
    with pytest.raises(SystemExit):
        run(saved_run, tmp_path, "--threshold", "1.5")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"txt": "oops"}\n')
    assert run(saved_run, tmp_path, data=str(bad)) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert run(saved_run, tmp_path, "--layers", "7") == 1
    assert "out of range" in capsys.readouterr().err


def test_adapter_directory_without_load_adapters_support(saved_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delattr(pk, "load_adapters", raising=False)
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    code = main(
        [
            "--model",
            str(saved_run / "base"),
            "--adapters",
            str(adapters),
            "--data",
            str(saved_run / "data.jsonl"),
            "--output-dir",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 1 and "no load_adapters" in capsys.readouterr().err


def test_help_lists_every_option():
    text = build_parser().format_help()
    for option in (
        "--model",
        "--adapters",
        "--names",
        "--data",
        "--text-field",
        "--tokenizer",
        "--max-length",
        "--max-samples",
        "--batch-size",
        "--layers",
        "--tower",
        "--threshold",
        "--device",
        "--dtype",
        "--output-dir",
        "--no-progress",
        "--base-name",
    ):
        assert option in text
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(
        [sys.executable, "-m", "ptpeft_kernels.analyze", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0 and "remaining rank ratio" in proc.stdout


def test_saved_adapter_directories(saved_run, tmp_path):
    from transformers import LlamaForCausalLM

    def saved_lora(name: str, b_std: float):
        model = LlamaForCausalLM.from_pretrained(saved_run / "base")
        pk.apply_lora(model, r=4, alpha=8)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * b_std)
        pk.save_adapters(model, tmp_path / name)
        return str(tmp_path / name)

    prefixed = LlamaForCausalLM.from_pretrained(saved_run / "base")
    pk.apply_prefix(prefixed, num_prefix=4, reparam_hidden=16)
    pk.save_adapters(prefixed, tmp_path / "prefix")
    # Fresh LoRA (B = 0) leaves the model unchanged; a trained-looking one (B != 0) does not.
    adapters = [saved_lora("lora_zero", 0.0), saved_lora("lora", 0.3), str(tmp_path / "prefix")]
    code = main(
        [
            "--model",
            str(saved_run / "base"),
            "--adapters",
            *adapters,
            "--data",
            str(saved_run / "data.jsonl"),
            "--layers",
            "all",
            "--output-dir",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 0
    rows = read_metrics(tmp_path / "out")
    for layer in (0, 1, 2):
        assert float(rows["lora_zero", layer]["deviation"]) == pytest.approx(0.0, abs=1e-9)
        assert float(rows["lora_zero", layer]["cka"]) == pytest.approx(1.0, abs=1e-9)
    assert float(rows["lora", 0]["deviation"]) == pytest.approx(0.0, abs=1e-9)  # embeddings: no LoRA there
    assert float(rows["lora", 2]["deviation"]) > 1e-3
    assert float(rows["lora", 2]["cka"]) < 0.99
    # Prefixes live in the attention of every layer: the embeddings stay, the layers above move.
    assert float(rows["prefix", 0]["deviation"]) == pytest.approx(0.0, abs=1e-9)
    assert float(rows["prefix", 2]["cka"]) < 0.999


def test_directory_that_is_neither_checkpoint_nor_adapters(saved_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(
        [
            "--model",
            str(saved_run / "base"),
            "--adapters",
            str(empty),
            "--data",
            str(saved_run / "data.jsonl"),
            "--output-dir",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 1 and str(empty) in capsys.readouterr().err
