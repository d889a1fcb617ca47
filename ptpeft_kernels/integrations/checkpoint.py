"""``save_adapters`` / ``load_adapters``: everything trained, in one directory, written atomically.

Layout:

- ``ptpeft_config.json`` — what was added (family, architecture, prefix groups and sites,
  adapter placement and layers, LoRA layers) and which files hold it; written last, so a
  directory without it (or with files it does not list) is an interrupted save;
- ``adapter_config.json`` + ``adapter_model.safetensors`` — the LoRA part in PEFT's format
  and key names (``base_model.model.<module>.lora_A.weight``), loadable by
  ``peft.PeftModel.from_pretrained(base, path)``. At the top level only when LoRA is all the
  checkpoint holds; beside prefixes or adapters they go into the ``peft_lora/`` subfolder
  (``PeftModel.from_pretrained(base, path + "/peft_lora")``). Why: with peft installed,
  transformers' ``Model.from_pretrained(path)`` and ``model.load_adapter(path)`` load whatever
  PEFT checkpoint sits at the top level and nothing else -- measured on the tiny LLaVA with
  prefixes + LoRA (format version 1): no warning, logits 0.58 from the saved model's. Out of their
  reach they fail loudly instead (no ``config.json`` / ``adapter_config.json``);
- ``prefix_model.safetensors`` — the prefix encoders (``<group>.<encoder parameter>``);
- ``bottleneck_adapters.safetensors`` — the adapters (full module names).

Every file is written to a temporary name in the same directory and renamed into place.
:func:`load_adapters` also takes a plain PEFT LoRA or prefix-tuning checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import BottleneckAdapter, LoRALinear, PrefixEncoder
from .adapter import adapter_spec, apply_adapter
from .lora import apply_lora
from .model_info import find_attention_sites, model_family
from .prefix import PrefixBank, get_prefix_bank, install_prefix_bank
from .stages import freeze_base

CONFIG_NAME = "ptpeft_config.json"
PEFT_CONFIG_NAME = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"
PREFIX_WEIGHTS = "prefix_model.safetensors"
ADAPTER_WEIGHTS = "bottleneck_adapters.safetensors"
PEFT_SUBDIR = "peft_lora"  # where the PEFT files go when the checkpoint holds more than LoRA
# Version 2 moved the PEFT files of a checkpoint with prefixes / adapters into PEFT_SUBDIR;
# version 1 directories (PEFT files always at the top level) still load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


# ----------------------------------------------------------------------------- atomic files


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(path: Path, data: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)

    _atomic_write(path, write)


def _write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(data, tmp, metadata=metadata))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a file written by save_adapters or PEFT)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the file is corrupt or truncated") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; the checkpoint directory is incomplete")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for bad headers / short files
        raise ValueError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
            f"it is corrupt or truncated"
        ) from None


# ----------------------------------------------------------------------------- LoRA in PEFT's format


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _peft_lora_config(model: nn.Module, layers: dict[str, LoRALinear]) -> dict[str, Any]:
    ranks = Counter(m.r for m in layers.values())
    alphas = Counter(m.alpha for m in layers.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    dropouts = {m.dropout for m in layers.values()}
    rslora = {m.use_rslora for m in layers.values()}
    if len(dropouts) > 1 or len(rslora) > 1:
        raise ValueError(
            f"PEFT's format holds one lora_dropout and one use_rslora per checkpoint, the model's LoRA "
            f"layers have dropouts {sorted(dropouts)} and use_rslora {sorted(rslora)}"
        )
    config = getattr(model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropouts.pop(),
        "use_rslora": rslora.pop(),
        # Full module names: PEFT's suffix rule matches each exactly.
        "target_modules": sorted(layers),
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {n: m.alpha for n, m in layers.items() if m.alpha != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _peft_key(name: str, part: str) -> str:
    return f"base_model.model.{name}.{part}.weight"


# ----------------------------------------------------------------------------- structure checks


def _site_list(model: nn.Module) -> list[dict[str, Any]]:
    return [
        {"name": s.name, "heads": s.num_heads, "kv_heads": s.num_kv_heads, "head_dim": s.head_dim}
        for s in find_attention_sites(model)
    ]


def _describe_site(site: dict[str, Any]) -> str:
    shape = f"{site['heads']} heads, {site['kv_heads']} key/value heads of dim {site['head_dim']}"
    return f"{site['name']} ({shape})"


def _check_sites(model: nn.Module, config: dict, file: Path) -> None:
    """The model's attention modules must be the checkpoint's, one for one, in number, names and shapes.

    Without this a checkpoint from a shallower model loads into a deeper one and the extra layers
    silently get no prefix / LoRA / adapter. Checkpoints written before the site list was saved
    are checked by count.
    """
    have = _site_list(model)
    want = config.get("attention_sites")
    hint = "the checkpoint was saved from a different base model (layer count or architecture)"
    if not isinstance(want, list):
        count = config.get("num_attention_sites")
        if isinstance(count, int) and count != len(have):
            raise ValueError(
                f"{file}: the checkpoint's model has {count} attention modules, {type(model).__name__} has "
                f"{len(have)}; {hint}"
            )
        return
    for i in range(max(len(want), len(have))):
        w = want[i] if i < len(want) else None
        h = have[i] if i < len(have) else None
        if w == h:
            continue
        if w is None:
            detail = f"the model has more: its attention module {_describe_site(h)} has no counterpart"
        elif h is None:
            detail = f"the model has fewer: the checkpoint's {_describe_site(w)} has no counterpart"
        else:
            detail = f"attention module {i} is {_describe_site(h)} in the model, {_describe_site(w)} saved"
        raise ValueError(
            f"{file}: the checkpoint's model has {len(want)} attention modules, {type(model).__name__} has "
            f"{len(have)}; first difference: {detail}; {hint}"
        )


def _check_lora_shapes(model: nn.Module, modules: dict[str, dict], file: Path) -> None:
    """Each LoRA target must exist and have the saved in / out widths (checked before anything changes)."""
    all_modules = dict(model.named_modules())
    for name, saved in modules.items():
        module = all_modules.get(name)
        if module is None:
            raise ValueError(
                f"{file}: the checkpoint has LoRA on {name}, which the model lacks; "
                f"the layer count or architecture differs"
            )
        shape = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        if "in" in saved and shape != (saved["in"], saved["out"]):
            raise ValueError(
                f"{file}: LoRA module {name} is {saved['in']} -> {saved['out']} in the checkpoint but "
                f"{shape[0]} -> {shape[1]} in the model; the checkpoint was saved from a different base model"
            )


def _check_peft_targets(model: nn.Module, peft: dict, names: list[str], file: Path) -> None:
    """A PEFT checkpoint's target_modules must not select modules it has no weights for (a deeper model)."""
    from .lora import match_targets

    targets = peft.get("target_modules")
    own_rules = targets == "all-linear" or peft.get("layers_to_transform") or peft.get("exclude_modules")
    if not targets or own_rules:
        return  # selections PEFT resolves with rules of its own: the saved module names decide
    covered = set(names)
    extra = [n for n in match_targets(model, targets) if n not in covered]
    if extra:
        raise ValueError(
            f"{file}: its target_modules {targets!r} select {len(extra)} module(s) of {type(model).__name__} "
            f"the checkpoint has no LoRA weights for, first {extra[0]}; it was saved from a model with fewer "
            f"layers or another architecture"
        )


# ----------------------------------------------------------------------------- save


def _relative(directory: str, name: str) -> str:
    return name if directory == "." else f"{directory}/{name}"


def _peft_directory(directory: Path, lora_info: dict) -> Path:
    """Where a save_adapters checkpoint's PEFT files are (version 1 had no ``peft_directory``)."""
    sub = lora_info.get("peft_directory", ".")
    if sub not in (".", PEFT_SUBDIR):
        raise ValueError(
            f"{directory / CONFIG_NAME}: lora.peft_directory is {sub!r}, expected '.' or {PEFT_SUBDIR!r}"
        )
    return directory / sub


def save_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's prefixes, LoRA layers and adapters to directory ``path``; returns it.

    Only the added parameters are written (never the base model). Files of a previous save
    that this one does not produce are removed, so the directory always describes one state.
    The LoRA part is a PEFT checkpoint at the top level when LoRA is all there is, else in
    ``peft_lora/`` (module docstring: so that PEFT-only loaders cannot load a part as the whole).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike directory, got {type(path).__name__}")
    family = model_family(model)
    bank = get_prefix_bank(model)
    layers = _lora_layers(model)
    spec = adapter_spec(model)
    if bank is None and not layers and spec is None:
        raise ValueError(
            f"{type(model).__name__} has no prefixes, LoRA layers or adapters to save "
            f"(call apply_prefix / apply_lora / apply_adapter first)"
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "ptpeft_adapters", "family": family}
    config: dict[str, Any] = {
        "format": "ptpeft_adapters",
        "version": FORMAT_VERSION,
        "family": family,
        "architecture": type(model).__name__,
        "num_attention_sites": len(find_attention_sites(model)),
        # Every attention module with its shape: load_adapters refuses a model that differs anywhere.
        "attention_sites": _site_list(model),
        "prefix": None,
        "lora": None,
        "adapter": None,
        "files": [],
    }
    written = {CONFIG_NAME}
    if bank is not None:
        tensors = {
            f"{group}.{k}": v for group, enc in bank.encoders.items() for k, v in enc.state_dict().items()
        }
        _write_tensors(out / PREFIX_WEIGHTS, tensors, meta)
        config["prefix"] = {"groups": bank.config()}
        written.add(PREFIX_WEIGHTS)
    if layers:
        peft_config = _peft_lora_config(model, layers)
        tensors = {}
        for name, layer in layers.items():
            tensors[_peft_key(name, "lora_A")] = layer.lora_A.weight
            tensors[_peft_key(name, "lora_B")] = layer.lora_B.weight
        peft_dir = "." if bank is None and spec is None else PEFT_SUBDIR
        (out / peft_dir).mkdir(exist_ok=True)
        _write_tensors(out / peft_dir / LORA_WEIGHTS, tensors, {"format": "pt"})
        _write_json(out / peft_dir / PEFT_CONFIG_NAME, peft_config)
        config["lora"] = {
            "peft_directory": peft_dir,
            "modules": {
                n: {"r": m.r, "alpha": m.alpha, "in": m.in_features, "out": m.out_features}
                for n, m in layers.items()
            },
            "dropout": peft_config["lora_dropout"],
            "use_rslora": peft_config["use_rslora"],
        }
        written |= {_relative(peft_dir, LORA_WEIGHTS), _relative(peft_dir, PEFT_CONFIG_NAME)}
    if spec is not None:
        tensors = {
            f"{n}.{k}": v
            for n, m in model.named_modules()
            if isinstance(m, BottleneckAdapter)
            for k, v in m.state_dict().items()
        }
        _write_tensors(out / ADAPTER_WEIGHTS, tensors, meta)
        widths = {n: m.down.in_features for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}
        config["adapter"] = {**spec, "modules": widths}
        written.add(ADAPTER_WEIGHTS)
    peft_files = [_relative(d, f) for d in (".", PEFT_SUBDIR) for f in (LORA_WEIGHTS, PEFT_CONFIG_NAME)]
    for stale in (PREFIX_WEIGHTS, ADAPTER_WEIGHTS, *peft_files):
        if stale not in written and (out / stale).exists():
            (out / stale).unlink()
    if (out / PEFT_SUBDIR).is_dir() and not any((out / PEFT_SUBDIR).iterdir()):
        (out / PEFT_SUBDIR).rmdir()
    config["files"] = sorted(written - {CONFIG_NAME})
    _write_json(out / CONFIG_NAME, config)
    return out


# ----------------------------------------------------------------------------- load


def _load_exact(name: str, module_params: dict[str, Tensor], saved: dict[str, Tensor], file: Path) -> None:
    missing = sorted(set(module_params) - set(saved))
    extra = sorted(set(saved) - set(module_params))
    if missing or extra:
        raise ValueError(
            f"{file}: {name} keys do not match the model: missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}, unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}"
        )
    with torch.no_grad():
        for key, param in module_params.items():
            value = saved[key]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"{file}: {key} has shape {tuple(value.shape)} but the model expects "
                    f"{tuple(param.shape)}; the checkpoint was saved from a different base model"
                )
            param.copy_(value.to(param.dtype))


def _check_family(family: str, saved: dict, file: Path) -> None:
    want = saved.get("family")
    if want != family:
        raise ValueError(
            f"{file} was saved from a {want!r} model, but the model is {family!r}; "
            f"load it into the same family"
        )


def _load_prefix(model: nn.Module, info: dict, file: Path) -> None:
    groups = info.get("groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{file.parent / CONFIG_NAME}: 'prefix' must hold a non-empty 'groups' object")
    sites = {s.name: s for s in find_attention_sites(model)}
    bank = get_prefix_bank(model)
    if bank is None:
        encoders = {}
        for key, g in groups.items():
            names = g["sites"]
            absent = [n for n in names if n not in sites]
            if absent:
                raise ValueError(
                    f"{file}: the checkpoint puts prefixes in {len(names)} attention layers of group "
                    f"{key!r}, the model lacks {absent[:3]} (it has {len(sites)} attention modules); "
                    f"the layer count or architecture differs"
                )
            for n in names:
                s = sites[n]
                if (s.num_kv_heads, s.head_dim) != (g["num_kv_heads"], g["head_dim"]):
                    raise ValueError(
                        f"{file}: {n} has {s.num_kv_heads} key/value heads of dim {s.head_dim} in the model, "
                        f"the checkpoint has {g['num_kv_heads']} x {g['head_dim']}"
                    )
                if not s.routed:
                    raise ValueError(
                        f"{n} bypasses the attention registry; prefixes cannot be loaded into it"
                    )
            encoders[key] = PrefixEncoder(
                num_layers=g["num_layers"],
                num_kv_heads=g["num_kv_heads"],
                head_dim=g["head_dim"],
                num_prefix=g["num_prefix"],
                reparam_hidden=g["reparam_hidden"],
                embed_dim=g["embed_dim"],
                device=next(model.parameters()).device,
            )
        bank = PrefixBank({k: g["sites"] for k, g in groups.items()}, encoders, model_family(model))
        install_prefix_bank(model, bank)
    elif bank.config() != groups:
        raise ValueError(
            f"{file}: the model already has prefixes of another layout than the checkpoint "
            f"(model {bank.config()}, checkpoint {groups}); load into a model without prefixes"
        )
    params = {f"{group}.{k}": v for group, enc in bank.encoders.items() for k, v in enc.state_dict().items()}
    _load_exact("prefix", params, _read_tensors(file), file)


def _lora_from(
    model: nn.Module, modules: dict[str, dict], dropout: float, use_rslora: bool, file: Path
) -> None:
    existing = _lora_layers(model)
    if existing:
        if set(existing) != set(modules):
            raise ValueError(
                f"{file}: the model already has LoRA on {len(existing)} layers, the checkpoint on "
                f"{len(modules)} other ones; load into a model without LoRA"
            )
        return
    all_modules = dict(model.named_modules())
    absent = [n for n in modules if n not in all_modules]
    if absent:
        raise ValueError(
            f"{file}: the checkpoint has LoRA on modules the model lacks: {absent[:3]}; "
            f"the layer count or architecture differs"
        )
    by_setting: dict[tuple, list[str]] = {}
    for name, m in modules.items():
        by_setting.setdefault((m["r"], m["alpha"]), []).append(name)
    for (r, alpha), names in by_setting.items():
        regex = "|".join(re.escape(n) for n in names)
        apply_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=regex, use_rslora=use_rslora)


def _load_lora(model: nn.Module, directory: Path, info: dict | None) -> None:
    file = directory / LORA_WEIGHTS
    peft = _read_json(directory / PEFT_CONFIG_NAME)
    if peft.get("peft_type") != "LORA":
        raise ValueError(f"{directory / PEFT_CONFIG_NAME}: peft_type {peft.get('peft_type')!r} is not 'LORA'")
    saved = _read_tensors(file)
    names = sorted(
        {k[len("base_model.model.") : -len(".lora_A.weight")] for k in saved if k.endswith(".lora_A.weight")}
    )
    if not names or any(not k.startswith("base_model.model.") for k in saved):
        raise ValueError(
            f"{file}: expected PEFT LoRA keys 'base_model.model.<module>.lora_A.weight', "
            f"got {list(saved)[:3]}"
        )
    if info is not None:
        modules = info["modules"]
        if sorted(modules) != names:
            raise ValueError(f"{file}: its LoRA modules differ from those {CONFIG_NAME} lists")
    else:  # a PEFT checkpoint: ranks from the tensors, alphas from the config and its patterns
        modules = {}
        alpha_pattern = peft.get("alpha_pattern") or {}
        for n in names:
            r, in_features = saved[_peft_key(n, "lora_A")].shape
            alpha = next(
                (v for k, v in alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", n)), peft["lora_alpha"]
            )
            out_features = saved[_peft_key(n, "lora_B")].shape[0] if _peft_key(n, "lora_B") in saved else None
            modules[n] = {"r": r, "alpha": alpha, "in": in_features, "out": out_features}
        if (
            peft.get("use_dora")
            or peft.get("fan_in_fan_out")
            or peft.get("modules_to_save")
            or (peft.get("bias") or "none") != "none"
        ):
            raise ValueError(
                f"{directory / PEFT_CONFIG_NAME}: DoRA, fan_in_fan_out, modules_to_save and LoRA "
                f"biases are not supported"
            )
        info = {"dropout": peft.get("lora_dropout", 0.0), "use_rslora": bool(peft.get("use_rslora", False))}
        _check_peft_targets(model, peft, names, file)
    _check_lora_shapes(model, modules, file)
    _lora_from(model, modules, info["dropout"], info["use_rslora"], file)
    layers = _lora_layers(model)
    params = {}
    for n in names:
        params[_peft_key(n, "lora_A")] = layers[n].lora_A.weight
        params[_peft_key(n, "lora_B")] = layers[n].lora_B.weight
    _load_exact("LoRA", params, saved, file)


def _load_adapter(model: nn.Module, info: dict, file: Path) -> None:
    spec = adapter_spec(model)
    keys = ("placement", "bottleneck", "activation", "scaling", "targets")
    if spec is None:
        apply_adapter(
            model,
            bottleneck=info["bottleneck"],
            placement=info["placement"],
            activation=info["activation"],
            scaling=info["scaling"],
            targets=info["targets"],
        )
        spec = adapter_spec(model)
    elif any(spec[k] != info[k] for k in keys):
        raise ValueError(f"{file}: the model already has adapters of another configuration ({spec})")
    if spec["layers"] != info["layers"]:
        raise ValueError(
            f"{file}: the checkpoint has adapters in {len(info['layers'])} layers, the model in "
            f"{len(spec['layers'])}; the layer count differs"
        )
    params = {
        f"{n}.{k}": v
        for n, m in model.named_modules()
        if isinstance(m, BottleneckAdapter)
        for k, v in m.state_dict().items()
    }
    _load_exact("adapter", params, _read_tensors(file), file)


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a :func:`save_adapters` directory (or a PEFT LoRA / prefix-tuning one) into ``model``.

    Missing structures are created first (prefixes, LoRA layers, adapters exactly as saved);
    existing ones must match. The base model must be of the saved family with the same
    attention layers and shapes, else a ``ValueError`` says what differs. Afterwards the base
    model is frozen and the loaded parameters are trainable. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike directory, got {type(path).__name__}")
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory written by save_adapters")
    family = model_family(model)
    if not (directory / CONFIG_NAME).exists():
        peft = _read_json(directory / PEFT_CONFIG_NAME)
        if peft.get("peft_type") == "PREFIX_TUNING":
            return import_peft_prefix(model, directory)
        _load_lora(model, directory, None)
        freeze_base(model)
        return model
    config = _read_json(directory / CONFIG_NAME)
    if config.get("format") != "ptpeft_adapters" or config.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{directory / CONFIG_NAME}: format {config.get('format')!r} version {config.get('version')!r} "
            f"is not 'ptpeft_adapters' version {' or '.join(map(str, READABLE_VERSIONS))}"
        )
    _check_family(family, config, directory / CONFIG_NAME)
    for name in config.get("files", []):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is listed in {CONFIG_NAME} but missing")
    # Structure first, before anything is added to the model: a refused load leaves it untouched.
    _check_sites(model, config, directory / CONFIG_NAME)
    if config.get("lora") is not None:
        peft_directory = _peft_directory(directory, config["lora"])
        _check_lora_shapes(model, config["lora"]["modules"], peft_directory / LORA_WEIGHTS)
    if config.get("prefix") is not None:
        _load_prefix(model, config["prefix"], directory / PREFIX_WEIGHTS)
    if config.get("lora") is not None:
        _load_lora(model, peft_directory, config["lora"])
    if config.get("adapter") is not None:
        _load_adapter(model, config["adapter"], directory / ADAPTER_WEIGHTS)
    freeze_base(model)
    return model


# ----------------------------------------------------------------------------- PEFT prefix tuning


def import_peft_prefix(
    model: nn.Module, source: str | os.PathLike | dict, targets: str = "language_model"
) -> nn.Module:
    """Turn a PEFT prefix-tuning checkpoint into this library's prefixes; returns ``model``.

    ``source`` is a PEFT checkpoint directory or its state dict (``{"prompt_embeddings": (P, L*2*H*D)}``).
    The embedding is read as PEFT lays out its ``past_key_values`` — (P, L, 2, H, D), key before
    value — and stored as plain (not reparameterised) prefixes of the targeted layers.

    Positions differ: PEFT feeds the prefix as a P-token KV cache, so the model's token
    positions (and RoPE angles) start at P; here prefixes sit outside the sequence and tokens
    keep positions 0..N-1. Logits therefore match PEFT's only for models without positional
    information in attention; the prefix values themselves are carried over exactly.
    """
    from .model_info import select_sites
    from .prefix import apply_prefix

    if isinstance(source, dict):
        state, where = source, "state dict"
    else:
        directory = Path(source)
        peft = _read_json(directory / PEFT_CONFIG_NAME)
        if peft.get("peft_type") != "PREFIX_TUNING":
            raise ValueError(
                f"{directory / PEFT_CONFIG_NAME}: peft_type {peft.get('peft_type')!r} is not 'PREFIX_TUNING'"
            )
        where = str(directory / LORA_WEIGHTS)
        state = _read_tensors(directory / LORA_WEIGHTS)
    emb = state.get("prompt_embeddings")
    if not isinstance(emb, Tensor) or emb.dim() != 2:
        raise ValueError(
            f"{where}: expected a 2-D 'prompt_embeddings' tensor (P, L*2*H*D), got {type(emb).__name__}"
        )
    sites = select_sites(model, targets)
    shapes = {(s.num_kv_heads, s.head_dim) for s in sites}
    if len(shapes) != 1:
        raise ValueError(
            f"targets={targets!r} covers attention layers of several shapes {shapes}; PEFT uses one"
        )
    hkv, head_dim = shapes.pop()
    num_prefix, width = emb.shape
    if width != len(sites) * 2 * hkv * head_dim:
        raise ValueError(
            f"{where}: prompt_embeddings width {width} != layers x 2 x Hkv x D = {len(sites)} x 2 x {hkv} x "
            f"{head_dim} of the model's {targets} attention; it was trained on another base model"
        )
    apply_prefix(model, num_prefix=num_prefix, reparam_hidden=None, targets=targets)
    bank = get_prefix_bank(model)
    (enc,) = bank.encoders.values()
    with torch.no_grad():
        value = emb.view(num_prefix, len(sites), 2, hkv, head_dim).permute(1, 2, 3, 0, 4)
        enc.prefix.copy_(value.to(enc.prefix.dtype))
    return model
