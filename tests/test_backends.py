"""The backend registry: names, the environment variable, availability and fallback."""

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels import backends


def test_torch_is_always_available_and_listed_in_preference_order():
    names = pk.available_backends()
    assert names[-1] == "torch"
    assert names == [b for b in ("cuda", "triton", "torch") if b in names]


def test_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = backends._machine_reason("triton")
    if torch.cuda.is_available():
        assert reason is None or "not installed" in reason
    else:
        assert reason is not None and "TRITON_INTERPRET" in reason
        assert "triton" not in pk.available_backends()


def test_environment_variable_selects_the_backend_unless_the_caller_chose(monkeypatch):
    monkeypatch.setenv("PTPEFT_BACKEND", "triton")
    assert backends.requested_backend(None) == "triton"
    assert backends.requested_backend("auto") == "triton"
    assert backends.requested_backend("torch") == "torch"
    monkeypatch.setenv("PTPEFT_BACKEND", "fast")
    with pytest.raises(ValueError, match="PTPEFT_BACKEND must be one of"):
        backends.requested_backend("auto")
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="PTPEFT_BACKEND must be one of"):
        pk.prefix_attention(q, q, q)
    monkeypatch.delenv("PTPEFT_BACKEND")
    assert backends.requested_backend(None) == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without CUDA")
def test_layers_follow_the_environment_variable(monkeypatch):
    layer = pk.LoRALinear(torch.nn.Linear(4, 4), r=2)
    monkeypatch.setenv("PTPEFT_BACKEND", "cuda")
    with pytest.raises(pk.BackendUnavailableError, match="backend='cuda' cannot run lora_linear"):
        layer(torch.randn(2, 4))


def test_auto_uses_torch_for_cpu_tensors():
    q = torch.randn(1, 2, 3, 8)
    assert backends.resolve("prefix_attention", "auto", q, q, q) == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without CUDA")
def test_explicit_cuda_backend_raises_on_a_machine_without_it():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(pk.BackendUnavailableError, match="backend='cuda' cannot run prefix_attention"):
        pk.prefix_attention(q, q, q, backend="cuda")


def test_unknown_kind_and_backend_names_raise():
    with pytest.raises(pk.BackendUnavailableError, match="no nonsense implementation"):
        backends.get_impl("lora_linear", "torch", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.register("lora_linear", "auto")
