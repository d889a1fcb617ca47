"""The first-use guard (ptpeft_kernels.verify): a kernel that is wrong on this device is caught on its
first call, warned about once, and its case runs on the torch backend with the torch result.

On the CPU the Triton kernels run interpreted; ``PTPEFT_VERIFY=all`` makes the guard check them
there (by default it checks only unvalidated GPU architectures)."""

import warnings

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels import _env, backends, verify
from ptpeft_kernels.ops import _probes

from .helpers import DEVICE

pytestmark = pytest.mark.triton
OP = "prefix_attention"


@pytest.fixture
def guard(monkeypatch):
    monkeypatch.setenv("PTPEFT_VERIFY", "all")
    backends._load("triton")
    verify.reset()
    yield
    verify.reset()


def _swap(monkeypatch, op: str, kind: str, fn) -> None:
    """Register ``fn`` as the triton backend's ``kind`` of ``op`` for this test."""
    monkeypatch.setitem(backends._REGISTRY[op]["triton"], kind, backends._Impl(fn, None))


def _attention_inputs(dtype=torch.float32, requires_grad=True):
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_(requires_grad)

    return rnd(1, 2, 20, 16), rnd(1, 2, 24, 16), rnd(1, 2, 24, 16), rnd(2, 3, 16), rnd(2, 3, 16)


def _run(inputs, backend):
    """Output and the five gradients of prefix_attention on fresh leaves of ``inputs``."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = pk.prefix_attention(*leaves, backend=backend)
    out.backward(torch.ones_like(out))
    return [out.detach(), *(t.grad for t in leaves)]


def _guard_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, verify.KernelVerificationWarning)]


def test_a_wrong_triton_kernel_is_caught_warned_once_and_routed_to_torch(guard, monkeypatch):
    real = backends.get_impl(OP, "triton")
    calls = []

    def drops_the_prefix(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale):  # a plausible kernel bug
        calls.append(q.shape)
        return real(q, k, v, None, None, attn_mask, causal, scale)

    _swap(monkeypatch, OP, "forward", drops_the_prefix)
    inputs = _attention_inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = [_run(inputs, "triton") for _ in range(2)]
    messages = _guard_warnings(record)
    assert len(messages) == 1, messages
    assert "the triton kernel of prefix_attention disagrees" in messages[0]
    assert "output: relative error" in messages[0] and "now runs on the torch" in messages[0]
    assert len(calls) == 1  # the probe's; the caller's two calls never reached the wrong kernel
    want = _run(inputs, "torch")
    for attempt in got:
        for name, a, b in zip(["out", "dq", "dk", "dv", "dpk", "dpv"], attempt, want, strict=True):
            assert torch.equal(a, b), name
    (verdict,) = verify.verdicts()
    assert not verdict.ok and verdict.checked == {"forward", "backward"}
    assert verdict.arch == verify.arch_of(torch.device(DEVICE))


def test_with_the_guard_off_the_wrong_kernel_runs(monkeypatch):
    monkeypatch.setenv("PTPEFT_VERIFY", "0")
    backends._load("triton")
    torch_forward = backends.get_impl(OP, "torch")
    _swap(monkeypatch, OP, "forward", lambda *a: tuple(t * 1.5 for t in torch_forward(*a)))
    inputs = _attention_inputs(requires_grad=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = pk.prefix_attention(*inputs, backend="triton")
    assert not _guard_warnings(record)
    torch.testing.assert_close(out, 1.5 * pk.prefix_attention(*inputs, backend="torch"))


def test_a_wrong_backward_is_checked_at_the_first_call_that_needs_it(guard, monkeypatch):
    torch_forward, torch_backward = backends.get_impl(OP, "torch"), backends.get_impl(OP, "torch", "backward")
    _swap(monkeypatch, OP, "forward", torch_forward)  # a correct forward ...

    def doubles_dq(*args):  # ... and a backward whose dq is twice too large
        dq, *rest = torch_backward(*args)
        return (2 * dq, *rest)

    _swap(monkeypatch, OP, "backward", doubles_dq)
    inference = _attention_inputs(requires_grad=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = pk.prefix_attention(*inference, backend="triton")  # no grad: only the forward is checked
        assert not _guard_warnings(record) and verify.verdicts()[0].checked == {"forward"}
        got = _run(_attention_inputs(), "triton")
    messages = _guard_warnings(record)
    assert len(messages) == 1 and "dq: relative error" in messages[0]
    assert torch.equal(out, pk.prefix_attention(*inference, backend="torch"))
    for a, b in zip(got, _run(_attention_inputs(), "torch"), strict=True):
        assert torch.equal(a, b)


def test_a_forward_only_backend_is_not_failed_for_lacking_a_backward(guard, monkeypatch):
    _swap(monkeypatch, OP, "forward", backends.get_impl(OP, "torch"))
    monkeypatch.delitem(backends._REGISTRY[OP]["triton"], "backward")  # like the CUDA decode kernel
    inputs = _attention_inputs()  # parameters that require grad, used under no_grad (generation)
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        out = pk.prefix_attention(*inputs, backend="triton")
    assert not _guard_warnings(record)
    (verdict,) = verify.verdicts()
    assert verdict.ok and verdict.checked == {"forward"}
    assert torch.equal(out, pk.prefix_attention(*inputs, backend="torch"))


def test_a_kernel_that_raises_is_routed_to_torch_through_the_custom_op_too(guard, monkeypatch):
    def out_of_resources(*args):
        raise RuntimeError("out of resource: shared memory, required 229888, hardware limit 166912")

    _swap(monkeypatch, OP, "forward", out_of_resources)
    q, k, v, pk_, pv_ = _attention_inputs(requires_grad=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # The torch.library custom op (what torch.compile calls) runs the same guarded implementation.
        out, _ = torch.ops.ptpeft.prefix_attention(q, k, v, pk_, pv_, None, True, 0.25, "triton")
    (message,) = _guard_warnings(record)
    assert "the probe raised RuntimeError: out of resource: shared memory" in message
    assert torch.equal(out, pk.prefix_attention(q, k, v, pk_, pv_, scale=0.25, backend="torch"))


def _adapter_call(dtype):
    gen = torch.Generator().manual_seed(1)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(DEVICE, dtype).requires_grad_()

    return (rnd(2, 5, 24), rnd(6, 24, std=0.2), rnd(6), rnd(24, 6, std=0.4), rnd(24)), {"activation": "silu"}


def _lora_call(dtype):
    gen = torch.Generator().manual_seed(2)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(DEVICE, dtype).requires_grad_()

    return (rnd(7, 24), rnd(20, 24, std=0.2), None, rnd(3, 24, std=0.2), rnd(20, 3, std=0.5), 2.0), {}


@pytest.mark.parametrize(
    "op,make,dtype,kwargs",
    [
        ("adapter", _adapter_call, torch.float32, {}),
        ("lora_linear", _lora_call, torch.bfloat16, {"dropout_p": 0.25}),  # the probe draws the kernel's mask
    ],
)
def test_a_correct_kernel_passes_once_and_leaves_the_result_and_the_rng_alone(
    guard, monkeypatch, op, make, dtype, kwargs
):
    fn = {"adapter": pk.adapter, "lora_linear": pk.lora_linear}[op]
    args, fixed = make(dtype)
    spec = _probes.PROBES[op]
    probes = []
    monkeypatch.setitem(
        _probes.PROBES,
        op,
        spec.__class__(spec.case, spec.needs_grad, lambda *a: probes.append(1) or spec.probe(*a)),
    )

    def call():
        torch.manual_seed(5)  # lora's dropout seed is drawn from the default generator
        out = fn(*args, **fixed, **kwargs, backend="triton")
        return [out, *torch.autograd.grad(out.sum(), [a for a in args if isinstance(a, torch.Tensor)])]

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        checked = [call() for _ in range(2)]
        rng_after = torch.get_rng_state()
    assert not _guard_warnings(record)
    assert probes == [1]  # one probe, forward and backward together, for both calls
    (verdict,) = verify.verdicts()
    assert verdict.ok and verdict.checked == {"forward", "backward"}, verdict.detail
    monkeypatch.setenv("PTPEFT_VERIFY", "0")
    unchecked = call()
    assert torch.equal(rng_after, torch.get_rng_state())  # the probe drew nothing from the caller's RNG
    for a, b in zip(checked[0], unchecked, strict=True):
        assert torch.equal(a, b)


def test_which_calls_the_default_mode_checks(monkeypatch):
    monkeypatch.setattr(verify, "_cuda_arch", lambda index: "sm_90")
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert verify._wanted("1", "triton", gpu) == (True, "sm_90")
    assert verify._wanted("1", "cuda", gpu) == (True, "sm_90")
    assert verify._wanted("1", "triton", cpu)[0] is False  # the interpreter: CI runs every kernel there
    assert verify._wanted("all", "triton", cpu) == (True, "cpu")
    assert verify._wanted("0", "triton", gpu)[0] is False
    assert verify._wanted("all", "torch", gpu)[0] is False  # the yardstick is never checked
    monkeypatch.setitem(verify.VALIDATED, ("triton", "sm_90"), "benchmarks/results/some-run/summary.md")
    assert verify._wanted("1", "triton", gpu)[0] is False
    assert verify._wanted("1", "cuda", gpu)[0] is True  # validated per backend
    assert verify._wanted("all", "triton", gpu)[0] is True


def test_environment_switches_reject_unknown_values(monkeypatch):
    monkeypatch.setenv("PTPEFT_VERIFY", "yes")
    with pytest.raises(ValueError, match=r"PTPEFT_VERIFY must be one of \('0', '1', 'all'\), got 'yes'"):
        _env.verify_mode()
    monkeypatch.setenv("PTPEFT_AUTOTUNE", "off")
    with pytest.raises(ValueError, match="PTPEFT_AUTOTUNE must be one of"):
        _env.autotune_enabled()
    monkeypatch.setenv("PTPEFT_AUTOTUNE", "0")
    assert _env.autotune_enabled() is False
    monkeypatch.delenv("PTPEFT_AUTOTUNE")
    monkeypatch.delenv("PTPEFT_VERIFY")
    assert _env.autotune_enabled() is True and _env.verify_mode() == "1"


def test_probe_shapes_keep_the_case_and_shrink_the_rest():
    q = torch.empty(4, 32, 2048, 128).transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, H, D) memory
    k = torch.empty(4, 8, 4096, 128)
    mask = torch.ones(4, 4096, dtype=torch.bool)
    call = (q, k, k, torch.empty(8, 32, 128), torch.empty(8, 32, 128), mask, True, 0.1)
    pq, pk_, _, ppk, _, pmask, causal, scale = _probes._attention_inputs(call)
    assert _probes._attention_case(*call) == _probes._attention_case(
        pq, pk_, pk_, ppk, ppk, pmask, causal, scale
    )
    assert pq.shape == (2, 8, 80, 128) and pk_.shape == (2, 2, 80 + 16, 128) and ppk.shape == (2, 16, 128)
    assert pq.stride(2) > pq.stride(1)  # the caller's (B, N, H, D) layout is kept
    assert _probes._small(2048, 80) % 16 == 0 and _probes._small(2047, 80) % 16 != 0
