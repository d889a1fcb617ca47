"""The transformers releases the package supports (``>=5.17,<6``; the GPU image runs 5.17, CI the newest).

Names transformers added after 5.17 must not be called directly: the GPU image would fail where CI passes.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest

from ptpeft_kernels.integrations.hf_trainer import checkpointing_argument

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Arguments517:
    """The fields of transformers 5.17-5.22's ``TrainingArguments`` that matter here (no
    ``activation_checkpointing``: 5.23 added it and made ``gradient_checkpointing`` its deprecated alias)."""

    output_dir: str | None = None
    gradient_checkpointing: bool = False


def test_checkpointing_argument_names_the_field_each_release_knows(tmp_path):
    assert checkpointing_argument(True, Arguments517) == {"gradient_checkpointing": True}
    assert Arguments517(**checkpointing_argument(True, Arguments517)).gradient_checkpointing is True
    from transformers import TrainingArguments

    for enabled in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # 5.23+ warns for the deprecated name
            args = TrainingArguments(
                output_dir=str(tmp_path), use_cpu=True, report_to="none", **checkpointing_argument(enabled)
            )
        # 5.23+ mirrors the new field into the old one, so both releases answer through this name
        assert args.gradient_checkpointing is enabled


def test_checkpointing_argument_refuses_bad_input():
    with pytest.raises(TypeError, match="enabled must be a bool, got int 1"):
        checkpointing_argument(1)

    @dataclasses.dataclass
    class NotArguments:
        lr: float = 0.1

    with pytest.raises(TypeError, match="NotArguments has neither"):
        checkpointing_argument(True, NotArguments)


# transformers API newer than 5.17 (release that added it): use it only behind a version check.
NEWER_THAN_517 = {
    r"\bactivation_checkpointing\s*=": "5.23 (TrainingArguments field): use checkpointing_argument()",
    r"\.is_activation_checkpointing\b": "5.23 (PreTrainedModel property)",
    r"\.activation_checkpointing_(enable|disable)\(": "5.23 (PreTrainedModel methods)",
}


def test_no_code_calls_transformers_api_newer_than_5_17():
    this = Path(__file__).resolve()
    found = []
    for folder in ("ptpeft_kernels", "python", "benchmarks", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.resolve() == this:
                continue
            text = path.read_text()
            for pattern, since in NEWER_THAN_517.items():
                for match in re.finditer(pattern, text):
                    line = text.count("\n", 0, match.start()) + 1
                    where = f"{path.relative_to(REPO)}:{line}"
                    found.append(f"{where}: {match.group(0)!r} is transformers {since}")
    assert not found, "\n".join(found)
