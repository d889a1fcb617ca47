"""The real-shaped training step at a tiny shape, plot.py, report.py and the pytest-benchmark set."""

import argparse
import json
from pathlib import Path

import pytest
import tomllib
import torch

from benchmarks import common, plot, report, train_step

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the suite's other CPU-heavy tests: with two xdist workers on two cores, two
    threads each oversubscribe the machine and a tiny op waits milliseconds for its second thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _step_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(rank=4, alpha=8.0, num_prefix=3, **kw)


@pytest.fixture(scope="module")
def tiny_step():
    return train_step.real_providers(_step_args(), "tiny", 1, 12, torch.device("cpu"), torch.float32)


def test_every_real_shape_provider_agrees_with_the_independent_float64_reference(tiny_step):
    providers, verdicts, _ = tiny_step
    assert set(providers) == {"ptpeft-stage2", "ptpeft-lora", "peft-lora", "peft-prefix"}
    assert verdicts == dict.fromkeys(providers)


def test_the_step_check_catches_a_provider_whose_lora_or_prefix_is_not_applied(tiny_step):
    """The reference is built from each provider's own weights, so only a wrong computation differs."""
    providers, _, recheck = tiny_step
    theirs = providers["peft-lora"]
    theirs.base_model.disable_adapter_layers()  # LoRA weights present, LoRA not applied
    try:
        verdicts = recheck()
    finally:
        theirs.base_model.enable_adapter_layers()
    assert verdicts["peft-lora"] and "does not compute the benchmarked function" in verdicts["peft-lora"]
    assert verdicts["ptpeft-stage2"] is None and verdicts["ptpeft-lora"] is None
    # a stage-2 model that ignored its prefixes would compute the reference without them: far from its output
    model = providers["ptpeft-stage2"]
    ids = torch.randint(0, train_step.VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    state = {k: v for k, v in state.items() if not k.startswith("ptpeft_prefix")}
    ref = train_step.shared_model(train_step.real_config("tiny", 1, 12), state)
    ref = ref.double()
    deltas = train_step.lora_deltas(model)
    with torch.no_grad():
        out = model(input_ids=ids).logits
        prefixes = train_step.our_prefixes(model)
        kept = train_step.reference_logits(ref, state, deltas, prefixes, {"input_ids": ids}, 0)
        dropped = train_step.reference_logits(ref, state, deltas, [], {"input_ids": ids}, 0)
    assert common.provider_error("s2", out, kept, kept.float()) is None
    assert common.provider_error("s2", out, dropped, dropped.float()) is not None


def test_the_step_check_holds_with_padding_the_prefix_stays_visible(tiny_step):
    """A padded batch: the reference's mask must cover the cached prefix too (it did not: every prefixed
    provider of the built-in model, whose batches are padded, was reported wrong)."""
    _, _, recheck = tiny_step
    ids = torch.randint(0, train_step.VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    assert recheck({"input_ids": ids, "attention_mask": mask}) == dict.fromkeys(tiny_step[0])


def test_the_real_shape_step_runs_and_logs_each_provider(tmp_path, capsys):
    path = tmp_path / "step.csv"
    argv = ["--shape", "tiny", "--seq", "12", "--batch", "1", "2", "--text-tokens", "4", "--rank", "4"]
    train_step.main([*argv, "--num-prefix", "3", "--repeats", "1", "--warmup", "0", "--csv", str(path)])
    rows = list(__import__("csv").DictReader(path.open()))
    assert {(r["provider"], r["mode"], r["batch"]) for r in rows} == {
        (p, m, b) for p in ("ptpeft-stage2", "ptpeft-lora", "peft-lora", "peft-prefix")
        for m in ("forward", "full") for b in ("1", "2")
    }  # fmt: skip
    assert {r["status"] for r in rows} == {"ok"} and {r["model"] for r in rows} == {"tiny"}
    assert {r["sweep"] for r in rows} == {"batch"}
    trainable = {r["provider"]: int(r["trainable_params"]) for r in rows}
    assert trainable["ptpeft-stage2"] > trainable["ptpeft-lora"] == trainable["peft-lora"]
    assert "peft-prefix" in capsys.readouterr().out


def _fake_run(path: Path, run_id: str, command: str, points: list[tuple[dict, list[str], dict]], monkeypatch):
    """Rows of one attention run: points of (params, axes, {provider: (full ms, MiB)})."""
    monkeypatch.setenv(common.RUN_ID_VAR, run_id)
    monkeypatch.setattr(common.sys, "argv", command.split())
    rows = []
    for params, axes, figures in points:
        shape = f"B1 H2 N{params['seq']} P{params['prefix']} D8 causal"
        for provider, (ms, mib) in figures.items():
            extra = common.point_extra(params, axes)
            rows.append(common.Row("attn", provider, "full", shape, "float32", ms, ms, ms, mib, extra=extra))
        rows.append(common.Row("attn", "flash-attn", "full", shape, "float32", None, None, None, None,
                               status="skipped: flash_attn is not installed", extra=extra))  # fmt: skip
    common.append_csv(rows, path, torch.device("cpu"))


def _sweep(ratios: dict[int, float]) -> list:
    return [
        ({"seq": n, "prefix": 16}, ["seq"], {"ptpeft-torch": (r * 10, 1.0), "peft-sdpa": (10.0, 2.0),
                                             "sdpa-noprefix": (r * 10 / 1.1, 1.0)})
        for n, r in ratios.items()
    ]  # fmt: skip


def test_report_shows_the_sweep_run_and_each_target_with_its_margin(tmp_path, monkeypatch):
    results = tmp_path / "results"
    _fake_run(results / "attn.csv", "old", "attn.py --sweep", _sweep({128: 0.5, 256: 0.5}), monkeypatch)
    _fake_run(
        results / "attn.csv", "new", "attn.py --sweep", _sweep({128: 0.95, 256: 0.75, 512: 0.85}), monkeypatch
    )
    _fake_run(
        results / "attn.csv", "later", "attn.py --seq 64", _sweep({64: 0.1}), monkeypatch
    )  # not a sweep
    (results / "gpu").mkdir()
    (results / "gpu" / "verify.csv").write_text("what,ok\nprobe,1\n")  # other columns: ignored
    text = report.render(draw=False, root=results, base=tmp_path)
    assert "run `new`" in text and "run `old`" not in text and "run `later`" not in text
    assert (
        "| B1 H2 N512 P16 D8 causal | 8.5 | 10.0 | 0.85x | 1.0 | 2.0 | 0.50x | 7.7 | 1.10x | skipped |"
        in text
    )
    target = next(line for line in text.splitlines() if line.startswith("| fwd+bwd time <= 0.8x"))
    assert (
        "worst: B1 H2 N512 P16 D8 causal 0.850x vs <= 0.80x (over by 0.050x); 1 of 3 points miss | missed"
        in target
    )
    memory = next(line for line in text.splitlines() if line.startswith("| fwd+bwd peak memory <= 0.7x"))
    assert memory.endswith("(0.200x to spare) | met |")
    ceiling = next(line for line in text.splitlines() if line.startswith("| fwd+bwd within 1.15x"))
    assert ceiling.endswith("| met |") and "1.100x" in ceiling
    assert "not timed: flash-attn (full): skipped: flash_attn is not installed" in text
    assert "[seq](results/plots/attn_seq_cpu_float32.png)" in text
    assert (
        "No GPU run in the CSVs yet" in text
        and "| forward faster than compiled FlexAttention | not measured" in text
    )


def test_report_rewrites_only_the_block_between_the_markers(tmp_path, monkeypatch):
    results = tmp_path / "results"
    _fake_run(results / "attn.csv", "r1", "attn.py --sweep", _sweep({128: 0.5, 256: 0.7}), monkeypatch)
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# Title\n\n## Measured performance\n\n{report.BEGIN}\nhand-typed\n{report.END}\n\n## Next\n"
    )
    argv = ["--readme", str(readme), "--results", str(results)]
    assert report.main([*argv, "--check"]) == 1  # "hand-typed" is not what the CSVs give
    assert report.main(argv) == 0
    text = readme.read_text()
    assert "hand-typed" not in text and text.startswith("# Title\n\n## Measured performance\n\n")
    assert text.endswith(f"{report.END}\n\n## Next\n") and "run `r1`" in text
    assert (results / "plots" / "attn_seq_cpu_float32.png").stat().st_size > 0
    assert report.main([*argv, "--check"]) == 0
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="must hold exactly one"):
        report.main(argv)


def test_the_committed_readme_block_is_what_the_committed_csvs_give():
    """Nothing in the performance section is typed by hand: regenerate with python benchmarks/report.py."""
    assert report.main(["--check"]) == 0


def test_plot_draws_one_png_per_swept_axis_and_refuses_runs_without_a_sweep(tmp_path, monkeypatch):
    path = tmp_path / "attn.csv"
    points = _sweep({128: 0.5, 256: 0.7})
    points.append(
        ({"seq": 128, "prefix": 64}, ["prefix"], {"ptpeft-torch": (3.0, 1.0), "peft-sdpa": (4.0, 2.0)})
    )
    points[0] = (points[0][0], ["seq", "prefix"], points[0][2])
    _fake_run(path, "r1", "attn.py --sweep", points, monkeypatch)
    plot.main([str(path), "--out", str(tmp_path / "png")])
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "attn_prefix_cpu_float32.png",
        "attn_seq_cpu_float32.png",
    ]
    single = tmp_path / "single.csv"
    common.append_csv(
        [common.Row("attn", "p", "full", "s", "float32", 1.0, 1.0, 1.0, 1.0)], single, torch.device("cpu")
    )
    with pytest.raises(SystemExit, match="nothing to plot"):
        plot.main([str(single), "--out", str(tmp_path / "none")])


def test_the_pytest_benchmark_set_is_kept_out_of_the_default_run_and_runs_at_tiny_shapes(
    tmp_path, monkeypatch
):
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests"]  # the default command never collects benchmarks/
    out = tmp_path / "bench.json"
    argv = ["benchmarks/test_bench_ops.py", "--rootdir", str(ROOT), "-p", "no:xdist", "-p",
            "no:cacheprovider", "-q", "--benchmark-only", "--bench-size", "tiny", "--benchmark-min-rounds=1",
            "--benchmark-max-time=1e-6", "--benchmark-warmup=off", f"--benchmark-json={out}"]  # fmt: skip
    # In this process: torch, transformers and peft are imported already (a subprocess spent ~10 s on that)
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # else pytest-benchmark disables itself (xdist)
    assert pytest.main(argv) == pytest.ExitCode.OK
    names = {b["name"] for b in json.loads(out.read_text())["benchmarks"]}
    assert len(names) == 17 and "test_prefix_attention[flex-attention-inference-attn_gqa]" in names
    assert {
        "test_lora_linear[peft]",
        "test_adapter[unfused]",
        "test_prefix_attention[peft-sdpa-full-attn]",
    } <= names
