"""On a GPU the op tests launch each Triton shape class's default config (``PTPEFT_AUTOTUNE=0``):
autotuning every test shape would compile and time every config of every class, while the
every-config tests (``test_every_*_tile_config_is_correct*``) force each config once. An explicit
``PTPEFT_AUTOTUNE`` in the environment wins. No effect under the CPU interpreter (fixed tiles)."""

import os

import pytest


@pytest.fixture(autouse=True)
def _pinned_triton_configs(monkeypatch):
    if "PTPEFT_AUTOTUNE" not in os.environ:
        monkeypatch.setenv("PTPEFT_AUTOTUNE", "0")
