"""--estimate-memory: the estimate (fake tensors, no weights) against the CPU allocator's measured peak of
the same training step on real tensors, for the built-in model and two tiny configs; and the CLI."""

import pytest

from ptpeft_kernels.train.config import parse_args
from ptpeft_kernels.train.estimate import estimate, estimate_config, format_estimate
from ptpeft_kernels.train.memory_probe import measure_training_peak
from ptpeft_kernels.train.run import train
from tests.optional import require


def _wide_vocab_config(tmp_path):
    """A third shape: three GQA layers, a 2048-word vocabulary (the logits weigh more)."""
    from ptpeft_kernels.train.builtin_model import build_config, build_tokenizer, spec_with

    spec = spec_with("tiny", text_hidden=64, text_layers=3, text_heads=4, text_kv_heads=2)
    config = build_config(spec, build_tokenizer())
    config.text_config.vocab_size = 2048
    config.save_pretrained(tmp_path)  # config.json only: the estimate needs no weights
    return str(tmp_path)


# (model options, method, batch, tokens per example, gradient checkpointing). Estimated / measured peaks
# seen: default 14.15 / 13.94 MB (1.015), tiny with checkpointing 1.10 / 1.13 MB (0.978), wide vocabulary
# with adapters 6.90 / 6.11 MB (1.130).
CASES = {
    "builtin-default": (["--builtin-preset", "default"], "pt-lora", 4, 60, False),
    "builtin-tiny-checkpointing": (["--builtin-preset", "tiny"], "pt-lora", 4, 40, True),
    "wide-vocab-adapters": ("wide", "pt-adapter", 2, 48, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_estimate_within_25_percent_of_the_measured_peak(case, tmp_path):
    model, method, batch, seq, ckpt = CASES[case]
    if model == "wide":
        model = ["--model", _wide_vocab_config(tmp_path)]
    argv = [*model, "--method", method, "--batch-size", str(batch), "--seq-len", str(seq)]
    args = parse_args([*argv, *(["--gradient-checkpointing"] if ckpt else [])])
    result = estimate(args)
    config, _, _ = estimate_config(args)
    measured = measure_training_peak(config, args, batch, seq, checkpointing=ckpt)
    ratio = result["total"] / measured.peak
    assert 0.75 <= ratio <= 1.25, f"{case}: estimated {result['total']:.0f} B, measured {measured.peak} B"
    # The parts are the model's: weights and trainable bytes exactly, activations a real share.
    assert result["activations"] > 0.1 * result["total"]
    assert result["activation_per_token_checkpointing"] < result["activation_per_token"]


def test_cli_fsdp_and_4bit(capsys, tiny_assets):
    """The CLI prints every part and the verdict; FSDP divides the sharded parts by the world size;
    the 4-bit weights agree with what a real 4-bit load of the same model holds."""
    base = ["--builtin-preset", "tiny", "--batch-size", "8", "--seq-len", "40"]
    one = train(["--estimate-memory", *base, "--gpu-memory-gb", "0.001"])
    out = capsys.readouterr().out
    for line in ("base weights", "trainable", "gradients", "optimizer (AdamW)", "activations", "prefix KV"):
        assert line in out
    assert one["fits"] is (one["total"] <= 0.001 * 2**30)
    assert ("does NOT fit" in out) is (not one["fits"]) and format_estimate(one) in out
    fsdp = estimate(parse_args([*base, "--fsdp", "--world-size", "4"]))
    assert fsdp["weights"] == pytest.approx(one["weights"] / 4)
    assert fsdp["optimizer"] == pytest.approx(one["optimizer"] / 4)
    assert fsdp["micro_batch"] == 2 and fsdp["gathered"] > 0
    # A quarter of the micro-batch (plus the step's token-independent temporaries): seen 0.26x.
    assert 0.2 * one["activations"] < fsdp["activations"] < 0.4 * one["activations"]
    q4 = estimate(parse_args([*base, "--load-in-4bit"]))
    assert "nf4" in q4["weights_by_kind"] and q4["weights"] < 0.6 * one["weights"]
    bnb = require("bitsandbytes", "the 4-bit base's measured memory")
    assert bnb
    import torch

    from ptpeft_kernels.train.quantized import base_weight_bytes, load_base_model

    real = load_base_model(tiny_assets.model_dir, torch.float32, torch.device("cpu"), load_in_4bit=True)
    held = sum(base_weight_bytes(real).values())
    assert q4["weights"] == pytest.approx(held, rel=0.05)  # seen: 139752 estimated, 141120 held


def test_estimate_names_a_bad_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        estimate(parse_args(["--model", str(tmp_path)]))
