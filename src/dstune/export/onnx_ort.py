"""int4 by onnxruntime's own weight-only quantizer (`MatMulNBitsQuantizer`), for comparison with dstune's schemes.

The builder writes the fp32 graph, then onnxruntime quantizes every MatMul to 4-bit MatMulNBits (blocks of 16,
asymmetric, int8 activations in the kernel) with one of its data-free algorithms:
- hqq: Half-Quadratic Quantization (Badri & Shaji 2023), which fits each block's scale and zero point to a
  sparsity-promoting error norm. onnxruntime stores the zero points as floats (4 bytes per block).
- k_quant: llama.cpp's k-quant rounding (a weighted least-squares fit of scale and minimum per block).
Neither quantizes the embedding Gather (HQQ refuses it), so the table stays fp32: these rows are larger than the
builder's int4 and are measured, not offered by `--quant int4`. Its GPTQ needs every graph input from a calibration
reader and re-rounds GPTQ's result with min/max RTN onto its own grid (docs/deploy.md), so it is not wrapped here.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

ALGORITHMS = {"int4-ort-hqq": "hqq", "int4-ort-kquant": "k_quant"}
BLOCK_SIZE = 16


def ort_quantize(folder: Path, quant: str, log) -> dict:
    """Quantize folder/model.onnx (the builder's fp32 graph) in place with onnxruntime's algorithm for `quant`."""
    import onnx

    from .onnx import _logging_to

    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), _logging_to(log):
        from onnxruntime.quantization.matmul_nbits_quantizer import (HQQWeightOnlyQuantConfig,
                                                                       KQuantWeightOnlyQuantConfig,
                                                                       MatMulNBitsQuantizer)

        algorithm = ALGORITHMS[quant]
        config = (HQQWeightOnlyQuantConfig(block_size=BLOCK_SIZE, bits=4, op_types_to_quantize=("MatMul",))
                  if algorithm == "hqq" else KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",)))
        path = folder / "model.onnx"
        quantizer = MatMulNBitsQuantizer(onnx.load(path), bits=4, block_size=BLOCK_SIZE, is_symmetric=False,
                                         accuracy_level=4, op_types_to_quantize=("MatMul",), algo_config=config)
        quantizer.process()
    # The weights are in memory now: the old files can go before the new ones are written.
    for name in ("model.onnx", "model.onnx.data"):
        (folder / name).unlink(missing_ok=True)
    onnx.save_model(quantizer.model.model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return {"quantizer": "onnxruntime MatMulNBitsQuantizer", "algorithm": algorithm, "block_size": BLOCK_SIZE,
            "symmetric": False, "accuracy_level": 4, "op_types": ["MatMul"]}
