"""Options: --help explains every one, resolution fixes the stage plan, bad combinations are named."""

import pytest

from ptpeft_kernels.train.config import DEFAULT_LR, METHODS, build_parser, parse_args, resolve


def test_help_explains_every_option(capsys):
    parser = build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 10, f"{action.option_strings} has no help"
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for action in parser._actions:
        for opt in action.option_strings:
            assert opt in out


@pytest.mark.parametrize(
    "flag, value, valid", [("--method", "qlora", METHODS), ("--task", "nlvr", ("caption", "vqa"))]
)
def test_unknown_method_or_task_lists_the_valid_ones(capsys, flag, value, valid):
    with pytest.raises(SystemExit) as e:
        parse_args([flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert value in err and all(v in err for v in valid)


def test_equal_budgets_and_stage_plans():
    budgets = {}
    for m in METHODS:
        cfg = resolve(parse_args(["--method", m, "--steps", "101"]))
        budgets[m] = sum(s.steps for s in cfg.stages)
        if m.startswith("pt-"):
            s1, s2 = cfg.stages
            assert (s1.kind, s2.kind) == ("prefix", m[3:])
            assert s1.train_prefix and s2.train_prefix  # stage 2 keeps training the prefixes
            assert s2.lr < DEFAULT_LR[m[3:]]  # stage 2 runs at a lower rate by default
        else:
            assert len(cfg.stages) == 1 and cfg.stages[0].kind == m
    assert set(budgets.values()) == {101}
    cfg = resolve(parse_args(["--steps", "10", "--stage1-steps", "3"]))
    assert [s.steps for s in cfg.stages] == [3, 7]
    cfg = resolve(parse_args(["--epochs", "2", "--stage1-fraction", "0.25"]))
    assert [s.epochs for s in cfg.stages] == [0.5, 1.5] and all(s.steps is None for s in cfg.stages)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--steps", "5", "--epochs", "1"], "--steps or --epochs"),
        (["--method", "lora", "--stage1-lr", "1e-3"], "--stage1-lr applies to pt-lora"),
        (["--method", "pt-lora", "--lr", "1e-3"], "--stage1-lr / --stage2-lr"),
        (["--batch-size", "6", "--grad-accum", "4"], "divisible by --grad-accum"),
        (["--model", "/x", "--captions", "c.json", "--image-dir", "d"], "--steps or --epochs"),
        (["--model", "/x", "--steps", "3"], "give --captions"),
        (["--task", "vqa", "--questions", "q.json"], "--questions and --annotations go together"),
        (["--captions", "c.json"], "--image-dir is required"),
        (["--prompt-template", "no placeholder"], "must contain {prompt}"),
        (["--task", "vqa", "--vqa-prompt", "answer:"], "must contain {question}"),
    ],
)
def test_bad_combinations_name_the_options(argv, match):
    with pytest.raises(ValueError, match=match):
        resolve(parse_args(argv))


def test_bad_values_are_cli_errors(capsys):
    for argv in (["--steps", "0"], ["--lr", "-1"], ["--stage1-fraction", "1"], ["--lora-dropout", "2"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert argv[0] in capsys.readouterr().err
