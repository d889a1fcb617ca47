"""``python -m ptpeft_kernels.analyze``: how far do adapters move a model's representation space?

Loads a base checkpoint, runs it and each adapted variant over the same data, and reports per
layer the remaining rank ratio, the spectrum deviation from the base and linear CKA to the base;
writes the table (CSV, JSON) and plots into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .compare import Comparison, compare_representations
from .plots import plot_cumulative_spectra, plot_rank_ratio_per_layer

# Files whose presence marks a directory as a whole model checkpoint rather than adapters.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ptpeft_kernels.analyze",
        description=(
            "Measure how much adapters change a model's hidden-state representation space: per layer, "
            "the remaining rank ratio (percent of singular values needed to hold --threshold of the "
            "spectrum's mass; the paper's measure), the max gap between the cumulative spectra of base and "
            "adapted model (deviation, 0 = identical) and linear CKA to the base (1 = same geometry). "
            "Prints a table and writes metrics.csv, metrics.json, cumulative_spectra_layer<L>.png and "
            "rank_ratio_per_layer.png into --output-dir."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory of the base model")
    p.add_argument(
        "--adapters",
        nargs="+",
        required=True,
        metavar="DIR",
        help="one or more directories saved with ptpeft_kernels.save_adapters (loaded onto a fresh copy of "
        "--model with ptpeft_kernels.load_adapters), or whole fine-tuned checkpoint directories "
        "(recognised by model.safetensors / pytorch_model.bin), e.g. a full fine-tuning run",
    )
    p.add_argument(
        "--names", nargs="+", metavar="NAME", help="labels for --adapters (default: directory names)"
    )
    p.add_argument("--base-name", default="base", help="label of the base model in the table and plots")
    p.add_argument(
        "--data",
        required=True,
        help="dataset: a .jsonl file with one JSON object per line holding a text (see --text-field), "
        "tokenised with --tokenizer; or a .pt file (torch.save) of pre-tokenised batches, either a list of "
        "dicts of tensors (used as batches) or one dict of (N, ...) tensors (split into --batch-size rows)",
    )
    p.add_argument("--text-field", default="text", help="JSONL key holding the text")
    p.add_argument("--tokenizer", help="tokenizer directory for .jsonl data (default: --model)")
    p.add_argument(
        "--max-length", type=int, default=128, help="JSONL texts are truncated to this many tokens"
    )
    p.add_argument("--max-samples", type=int, help="use at most this many samples (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    p.add_argument(
        "--layers",
        nargs="+",
        default=["-1"],
        help="hidden-state indices to analyse (0 = embedding output, -1 = last layer, negative counts from "
        "the end), or 'all'. Every chosen layer's features of the base model stay in memory",
    )
    p.add_argument(
        "--tower",
        choices=("language", "vision"),
        default="language",
        help="'language': the (language) model's hidden states, padding positions dropped; 'vision': the "
        "vision tower's (vision_tower / vision_model / ...) on pixel_values, which the data must contain",
    )
    p.add_argument(
        "--threshold", type=float, default=0.9, help="cumulative spectrum share that defines the rank ratio"
    )
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to run the models on"
    )
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="dtype to load the models in")
    p.add_argument("--output-dir", default="analysis", help="directory for metrics and plots (created)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _parse_layers(values: Sequence[str], parser: argparse.ArgumentParser) -> list[int] | None:
    if [v.lower() for v in values] == ["all"]:
        return None
    try:
        return [int(v) for v in values]
    except ValueError:
        parser.error(f"--layers takes integers or 'all', got {' '.join(values)}")
    raise AssertionError  # parser.error exits


def load_jsonl_texts(path: str, field: str, max_samples: int | None = None) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string {field!r} field")
            texts.append(record[field])
            if max_samples is not None and len(texts) >= max_samples:
                break
    if not texts:
        raise ValueError(f"{path} holds no texts")
    return texts


def tokenize_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding: a causal model's hidden states of real tokens then do not see the pads at all,
    # so the features equal those of each text run alone. Left padding would shift the absolute
    # positions of models with learned position embeddings (OPT, GPT-2); RoPE models do not mind.
    tokenizer.padding_side = "right"
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


def load_pt_batches(path: str, batch_size: int, max_samples: int | None = None) -> list[dict]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict):
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise ValueError(f"{path}: the dict holds no tensors")
        sizes = {v.shape[0] for v in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"{path}: tensors disagree on the number of rows: {sorted(sizes)}")
        n = sizes.pop() if max_samples is None else min(sizes.pop(), max_samples)
        return [
            {k: v[s : min(s + batch_size, n)] for k, v in tensors.items()} for s in range(0, n, batch_size)
        ]
    if isinstance(data, (list, tuple)) and all(isinstance(b, dict) for b in data) and data:
        if max_samples is None:
            return list(data)
        out, left = [], max_samples
        for b in data:
            if left <= 0:
                break
            rows = next(v.shape[0] for v in b.values() if isinstance(v, torch.Tensor))
            out.append({k: v[:left] if isinstance(v, torch.Tensor) else v for k, v in b.items()})
            left -= rows
        return out
    raise ValueError(
        f"{path}: expected a list of batch dicts or a dict of tensors, got {type(data).__name__}"
    )


def load_model(path: str, dtype: torch.dtype, device: str) -> nn.Module:
    """The checkpoint's own architecture class (so adapter key names match training), else AutoModel."""
    import transformers

    from ..train import minilm  # noqa: F401 - registers the MiniLM preset's model type (its checkpoints load)

    config = transformers.AutoConfig.from_pretrained(path)
    cls = next(
        (getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)),
        transformers.AutoModel,
    )
    model = cls.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def is_full_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, f)) for f in _WEIGHT_FILES
    )


def variant_loader(base_path: str, path: str, dtype: torch.dtype, device: str) -> Callable[[], nn.Module]:
    def load() -> nn.Module:
        if is_full_checkpoint(path):
            return load_model(path, dtype, device)
        import ptpeft_kernels as pk

        load_adapters = getattr(pk, "load_adapters", None)
        if load_adapters is None:
            raise RuntimeError(
                f"{path} is not a full checkpoint and this build of ptpeft_kernels has no load_adapters"
            )
        model = load_model(base_path, dtype, device)
        loaded = load_adapters(model, path)
        model = loaded if isinstance(loaded, nn.Module) else model
        return model.to(device).eval()

    return load


def format_table(comparison: Comparison) -> str:
    head = ("model", "layer", "rank ratio %", "n", "effective rank", "deviation", "CKA vs base")
    body = [
        (
            r["model"],
            str(r["layer"]),
            f"{r['rank_ratio']:.1f}",
            str(r["spectrum_length"]),
            f"{r['effective_rank']:.2f}",
            f"{r['deviation']:.4f}",
            f"{r['cka']:.4f}",
        )
        for r in comparison.rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def write_outputs(comparison: Comparison, output_dir: str) -> list[str]:
    os.makedirs(output_dir, exist_ok=True)
    written = []
    csv_path = os.path.join(output_dir, "metrics.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        fields = ["model", "layer", "rank_ratio", "spectrum_length", "effective_rank", "deviation", "cka"]
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(comparison.rows)
    written.append(csv_path)
    json_path = os.path.join(output_dir, "metrics.json")
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(
            {
                "threshold": comparison.threshold,
                "base": comparison.base_name,
                "rows": comparison.rows,
                "curves": {
                    str(layer): {name: c.tolist() for name, c in per.items()}
                    for layer, per in comparison.curves.items()
                },
            },
            fh,
            indent=1,
        )
    written.append(json_path)
    for layer, per in sorted(comparison.curves.items()):
        path = os.path.join(output_dir, f"cumulative_spectra_layer{layer}.png")
        plot_cumulative_spectra(per, path, comparison.threshold, title=f"Cumulative spectrum, layer {layer}")
        written.append(path)
    path = os.path.join(output_dir, "rank_ratio_per_layer.png")
    plot_rank_ratio_per_layer(comparison.ratios, path, comparison.threshold)
    written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    layers = _parse_layers(args.layers, parser)
    if not 0.0 < args.threshold <= 1.0:
        parser.error(f"--threshold must be in (0, 1], got {args.threshold}")
    for flag in ("batch_size", "max_length", "max_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    for path in [args.model, *args.adapters]:
        if not os.path.isdir(path):
            parser.error(f"{path} is not a directory")
    if not os.path.isfile(args.data):
        parser.error(f"--data {args.data} does not exist")
    names = args.names or [os.path.basename(os.path.normpath(a)) for a in args.adapters]
    if len(names) != len(args.adapters):
        parser.error(f"--names has {len(names)} labels for {len(args.adapters)} --adapters")
    if len(set(names)) != len(names) or args.base_name in names:
        parser.error(f"labels must be distinct from each other and from --base-name: {names}")

    dtype = _DTYPES[args.dtype]
    try:
        if args.data.endswith(".jsonl"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
            texts = load_jsonl_texts(args.data, args.text_field, args.max_samples)
            batches = tokenize_batches(tokenizer, texts, args.batch_size, args.max_length)
        elif args.data.endswith(".pt"):
            batches = load_pt_batches(args.data, args.batch_size, args.max_samples)
        else:
            parser.error(f"--data must end in .jsonl or .pt, got {args.data}")
        base = load_model(args.model, dtype, args.device)
        variants = {
            n: variant_loader(args.model, a, dtype, args.device)
            for n, a in zip(names, args.adapters, strict=True)
        }
        comparison = compare_representations(
            base,
            variants,
            batches,
            layers=layers,
            tower=args.tower,
            threshold=args.threshold,
            base_name=args.base_name,
            device=args.device,
            progress=not args.no_progress,
        )
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(comparison))
    for path in write_outputs(comparison, args.output_dir):
        print(f"wrote {path}")
    return 0
