"""Options given together with ``--resume``: applied, or refused with the reason.

A resumed run continues with its saved ``config.json``. An option on the command line next
to ``--resume`` is one of three kinds:

* **applied**: it does not change what is computed (``--quiet``, ``--num-workers``,
  ``--threads``, ``--save-every``, ``--log-every``, the testing aids), or it is the way out
  of a stop the run cannot get past otherwise (``--skip-missing`` after an unreadable image:
  the training set shrinks, said loudly);
* **budget** (``--steps``, ``--epochs``, ``--stage1-fraction``, ``--stage{1,2}-steps``,
  ``--stage{1,2}-epochs``, ``--lr``, ``--stage{1,2}-lr``): the stage plan is recomputed; a
  stage that has started keeps its plan (its learning-rate schedule is a function of its
  step count), so the change is applied only where it touches stages not yet started, and
  refused otherwise;
* anything else that differs from ``config.json`` (model, data, method, batch, seed,
  evaluation settings, ...) would make the rest of the run another experiment: refused,
  naming every such option with the saved and the new value.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from .config import BUDGET_OPTIONS, PATH_OPTIONS, RunConfig, _stage_plan, absolute_path, build_parser

APPLIED = ("quiet", "num_workers", "threads", "save_every", "log_every", "fail_at_step", "kill_at_step")


def explicit_options(argv: list[str] | None) -> dict[str, Any]:
    """The options actually present in ``argv`` (by ``dest``), with their parsed values."""
    parser = build_parser()
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def first_open_stage(state: dict | None) -> int:
    """Index of the first stage whose training has not begun, from a checkpoint's state."""
    if state is None:
        return 0
    index, step, done = int(state["stage_index"]), int(state["stage_step"]), bool(state["stage_done"])
    return index + 1 if (done or step > 0) else index


def _saved_budget(cfg: RunConfig) -> dict[str, Any]:
    """The budget options the run was started with (older config.json files: read off the plan)."""
    saved = dict(cfg.extra.get("budget") or {})
    if not saved:
        saved = {k: None for k in BUDGET_OPTIONS}
        saved.update(steps=cfg.steps, epochs=cfg.epochs, stage1_fraction=cfg.stage1_fraction)
        if len(cfg.stages) == 1:
            saved["lr"] = cfg.stages[0].lr
        else:
            saved["stage1_lr"], saved["stage2_lr"] = cfg.stages[0].lr, cfg.stages[1].lr
    return saved


# Options that compete: giving one on --resume clears the saved other.
_RIVALS = {
    "steps": "epochs",
    "epochs": "steps",
    "stage1_steps": "stage1_epochs",
    "stage1_epochs": "stage1_steps",
    "stage2_steps": "stage2_epochs",
    "stage2_epochs": "stage2_steps",
}


def _new_plan(cfg: RunConfig, given: dict[str, Any], open_from: int) -> tuple[list, dict[str, Any]]:
    """The stage plan with the budget options ``given`` on top of the saved ones. The stages
    that have started keep their counts unless an option names them (``--stage1-steps``), so
    ``--steps`` then resizes only what is left (``--steps 20`` after a 5-step stage 1: stage 2
    gets 15)."""
    budget = _saved_budget(cfg)
    for k in given:
        if k in _RIVALS:
            budget[_RIVALS[k]] = None
    if cfg.method.startswith("pt-"):
        for i in range(min(open_from, len(cfg.stages))):
            names = (f"stage{i + 1}_steps", f"stage{i + 1}_epochs")
            if not any(n in given for n in names):
                budget[names[0]], budget[names[1]] = cfg.stages[i].steps, cfg.stages[i].epochs
    budget.update({k: v for k, v in given.items() if k in BUDGET_OPTIONS})
    if budget.get("steps") is not None and budget.get("epochs") is not None:
        raise ValueError("--resume: give --steps or --epochs, not both")
    ns = argparse.Namespace(method=cfg.method, **{k: budget.get(k) for k in BUDGET_OPTIONS})
    if ns.stage1_fraction is None:
        ns.stage1_fraction = cfg.stage1_fraction
    return _stage_plan(ns), budget


def apply_resume_options(cfg: RunConfig, given: dict[str, Any], state: dict | None) -> list[str]:
    """Apply the options given with ``--resume`` to ``cfg`` (in place); returns one note per
    change, or raises ``ValueError`` naming every option that cannot change now.

    ``state``: the latest checkpoint's ``state.json`` (``None``: no checkpoint yet)."""
    given = {k: v for k, v in given.items() if k != "resume"}
    notes: list[str] = []
    conflicts: list[str] = []
    saved = cfg.to_json()
    for dest, value in sorted(given.items()):
        if dest in APPLIED:
            if getattr(cfg, dest) != value:
                setattr(cfg, dest, value)
                if dest not in ("fail_at_step", "kill_at_step", "quiet"):
                    notes.append(f"{_flag(dest)} {value} (was {saved[dest]})")
        elif dest == "skip_missing":
            if value and not cfg.skip_missing:
                cfg.skip_missing = True
                notes.append(
                    "--skip-missing: records with missing or unreadable images are dropped from now on; if "
                    "any are, the training set (and so the example order) differs from the one the run "
                    "started with"
                )
        elif dest in BUDGET_OPTIONS:
            continue
        elif dest in saved:
            new = absolute_path(value) if dest in PATH_OPTIONS and value is not None else value
            old = saved[dest]
            if dest in PATH_OPTIONS and old is not None:
                old = absolute_path(old)
            if new != old:
                conflicts.append(f"{_flag(dest)} {value!r} (the run has {saved[dest]!r})")
        else:  # an option that only shapes resolved fields (e.g. --max-new-tokens is stored resolved)
            conflicts.append(f"{_flag(dest)} {value!r} (not changeable on --resume)")
    if any(k in given for k in BUDGET_OPTIONS):
        open_from = first_open_stage(state)
        plan, budget = _new_plan(cfg, given, open_from)
        for i, (old, new) in enumerate(zip(cfg.stages, plan, strict=True)):
            if asdict(old) == asdict(new):
                continue
            if i < open_from:
                assert state is not None  # open_from > 0 only with a checkpoint
                index = int(state["stage_index"])
                done = i < index or bool(state["stage_done"])
                where = "is complete" if done else f"is in progress (step {state['stage_step']})"
                conflicts.append(
                    f"{' '.join(_flag(k) + ' ' + str(given[k]) for k in given if k in BUDGET_OPTIONS)} would "
                    f"change stage {old.name}, which {where}: steps {old.steps} -> {new.steps}, epochs "
                    f"{old.epochs} -> {new.epochs}, lr {old.lr:g} -> {new.lr:g} (its learning-rate schedule "
                    "is fixed when it starts)"
                )
            else:
                notes.append(
                    f"stage {new.name}: steps {old.steps} -> {new.steps}, epochs {old.epochs} -> "
                    f"{new.epochs}, lr {old.lr:g} -> {new.lr:g} (not started yet)"
                )
        if not conflicts:
            cfg.stages = plan
            cfg.steps, cfg.epochs = budget.get("steps"), budget.get("epochs")
            cfg.stage1_fraction = budget.get("stage1_fraction") or cfg.stage1_fraction
            cfg.extra = {**cfg.extra, "budget": budget}
    if conflicts:
        raise ValueError(
            "--resume: these options differ from the run's config.json and cannot change now: "
            + "; ".join(conflicts)
            + ". Resume without them, or start a new run (another --output-dir) to use them"
        )
    return notes
