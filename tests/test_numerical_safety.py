"""Numerical safety: large activations (1e4), all-zero tokens, all-equal tokens and an empty batch through every
kernel backend that can run here give finite results equal to the float64 reference; the
activation quantizer handles an all-zero token.

The backends are driven through their own interface (``can_implement``,
``process_weights_after_loading``, ``apply_weights``), as the linear method does, so the same
cases run on the pure-torch backend (CPU, and CUDA without the extension) and on every CUDA
kernel of ``csrc/`` when the extension is built (skipped cleanly otherwise).
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_kernel_ops

from vllm_bipolar.format import (
    dequantize_packed,
    fake_quantize_activations,
    max_level,
    pack_codes,
    quantize_activations,
    quantize_weight,
)
from vllm_bipolar.kernels import KERNELS, BipolarLayerConfig

CUDA = torch.cuda.is_available()
OPS, WHY = load_kernel_ops("quantize_activations") if CUDA else (None, "no CUDA device")

N, K = 96, 512
# Relative to sum_k |x_k| |w_nk| (the size of the summands): what the dtype's rounding can explain.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def make_layer(w_bits, a_bits, group_size, symmetric, dtype, device, gen):
    scale = 0.004 if dtype == torch.float16 else 0.02  # so that 1e4 activations keep the true result < 65504
    w = (torch.randn(N, K, generator=gen) + torch.randn(N, 1, generator=gen) * 0.05) * scale
    q = quantize_weight(w, w_bits, group_size, symmetric, "rtn", dtype=dtype)
    layer = torch.nn.Module()
    for name, t in (("qweight", pack_codes(q.codes, w_bits)), ("scales", q.scales), ("zeros", q.zeros)):
        if t is None:
            layer.zeros = None
        else:
            layer.register_parameter(name, torch.nn.Parameter(t.to(device), requires_grad=False))
    cfg = BipolarLayerConfig(n=N, k=K, w_bits=w_bits, a_bits=a_bits, group_size=group_size, symmetric=symmetric,
                             act_dtype=dtype)
    layer.bipolar_config = cfg
    w64 = dequantize_packed(layer.qweight.cpu(), layer.scales.cpu(), None if layer.zeros is None else layer.zeros.cpu(),
                            K, group_size, torch.float64)
    return layer, cfg, w64


def hard_inputs(dtype, gen) -> dict[str, torch.Tensor]:
    """Token rows that stress a kernel: huge, zero, all-equal, mixed with ordinary ones."""
    rand = torch.randn(4, K, generator=gen)
    cases = {
        "large-1e4": rand * 1e4,
        "all-zero": torch.zeros(3, K),
        "all-equal": torch.stack([torch.full((K,), v) for v in (1e4, -3.0, 0.5)]),
        "mixed-rows": torch.cat([torch.zeros(1, K), torch.full((1, K), 1e4), rand[:2], torch.full((1, K), -7.0)]),
        "one-outlier": rand.clone().index_put_((torch.tensor([0]), torch.tensor([17])), torch.tensor(1e4)),
        "single-token-large": rand[:1] * 1e4,
        "no-tokens": torch.zeros(0, K),  # an empty batch must not launch an invalid (zero-size) kernel grid
    }
    return {k: v.to(dtype) for k, v in cases.items()}


def reference(x: torch.Tensor, w64: torch.Tensor, a_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 product (activations fake-quantized per token when a_bits < 16) and the summand scale."""
    if a_bits != 16:
        codes, s = quantize_activations(x.cpu(), a_bits)  # the definition (fp32 scale per token)
        xr = (codes.double() * 2 - max_level(a_bits)) * s.double()[:, None]
    else:
        xr = x.cpu().double()
    return xr @ w64.T, xr.abs() @ w64.abs().T


DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
CASES = [  # (w_bits, a_bits, group_size, symmetric)
    (4, 16, 128, False), (2, 16, -1, True), (3, 8, 128, False), (2, 4, -1, False), (1, 2, 256, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("w_bits,a_bits,group_size,symmetric", CASES)
def test_every_backend_on_hard_inputs(device, dtype, w_bits, a_bits, group_size, symmetric):
    ran = []
    for kern in KERNELS:
        # a fresh layer per backend (process_weights_after_loading repacks it), the same weights
        layer, cfg, w64 = make_layer(w_bits, a_bits, group_size, symmetric, dtype, device,
                                     torch.Generator().manual_seed(1000 * w_bits + a_bits))
        if not kern.can_implement(cfg, torch.device(device))[0]:
            continue
        backend = kern(cfg)
        backend.process_weights_after_loading(layer)
        for name, x in hard_inputs(dtype, torch.Generator().manual_seed(7)).items():
            x = x.to(device)
            y = backend.apply_weights(layer, x)
            where = f"{kern.name} {cfg.describe()} on {device}, input {name}"
            assert y.shape == (x.shape[0], N) and y.dtype == dtype, where
            assert torch.isfinite(y).all(), f"{where}: non-finite output"
            ref, size = reference(x, w64, a_bits)
            assert ref.numel() == 0 or ref.abs().max() < torch.finfo(dtype).max / 2, "test input overflows the dtype"
            err = (y.cpu().double() - ref).abs()
            bound = TOL[dtype] * size + 1e-30
            if a_bits != 16:  # a kernel's own activation rounding may flip a code at a .5 tie (2 steps allowed)
                sx = quantize_activations(x.cpu(), a_bits)[1].double()
                bound = bound + 2 * (2 * sx[:, None]) * w64.abs().max(1).values[None]
            assert torch.all(err <= bound), f"{where}: max error {(err - bound).max().item():.3g} over the bound"
            if name == "all-zero":
                assert torch.all(y == 0), f"{where}: an all-zero token must give exactly 0"
        ran.append(kern.name)
    assert "torch" in ran or device == "cuda", ran


def test_activation_quantizer_all_zero_and_equal_tokens():
    x = torch.zeros(3, 300)
    x[1] = 5.0
    x[2, :7] = -1e4
    for bits in range(1, 9):
        codes, s = quantize_activations(x, bits)
        assert s[0] == 0 and torch.isfinite(s).all()
        assert torch.all(fake_quantize_activations(x, bits)[0] == 0)
        assert torch.all(codes[1] == 2**bits - 1)  # all-equal: every value on the top grid point
        # equal values come back (to the fp32 rounding of amax * (1/L) * L)
        torch.testing.assert_close(fake_quantize_activations(x, bits)[1], x[1], rtol=1e-6, atol=0)
        torch.testing.assert_close(fake_quantize_activations(x, bits)[2, :7], x[2, :7], rtol=1e-6, atol=0)


@pytest.mark.skipif(OPS is None, reason=WHY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_cuda_activation_quantizer_zero_token(dtype, bits):
    x = torch.zeros(4, 1024, dtype=dtype, device="cuda")
    x[1] = 3.0
    x[2] = torch.randn(1024, device="cuda").to(dtype) * 1e4
    planes, sx = OPS.quantize_activations(x, bits)
    assert torch.isfinite(sx).all() and sx[0] == 0 and sx[3] == 0
    codes_ref, s_ref = quantize_activations(x.cpu(), bits)
    assert torch.equal(sx.cpu(), s_ref), (sx, s_ref)
    assert torch.equal(planes.cpu(), pack_codes(codes_ref, bits))


@pytest.mark.parametrize("w_bits,a_bits,group_size,symmetric", CASES)
def test_torch_dense_equals_torch_backend(w_bits, a_bits, group_size, symmetric, monkeypatch):
    """torch_dense (dequantized once at load) gives the torch backend's outputs bit for bit with
    torch.nn.functional.linear, and within bf16 rounding of them through vLLM's CPU GEMM (where vLLM is
    installed); it holds no bit planes, and is chosen only when forced."""
    from vllm_bipolar.kernels import choose_kernel, torch_dense
    from vllm_bipolar.kernels.torch_dense import TorchDenseKernel
    from vllm_bipolar.kernels.torch_reference import TorchReferenceKernel

    seed = torch.seed()
    x = torch.randn(5, 3, K, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)

    def run(kern, vllm_gemm=True):
        layer, cfg, _ = make_layer(w_bits, a_bits, group_size, symmetric, torch.bfloat16, "cpu",
                                   torch.Generator().manual_seed(seed))
        with monkeypatch.context() as mp:
            if not vllm_gemm:
                mp.setattr(torch_dense, "vllm_cpu_linear", lambda layer: None)
            kern(cfg).process_weights_after_loading(layer)
        return layer, cfg, kern(cfg).apply_weights(layer, x, bias)

    _, cfg, ref = run(TorchReferenceKernel)
    layer, _, y = run(TorchDenseKernel, vllm_gemm=False)
    assert layer.qweight is None and layer.scales is None and layer.zeros is None
    assert layer.weight.shape == (N, K) and layer.weight.dtype == torch.bfloat16 and layer.bipolar_dense_linear is None
    assert y.shape == (5, 3, N) and torch.equal(y, ref)
    layer, _, y = run(TorchDenseKernel)
    if layer.bipolar_dense_linear is not None:  # vLLM's CPU platform: its prepacked GEMM
        assert y.shape == (5, 3, N) and y.dtype == torch.bfloat16
        assert ((y.double() - ref.double()).abs() <= 2 ** -6 * ref.double().abs() + 1e-2 * ref.double().abs().max()).all()
        assert TorchDenseKernel(cfg).apply_weights(layer, x[:0], bias).shape == (0, 3, N)  # empty batch
    monkeypatch.delenv("VLLM_BIPOLAR_KERNEL", raising=False)
    assert choose_kernel(cfg, torch.device("cpu")) is TorchReferenceKernel
    monkeypatch.setenv("VLLM_BIPOLAR_KERNEL", "torch_dense")
    assert choose_kernel(cfg, torch.device("cpu")) is TorchDenseKernel
