"""vllm-bipolar: arbitrary-precision (1-8 bit) bipolar-INT quantization for vLLM.

Layout of the package:
  format/        the bipolar-INT format in pure torch (spec, packing, quantization, reference matmul)
  kernels/       kernel backends (CUDA kernels from csrc/, pure-torch reference) and their chooser
  ops.py         torch custom ops (with fake implementations) the backends call
  config.py      BipolarConfig, vLLM's QuantizationConfig for "bipolar"
  linear_method.py  BipolarLinearMethod: parameters, tensor-parallel sharding, dispatch

vLLM calls ``register()`` through the ``vllm.general_plugins`` entry point in every process it
starts; importing this package does not import vLLM.
"""

__version__ = "0.1.0"


def register() -> None:
    """Register the "bipolar" quantization method with vLLM (idempotent)."""
    from vllm.model_executor.layers import linear
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from .config import BipolarConfig
    from .format.spec import QUANT_METHOD
    from .linear_method import BipolarLinearMethod

    if QUANT_METHOD not in QUANTIZATION_METHODS:  # vLLM calls register() in every process it starts
        register_quantization_config(QUANT_METHOD)(BipolarConfig)
    # Layers only use the parameter classes' own loaders (weight_loader_v2) for listed methods.
    if BipolarLinearMethod.__name__ not in linear.WEIGHT_LOADER_V2_SUPPORTED:
        linear.WEIGHT_LOADER_V2_SUPPORTED.append(BipolarLinearMethod.__name__)

