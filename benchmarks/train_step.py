"""PT-PEFT stage-2 training step vs Hugging Face PEFT's, on real-shaped decoder layers or the built-in model.

``--shape llava-7b`` / ``qwen2-vl-2b``: one (``--layers 2``: two) decoder layers at the exact dims of the
language model of LLaVA-1.5-7B (hidden 4096, 32 heads x 128, MLP 11008) or Qwen2-VL-2B (hidden 1536,
12 query / 2 KV heads x 128, MLP 8960), as ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` from a config,
randomly initialised (weights do not change the cost), the sdpa attention transformers picks by
default. The vocabulary is cut to 1024 words: a real one (32000 / 151936) adds one LM-head GEMM, the
same for every provider, that a model of 32 / 28 layers spreads over all of them and a one-layer model
would over-weight 16-32x. A sequence is ``--seq`` tokens of which the last ``--text-tokens`` (64) carry
the loss and the rest stand for the image (LLaVA-1.5: 576 image + 64 text = 640). Providers (the same
base weights, shared in memory; the same LoRA targets q/k/v/o, rank and weights):
  ptpeft-stage2   our prefixes (P per layer, MLP-reparameterised) + our LoRA, both trained: PT-PEFT stage 2;
  ptpeft-lora     our LoRA alone (``pk.apply_lora``);
  peft-lora       ``peft.get_peft_model`` with a ``LoraConfig`` on the same modules;
  peft-prefix     ``peft`` prefix tuning alone (``PrefixTuningConfig``, P virtual tokens, projection MLP).
``--shape builtin`` (the default): the built-in 0.98 M-parameter LLaVA-style model on a collated batch of
the synthetic captions (its step is overhead-bound: it says little about a real model); providers
ptpeft-stage2, ptpeft-lora, peft-lora.

Modes: ``forward`` is the training forward with the loss; ``full`` is forward, backward, AdamW step and
zero_grad (what one optimizer step costs). Before timing, each provider's logits on a short input are
checked against a float64 reference built independently of both libraries' LoRA and prefix code: the
base model in float64 with each LoRA's update merged into its weight (W + s B A) and the prefixes fed
as a past key/value cache (positions: ours unshifted, PEFT's shifted by P, as each library does); the
same reference in the provider's dtype gives the error yardstick. A provider that disagrees is
reported, not timed.

Sweeps (real shapes; ``--sweep``, one axis at a time around qwen2-vl-2b, 640 tokens, batch 1):
shape qwen2-vl-2b / llava-7b, seq 640 / 2048, batch 1 / 2 / 4. Lists given explicitly run every
combination (``--shape llava-7b qwen2-vl-2b --seq 640 2048 --batch 1 2 4``). ``--quick``: qwen2-vl-2b,
one layer, 640 tokens, batch 1.

Example: python benchmarks/train_step.py --shape qwen2-vl-2b --seq 640 --batch 1 --repeats 5
         python benchmarks/train_step.py --batch 32 --repeats 20     # the built-in model
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/<name>.py`: make the repository root importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import gc
import tempfile
import warnings
from collections.abc import Callable

import torch
from torch import nn

import ptpeft_kernels as pk
from benchmarks.common import (
    Row,
    append_csv,
    common_args,
    measure,
    point_extra,
    print_table,
    product_points,
    provider_error,
    setup,
    sweep_points,
)

MODES = ("forward", "full")
VOCAB = 1024
CHECK_TOKENS = 24  # length of the input the providers are checked on against float64
SHAPES = {  # the language models' decoder dims; "tiny" is for the smoke test
    "llava-7b": dict(arch="llama", hidden=4096, heads=32, kv_heads=32, mlp=11008),
    "qwen2-vl-2b": dict(arch="qwen2", hidden=1536, heads=12, kv_heads=2, mlp=8960),
    "tiny": dict(arch="qwen2", hidden=64, heads=4, kv_heads=2, mlp=96),
}
SWEEP = (
    dict(model="qwen2-vl-2b", seq=640, batch=1),
    {"model": ["qwen2-vl-2b", "llava-7b"], "seq": [640, 2048], "batch": [1, 2, 4]},
)
QUICK = [(dict(model="qwen2-vl-2b", seq=640, batch=1), [])]


# ----------------------------------------------------------------------------- the float64 reference


def lora_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name in the base model: scaling * B @ A in float64} for our LoRA layers and PEFT's."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, pk.LoRALinear):
            out[name] = m.scaling * (m.lora_B.weight.double() @ m.lora_A.weight.double())
        elif isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and "default" in m.lora_A:  # PEFT's
            delta = m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double()
            out[name.removeprefix("base_model.model.")] = m.scaling["default"] * delta
    return out


def our_prefixes(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each prefixed attention layer's (Hkv, P, D) key / value prefixes, in layer order."""
    slots = [m._ptpeft_prefix for m in model.modules() if getattr(m, "_ptpeft_prefix", None) is not None]
    return [slot.kv() for slot in slots]


def peft_prefixes(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT prefix tuning's past key / values for a batch of one, each (1, Hkv, P, D), in layer order."""
    cache = model.get_prompt(batch_size=1)
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]  # older transformers: a tuple of (key, value) per layer


def reference_logits(
    ref: nn.Module,
    base_state: dict[str, torch.Tensor],
    deltas: dict[str, torch.Tensor],
    prefixes: list[tuple[torch.Tensor, torch.Tensor]],
    inputs: dict,
    shift: int,
) -> torch.Tensor:
    """``ref`` (the plain base model, in the reference dtype) with ``deltas`` merged into its weights
    and ``prefixes`` as a past key/value cache; positions start at ``shift``. Weights restored after."""
    from transformers.cache_utils import DynamicCache

    params = dict(ref.named_parameters())
    dtype = next(iter(params.values())).dtype
    with torch.no_grad():
        for name, delta in deltas.items():
            params[f"{name}.weight"].add_(delta.to(dtype))
        batch, length = inputs["input_ids"].shape
        kwargs = {
            k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items() if k != "labels"
        }
        kwargs["position_ids"] = torch.arange(shift, shift + length, device=ref.device).expand(batch, -1)
        if prefixes:
            cache = DynamicCache()
            for i, (k, v) in enumerate(prefixes):
                grow = (batch, *k.shape[-3:])
                cache.update(k.to(dtype).expand(grow), v.to(dtype).expand(grow), i)
            kwargs["past_key_values"] = cache
            if "attention_mask" in kwargs:  # a padding mask covers past + current keys: the prefix is visible
                mask = kwargs["attention_mask"]
                kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, k.shape[-2]), mask], dim=1)
        try:
            with (
                warnings.catch_warnings()
            ):  # `past_key_values` is being renamed; older versions lack the new name
                warnings.simplefilter("ignore", FutureWarning)
                return ref(**kwargs).logits
        finally:
            for name in deltas:
                params[f"{name}.weight"].copy_(base_state[f"{name}.weight"])


def check_providers(providers: dict, prefix_len: dict, make_ref, base_state: dict, inputs: dict) -> dict:
    """{provider: why its logits on ``inputs`` are not the function (or None)}; ``make_ref(dtype)``
    builds the plain base model in that dtype."""
    dtype = next(p for p in base_state.values()).dtype
    refs = {torch.float64: make_ref(torch.float64), dtype: make_ref(dtype)}
    verdicts = {}
    for name, model in providers.items():
        deltas = lora_deltas(model)
        if name.startswith("peft-prefix"):
            prefixes, shift = peft_prefixes(model), prefix_len[name]
        else:
            prefixes, shift = our_prefixes(model), 0
        with torch.no_grad():
            out = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            ref64, same = (
                reference_logits(r, base_state, deltas, prefixes, inputs, shift) for r in refs.values()
            )
        verdicts[name] = provider_error(name, out, ref64, same)
    del refs
    gc.collect()
    return verdicts


# ----------------------------------------------------------------------------- the models


def real_config(shape: str, layers: int, seq: int):
    from transformers import LlamaConfig, Qwen2Config

    s = SHAPES[shape]
    cls = LlamaConfig if s["arch"] == "llama" else Qwen2Config
    return cls(
        vocab_size=VOCAB,
        hidden_size=s["hidden"],
        intermediate_size=s["mlp"],
        num_hidden_layers=layers,
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=max(4096, seq + 512),
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def shared_model(config, state: dict[str, torch.Tensor]) -> nn.Module:
    """A model of ``config`` whose parameters are the tensors of ``state`` (no copy): every provider
    shares the frozen base weights, so memory holds one copy whatever the number of providers."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, assign=True, strict=True)
    device = next(iter(state.values())).device
    # RoPE's inv_freq is a non-persistent buffer, absent from a state dict: rebuild it for real
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"tensors left on the meta device: {meta}")
    return model


def real_providers(args, shape: str, layers: int, seq: int, device, dtype) -> tuple[dict, dict, Callable]:
    """(providers, their check verdicts, ``recheck(inputs=None)``: the check again) at one real shape."""
    import peft
    from transformers import AutoModelForCausalLM

    config = real_config(shape, layers, seq)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)
    state = {k: v.detach() for k, v in base.state_dict().items()}
    del base

    ours = pk.apply_lora(shared_model(config, state), r=args.rank, alpha=args.alpha)
    targets = [n for n, m in ours.named_modules() if isinstance(m, pk.LoRALinear)]
    torch.manual_seed(1)
    for m in ours.modules():  # B = 0 would make every LoRA output trivially equal
        if isinstance(m, pk.LoRALinear):
            nn.init.normal_(m.lora_B.weight, std=0.02)
    theirs = peft.get_peft_model(
        shared_model(config, state),
        peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=targets),
    )
    mods = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, src in ((n, m) for n, m in ours.named_modules() if isinstance(m, pk.LoRALinear)):
            mods[name].lora_A["default"].weight.copy_(src.lora_A.weight)
            mods[name].lora_B["default"].weight.copy_(src.lora_B.weight)

    stage2 = pk.apply_prefix(shared_model(config, state), num_prefix=args.num_prefix, reparam_hidden=512)
    pk.apply_lora(stage2, r=args.rank, alpha=args.alpha)
    pk.mark_trainable(stage2, prefix=True, lora=True, adapter=False)
    with torch.no_grad():  # the same LoRA weights as the others
        for name, m in stage2.named_modules():
            if isinstance(m, pk.LoRALinear):
                src = dict(ours.named_modules())[name]
                m.lora_A.weight.copy_(src.lora_A.weight)
                m.lora_B.weight.copy_(src.lora_B.weight)

    prefix_cfg = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=args.num_prefix,
        prefix_projection=True,
        encoder_hidden_size=512,
    )
    prefix_only = peft.get_peft_model(shared_model(config, state), prefix_cfg)
    prefix_only.to(device)

    providers = {
        "ptpeft-stage2": stage2,
        "ptpeft-lora": ours,
        "peft-lora": theirs,
        "peft-prefix": prefix_only,
    }
    prefix_len = {"ptpeft-stage2": args.num_prefix, "peft-prefix": args.num_prefix}

    def make_ref(ref_dtype):
        model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=ref_dtype)
        model.load_state_dict(state)
        return model

    gen = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(0, VOCAB, (1, CHECK_TOKENS), generator=gen).to(device)

    def recheck(inputs: dict | None = None) -> dict:
        return check_providers(providers, prefix_len, make_ref, state, inputs or {"input_ids": ids})

    return providers, recheck(), recheck


def real_inputs(batch: int, seq: int, text_tokens: int, device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(3)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen).to(device)
    labels = ids.clone()
    labels[:, : max(seq - text_tokens, 0)] = -100  # image positions carry no loss (LLaVA)
    return {"input_ids": ids, "labels": labels}


# ----------------------------------------------------------------------------- timing


def step_fns(model: nn.Module, inputs: dict, lr: float = 1e-3) -> dict:
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


def time_providers(
    providers: dict, verdicts: dict, inputs: dict, modes, shape: str, dtype, device, args
) -> list:
    calls, trainable, rows = [], {}, []
    for name, model in providers.items():
        trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if verdicts.get(name):
            print(f"{name}: wrong: {verdicts[name]}")
            rows += [
                Row("train_step", name, m, shape, str(dtype).removeprefix("torch."), None, None, None, None,
                    status=f"wrong: {verdicts[name]}")
                for m in modes
            ]  # fmt: skip
            continue
        fns = step_fns(model, inputs)
        calls += [(name, mode, fns[mode], None) for mode in modes]
    rows = measure("train_step", calls, shape, dtype, device, args.warmup, args.repeats) + rows
    for row in rows:
        row.extra = {**row.extra, "trainable_params": trainable[row.provider]}
    return rows


# ----------------------------------------------------------------------------- the built-in model


def _builtin_batch(spec, processor, batch: int, device: torch.device) -> dict:
    from ptpeft_kernels.train import synthetic
    from ptpeft_kernels.train.builtin_model import BUILTIN_FAMILY
    from ptpeft_kernels.train.data import Collator, caption_examples, load_captions, model_inputs

    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic.write_dataset(
            tmp, "downstream", {"train": batch}, seed=0, image_size=spec.image_size
        )
        records, _ = load_captions(data.karpathy, data.image_dir, "train")
        examples = caption_examples(records, BUILTIN_FAMILY.caption_prompt, train=False)[:batch]
        collate = Collator(processor, BUILTIN_FAMILY.template, processor.tokenizer.eos_token, "train")
        return model_inputs(collate(examples), device)


def builtin_providers(args, batch: int, device, dtype) -> tuple[dict, dict, dict, str]:
    import peft

    from ptpeft_kernels.train.builtin_model import PRESETS, build_model

    spec = PRESETS[args.preset]

    def fresh(model_dtype=dtype):
        model, processor = build_model(spec, seed=0)
        return model.to(device=device, dtype=model_dtype), processor

    ours, processor = fresh()
    inputs = _builtin_batch(spec, processor, batch, device)
    if dtype != torch.float32:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    state = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    pk.apply_lora(ours, r=args.rank, alpha=args.alpha)
    lora_names = [n for n, m in ours.named_modules() if isinstance(m, pk.LoRALinear)]
    torch.manual_seed(1)
    for m in ours.modules():  # B = 0 would make the comparison trivially exact
        if isinstance(m, pk.LoRALinear):
            nn.init.normal_(m.lora_B.weight, std=0.02)
    theirs, _ = fresh()
    theirs = peft.get_peft_model(
        theirs,
        peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=lora_names),
    )
    stage2, _ = fresh()
    pk.apply_prefix(stage2, num_prefix=args.num_prefix, reparam_hidden=128)
    pk.apply_lora(stage2, r=args.rank, alpha=args.alpha)
    pk.mark_trainable(stage2, prefix=True, lora=True, adapter=False)
    with torch.no_grad():
        mods, staged = dict(theirs.base_model.model.named_modules()), dict(stage2.named_modules())
        for n in lora_names:
            src = dict(ours.named_modules())[n]
            for dst_a, dst_b in ((mods[n].lora_A["default"], mods[n].lora_B["default"]),
                                 (staged[n].lora_A, staged[n].lora_B)):  # fmt: skip
                dst_a.weight.copy_(src.lora_A.weight)
                dst_b.weight.copy_(src.lora_B.weight)
    providers = {"ptpeft-stage2": stage2, "ptpeft-lora": ours, "peft-lora": theirs}

    def make_ref(ref_dtype):
        model, _ = fresh(ref_dtype)
        model.load_state_dict(state)  # the providers' weights exactly (rounded to their dtype)
        return model

    check_inputs = {k: v[:1] for k, v in inputs.items()}
    verdicts = check_providers(providers, {}, make_ref, state, check_inputs)
    seq = inputs["input_ids"].shape[1]
    shape = f"B={batch} L={seq} r={args.rank} P={args.num_prefix} preset={args.preset}"
    return providers, verdicts, inputs, shape


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape",
        nargs="+",
        default=None,
        choices=["builtin", *SHAPES],
        help="what to train (default builtin)",
    )
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of a real shape (default 1)")
    parser.add_argument("--seq", type=int, nargs="+", default=None, help="tokens per sequence (default 640)")
    parser.add_argument(
        "--text-tokens", type=int, default=64, help="tokens with a loss (the rest: image; 64)"
    )
    parser.add_argument(
        "--batch", type=int, nargs="+", default=None, help="examples per step (default 1; built-in model 32)"
    )
    parser.add_argument("--preset", default="default", help="built-in model size (default, tiny)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    parser.add_argument(
        "--num-prefix", type=int, default=None, help="prefix tokens per layer (default 16; built-in model 8)"
    )
    common_args(parser, "train_step.csv", modes=MODES)
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    modes = [m for m in args.modes if m in MODES]
    if not modes:
        raise SystemExit(f"--modes: this benchmark measures {MODES}")
    if args.sweep or args.quick:
        given = [f"--{n}" for n in ("shape", "seq", "batch") if getattr(args, n) is not None]
        if given:
            parser.error(f"--sweep / --quick set the shapes themselves; drop {given}")
        points = QUICK if args.quick else sweep_points(*SWEEP)
    else:
        shapes = args.shape or ["builtin"]
        points = product_points({"model": shapes, "seq": args.seq or [640], "batch": args.batch or [None]})
    for cfg, axes in points:
        if cfg["model"] == "builtin":
            rows = run_builtin(args, cfg, axes, modes, device, dtype)
        else:
            rows = run_real(args, cfg, axes, modes, device, dtype)
        if not args.no_csv:
            append_csv(rows, args.csv, device)


def run_builtin(args, cfg: dict, axes: list[str], modes, device, dtype) -> list:
    from ptpeft_kernels.train.builtin_model import PRESETS

    if args.preset not in PRESETS:
        raise SystemExit(f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
    batch = cfg["batch"] or 32
    args.num_prefix = 8 if args.num_prefix is None else args.num_prefix
    providers, verdicts, inputs, shape = builtin_providers(args, batch, device, dtype)
    rows = time_providers(providers, verdicts, inputs, modes, shape, dtype, device, args)
    params = {"model": "builtin", "preset": args.preset, "batch": batch, "seq": inputs["input_ids"].shape[1]}
    for row in rows:
        row.extra = {**point_extra(params, [a for a in axes if a != "seq"]), **row.extra}
    print(f"built-in model ({args.preset}) stage-2 training step, {shape}, {device}")
    print_table(rows, baseline="peft-lora")
    return rows


def run_real(args, cfg: dict, axes: list[str], modes, device, dtype) -> list:
    num_prefix = 16 if args.num_prefix is None else args.num_prefix
    args.num_prefix = num_prefix
    batch, seq = cfg["batch"] or 1, cfg["seq"]
    providers, verdicts, _ = real_providers(args, cfg["model"], args.layers, seq, device, dtype)
    inputs = real_inputs(batch, seq, args.text_tokens, device)
    shape = f"{cfg['model']} x{args.layers} B={batch} L={seq} r={args.rank} P={num_prefix}"
    rows = time_providers(providers, verdicts, inputs, modes, shape, dtype, device, args)
    params = {
        "model": cfg["model"],
        "layers": args.layers,
        "batch": batch,
        "seq": seq,
        "text_tokens": args.text_tokens,
    }
    for row in rows:
        row.extra = {**point_extra(params, axes), **row.extra}
    print(f"{cfg['model']}-shaped decoder ({args.layers} layer(s)) training step, {shape}, {dtype}, {device}")
    print_table(rows, baseline="peft-lora")
    del providers
    gc.collect()
    return rows


if __name__ == "__main__":
    main()
