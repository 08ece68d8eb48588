"""The plugin's run-time input transform (quantization_config online_hadamard) in vLLM's own
RowParallelLinear (CPU, no engine; tensor parallelism simulated as in test_tp_loading.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from test_tp_loading import (  # noqa: F401
    _one_thread,
    _registered,
    _torch_kernel,
    gen,
    load_module,
    make_module,
    run_forward,
    set_tp,
)
from vllm.model_executor.layers.linear import RowParallelLinear

from vllm_bipolar.config import BipolarConfig
from vllm_bipolar.format.transforms import hadamard_matrix
from vllm_bipolar.linear_method import BipolarShardError

HIDDEN, DOWN_IN, TOKENS = 64, 768, 5  # hadamard_block(768) = 256
PREFIX = "model.layers.0.mlp.down_proj"


def _config(online):
    return BipolarConfig.from_config({"quant_method": "bipolar", "format_version": 1, "w_bits": 4, "a_bits": 16,
                                      "group_size": 128, "symmetric": False, "online_hadamard": online})


@pytest.mark.parametrize("tp", [1, 3])
@pytest.mark.parametrize("online", [["down_proj"], []])
def test_row_parallel_applies_block_hadamard(tp, online, gen, set_tp):  # noqa: F811 - fixtures
    down = make_module(HIDDEN, DOWN_IN, 4, 128, False, torch.float32, gen)
    x = torch.randn(TOKENS, DOWN_IN, generator=gen)
    h = hadamard_matrix(256)
    xh = (x.double().view(TOKENS, 3, 256) @ h).view(TOKENS, DOWN_IN) if online else x.double()
    k_part = DOWN_IN // tp
    total = torch.zeros(TOKENS, HIDDEN, dtype=torch.float64)
    for rank in range(tp):
        set_tp(rank, tp)
        layer = RowParallelLinear(DOWN_IN, HIDDEN, bias=False, params_dtype=torch.float32, reduce_results=False,
                                  quant_config=_config(online), prefix=PREFIX)
        load_module(layer, down)
        total += run_forward(layer, x[:, rank * k_part:(rank + 1) * k_part]).double()
    ref = xh @ down.dense.T
    assert ((total - ref).norm() / ref.norm()).item() < 1e-5


def test_shard_splitting_a_hadamard_block_is_refused(set_tp):  # noqa: F811 - fixture
    set_tp(0, 2)  # K/tp = 384 is not a multiple of the 256-channel blocks
    with pytest.raises(BipolarShardError, match=r"down_proj: the online Hadamard transform works on blocks of 256"):
        RowParallelLinear(DOWN_IN, HIDDEN, bias=False, params_dtype=torch.float32, reduce_results=False,
                          quant_config=_config(["down_proj"]), prefix=PREFIX)
