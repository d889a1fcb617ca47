"""One PT-PEFT stage-2 training step of the built-in model: our LoRA against Hugging Face PEFT's LoRA.

Providers (same model, same batch, same LoRA targets, rank and weights):
  ptpeft-stage2   prefixes + our LoRA, both trained: the real PT-PEFT stage-2 step;
  ptpeft-lora     our LoRA alone (``pk.apply_lora``): the like-for-like comparison with PEFT;
  peft-lora       ``peft.get_peft_model`` with a ``LoraConfig`` on the same modules.

Modes: ``forward`` is the training forward with the loss; ``full`` is forward, backward, AdamW
step and zero_grad (what one optimizer step costs). The batch is a collated batch of the
synthetic downstream captions through the model's own processor; the model is the built-in
one at its configured size, randomly initialised (weights do not change the cost).

Example: python benchmarks/train_step.py --batch 32 --repeats 20
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/<name>.py`: make the repository root importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import tempfile

import torch

import ptpeft_kernels as pk
from benchmarks.common import append_csv, assert_same_function, common_args, measure, print_table, setup
from ptpeft_kernels.train import synthetic
from ptpeft_kernels.train.builtin_model import BUILTIN_FAMILY, PRESETS, build_model
from ptpeft_kernels.train.data import Collator, caption_examples, load_captions, model_inputs

MODES = ("forward", "full")


def _batch(spec, processor, batch: int, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic.write_dataset(
            tmp, "downstream", {"train": batch}, seed=0, image_size=spec.image_size
        )
        records, _ = load_captions(data.karpathy, data.image_dir, "train")
        examples = caption_examples(records, BUILTIN_FAMILY.caption_prompt, train=False)[:batch]
        collate = Collator(processor, BUILTIN_FAMILY.template, processor.tokenizer.eos_token, "train")
        return model_inputs(collate(examples), device)


def _step_fns(model: torch.nn.Module, inputs: dict, lr: float = 1e-3) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()

    def forward():
        return model(**inputs).loss

    def full():
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return {"forward": forward, "full": full}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="built-in model size")
    parser.add_argument("--batch", type=int, default=32, help="examples per step (default 32, the driver's)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    parser.add_argument("--num-prefix", type=int, default=8, help="prefix tokens per layer (default 8)")
    common_args(parser, "train_step.csv")
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    modes = [m for m in args.modes if m in MODES]
    if not modes:
        raise SystemExit(f"--modes: this benchmark measures {MODES}")
    spec = PRESETS[args.preset]

    def fresh():
        model, processor = build_model(spec, seed=0)
        return model.to(device=device, dtype=dtype), processor

    base, processor = fresh()
    inputs = _batch(spec, processor, args.batch, device)
    if dtype != torch.float32:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

    ours = pk.apply_lora(base, r=args.rank, alpha=args.alpha)
    lora_names = [n for n, m in ours.named_modules() if isinstance(m, pk.LoRALinear)]
    torch.manual_seed(1)
    for m in ours.modules():  # B = 0 would make the comparison trivially exact
        if isinstance(m, pk.LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.02)

    import peft

    theirs, _ = fresh()
    theirs = peft.get_peft_model(
        theirs,
        peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=lora_names),
    )
    with torch.no_grad():
        mods = dict(theirs.base_model.model.named_modules())
        for n in lora_names:
            src = dict(ours.named_modules())[n]
            mods[n].lora_A["default"].weight.copy_(src.lora_A.weight)
            mods[n].lora_B["default"].weight.copy_(src.lora_B.weight)
        ours.eval()
        theirs.eval()
        if dtype == torch.float32:
            torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, rtol=2e-4, atol=2e-4)
        else:  # two summation orders differ by a rounding step or so per layer in low precision
            assert_same_function(ours(**inputs).logits, theirs(**inputs).logits)

    stage2, _ = fresh()
    pk.apply_prefix(stage2, num_prefix=args.num_prefix, reparam_hidden=128)
    pk.apply_lora(stage2, r=args.rank, alpha=args.alpha)
    pk.mark_trainable(stage2, prefix=True, lora=True, adapter=False)

    providers = {"ptpeft-stage2": stage2, "ptpeft-lora": ours, "peft-lora": theirs}
    seq = inputs["input_ids"].shape[1]
    shape = f"B={args.batch} L={seq} r={args.rank} P={args.num_prefix} preset={args.preset}"
    calls, trainable = [], {}
    for name, model in providers.items():
        fns = _step_fns(model, inputs)
        trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        calls += [(name, mode, fns[mode], None) for mode in modes]
    rows = measure("train_step", calls, shape, dtype, device, args.warmup, args.repeats)
    for row in rows:
        row.extra = {"trainable_params": trainable[row.provider]}
    print(f"built-in model ({args.preset}) stage-2 training step, {shape}, {device}")
    print_table(rows, baseline="peft-lora")
    if not args.no_csv:
        append_csv(rows, args.csv, device)


if __name__ == "__main__":
    main()
