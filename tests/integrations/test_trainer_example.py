"""python/trainer_ptpeft.py (the README's "Inside Hugging Face Trainer / TRL" example): it runs both PT-PEFT
stages, resumes bit-exact from an interrupted stage 2, and under ``accelerate launch`` with two CPU processes
(DDP over gloo) ends with the adapters of the one-process run.
"""

from __future__ import annotations

import os
import runpy
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.file_tree import file_tree
from tests.optional import require

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "python" / "trainer_ptpeft.py"
# Two steps per stage, a checkpoint after every step; the DDP run splits each batch of 4 over two processes.
ARGS = ["--stage1-steps", "2", "--stage2-steps", "2", "--save-steps", "1"]
WEIGHTS = ("prefix_model.safetensors", "peft_lora/adapter_model.safetensors")


def adapters(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in WEIGHTS:
        out.update({f"{name}:{k}": v for k, v in load_file(str(path / name)).items()})
    return out


def run_example(argv: list[str]) -> dict:
    main = runpy.run_path(str(SCRIPT), run_name="trainer_ptpeft")["main"]
    return main(argv)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("example") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the resumed run (conftest's per-test setting): bit-exact needs the same
    try:
        result = run_example(["--output-dir", str(out), "--batch-size", "4", *ARGS])
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_example_trains_both_stages_and_saves_the_adapters(single):
    out, result = single
    assert result["world_size"] == 1
    assert file_tree(result["adapters"]) == {
        "ptpeft_config.json",
        "prefix_model.safetensors",
        "peft_lora/adapter_config.json",
        "peft_lora/adapter_model.safetensors",
        "training_args.bin",
    }
    # Stage 1 trained the prefixes only (its checkpoints have no LoRA), stage 2 both.
    assert not any("adapter_model" in f for f in file_tree(out / "stage1" / "checkpoint-2"))
    stage1 = load_file(str(out / "stage1" / "checkpoint-2" / "prefix_model.safetensors"))
    final = load_file(str(result["adapters"] / "prefix_model.safetensors"))
    assert all(not torch.equal(stage1[k], final[k]) for k in stage1)
    for stage in ("stage1", "stage2"):
        assert torch.isfinite(torch.tensor(result["stages"][stage].training_loss))


def test_example_resumes_an_interrupted_stage_2_bit_exact(single, tmp_path):
    out, result = single
    run = tmp_path / "run"
    shutil.copytree(out / "stage1", run / "stage1")  # stage 1 finished
    shutil.copytree(out / "stage2" / "checkpoint-1", run / "stage2" / "checkpoint-1")  # killed in step 2
    resumed = run_example(["--output-dir", str(run), "--batch-size", "4", "--resume", *ARGS])
    got, want = adapters(resumed["adapters"]), adapters(result["adapters"])
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes_matches_one(single, tmp_path):
    require("accelerate", "accelerate launch")
    out, result = single
    ddp = tmp_path / "ddp"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HOME": str(tmp_path / "hf"),  # no accelerate default_config.yaml of this machine's user
    }
    # --multi_gpu selects the torchrun launcher; without a GPU each process trains on the CPU and
    # torch.distributed uses gloo (--cpu alone would start one process unless MPI is configured).
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(SCRIPT),
        "--output-dir",
        str(ddp),
        "--batch-size",
        "2",
        *ARGS,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world size 2 (DDP, gloo)" in proc.stdout
    got, want = adapters(ddp / "adapters"), adapters(result["adapters"])
    assert got.keys() == want.keys() and want
    for k in want:
        # Same global batch, so the same update up to the all-reduce's summation order; Adam divides by
        # sqrt(v), which scales that noise up where a gradient is ~0 (seen: 9.3e-6 on 1 of 1,024 entries
        # of the prefix MLP after 4 + 4 steps at lr 1e-2; 2 + 2 steps as here: 4.5e-7).
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    # Only rank 0 wrote the checkpoints: one set, complete.
    assert sorted(p.name for p in (ddp / "stage2").iterdir()) == ["checkpoint-1", "checkpoint-2"]
