"""onnxruntime dynamic int8 (weights int8 per output channel, activations uint8 per tensor, on
the fly) of every MatMul/Gemm in the given graphs.
    venv/bin/python quantize_ort.py SRC_DIR DST_DIR name.onnx ...
"""
import os, shutil, sys, time
from onnxruntime.quantization import QuantType, quantize_dynamic

src, dst, names = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(dst, exist_ok=True)
for n in names:
    t = time.time()
    quantize_dynamic(os.path.join(src, n), os.path.join(dst, n), weight_type=QuantType.QInt8,
                     per_channel=True, op_types_to_quantize=["MatMul", "Gemm"])
    print(f"{n}: {os.path.getsize(os.path.join(dst, n)) / 2**20:.0f} MB in {time.time() - t:.0f} s", flush=True)
