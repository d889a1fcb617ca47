"""Smoke test of python/walkthrough.py (the README's "Using it in a transformers model" section)."""

from __future__ import annotations

import runpy
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "python" / "walkthrough.py"


def test_walkthrough_trains_saves_reloads_merges_and_generates():
    main = runpy.run_path(str(SCRIPT), run_name="walkthrough")["main"]
    result = main(steps=4, verbose=False)
    assert result["stage1_loss"][1] < result["stage1_loss"][0]  # the prefixes learn
    assert result["stage2_loss"][1] < result["stage2_loss"][0]  # prefixes + LoRA learn
    assert result["reload_equal"]
    tokens = result["tokens"]
    assert tokens.shape == (2, 16 + 10 + 8) and tokens.dtype == torch.long


def test_readme_section_runs_as_written(tmp_path, monkeypatch):
    readme = (SCRIPT.parents[1] / "README.md").read_text()
    section = readme.split("## Using it in a transformers model", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # it saves to run/adapters
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["tokens"].shape == (2, 16 + 8 + 8)
    assert (tmp_path / "run" / "adapters" / "peft_lora" / "adapter_config.json").is_file()
    assert not any(isinstance(m, namespace["pk"].LoRALinear) for m in namespace["model"].modules())
