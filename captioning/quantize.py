"""Inference precision: which mode a captioning run uses (--precision) and turning a loaded
fp32 model into it. Training's precision choice stays in devices.choose_precision; this
module reuses it for GPUs and adds the CPU modes.

    fp32  the model as trained
    bf16  weights in bfloat16 (on GPUs; on CPUs without native bf16 it is emulated and slow)
    fp16  GPUs older than Ampere only, picked by auto the way training picks it
    int8  dynamic quantization of every linear layer of encoder and decoder (CPU only):
          int8 weights with one scale per output channel, activations quantized per batch
          on the fly; oneDNN's kernel for the many-row layers, fbgemm's for the rest
"""

from .devices import choose_precision

INFERENCE_PRECISIONS = ("auto", "fp32", "bf16", "int8")

# What auto picks on a CPU, and why: the fastest mode that met the quality bar (>= 95% of
# test captions identical to fp32's and test CIDEr within 2%) on the demo-style tiny model.
# Set from bench/cpu.py (speed, full size) and
# tests/test_quantize.py::test_auto_mode_meets_the_quality_bar_on_the_demo_model (make
# check-demo, run by CI), which fails if this mode stops meeting the bar.
CPU_AUTO = "int8"
CPU_AUTO_REASON = ("int8 on a CPU: the fastest mode in bench/cpu.py that keeps >= 95% of the "
                   "demo model's test captions identical to fp32's (97%, CIDEr 0.999x); "
                   "--precision fp32 gives the exact captions")


def resolve_precision(requested, device_type, capability=None):
    """-> (mode, reason) for a captioning run on device_type; ValueError for a mode the device
    cannot run."""
    if requested == "auto":
        if device_type == "cuda":
            mode = choose_precision("auto", "cuda", capability)
            return mode, (f"{mode} is what training picks on a GPU of compute capability "
                          f"{'.'.join(map(str, capability or ()))}")
        if device_type == "cpu":
            return CPU_AUTO, CPU_AUTO_REASON
        return "fp32", f"fp32 on {device_type}"
    if requested == "int8" and device_type != "cpu":
        raise ValueError(f"--precision int8 (dynamic quantization) runs on the CPU only, not "
                         f"on {device_type}")
    if requested == "bf16" and device_type == "mps":
        raise ValueError("--precision bf16 is not supported on mps; use fp32")
    return requested, "asked for"


def conv1d_to_linear(model):
    """Replace every transformers Conv1D (GPT-2's attention and MLP projections) with the
    equivalent nn.Linear, in place. Conv1D computes x @ W + b with W of shape (in, out);
    nn.Linear computes x @ W.T + b, so the weight is transposed. quantize_dynamic only knows
    nn.Linear, so without this the decoder would stay fp32."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.nf,
                                         device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    return model


def quantize_int8(model):
    """fp32 model -> the same model with every nn.Linear (Conv1D converted first) dynamically
    quantized to int8 weights; embeddings, layer norms and attention arithmetic stay fp32.
    GPT-2's LM head shares its weight with the input embeddings: it gets an int8 copy, the
    embeddings keep theirs.

    Weights get one scale per output channel, not one per matrix: on the demo model that took
    the test captions identical to fp32's from 89% to 97% (CIDEr 0.995x -> 0.999x fp32's) at
    the same speed; a per-matrix scale is set by the matrix's largest weight, which costs the
    LM head's small logit differences (bench/cpu.py --quality prints these figures)."""
    import warnings

    import torch

    conv1d_to_linear(model)
    # torch 2.13 still ships eager dynamic quantization but warns that it is deprecated in
    # favour of torchao (not a dependency here): a user of inference.py can do nothing about
    # that, so the warnings are not passed on. tests/test_quantize.py notices if it goes.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        spec = {torch.nn.Linear: per_channel_dynamic_qconfig}
        # Which int8 kernel a layer gets is fixed when its weight is packed, by the quantized
        # engine set then. oneDNN's is the fast one for many rows (the encoder: 197 rows an
        # image; the cross-attention keys/values, once per image), fbgemm's (torch's default
        # "x86" engine) for the few rows of a decoder step (beams x 1 token) and the LM head.
        # Measured here (AMD EPYC, AVX2 only, 1 thread), int8 vs fp32 linear: 1576 x 768 ->
        # 3072, oneDNN 4.0x, fbgemm 1.6x; 24 x 768 -> 50257 (LM head, batch 8), oneDNN 1.9x,
        # fbgemm 6.0x; 3 x 768 -> 3072 (batch 1 step), oneDNN 2.5x, fbgemm >= 7x. Same
        # arithmetic either way (per-tensor uint8 activations, per-channel int8 weights).
        for module, names in _many_row_linears(model):
            with _quantized_engine("onednn"):
                quantize_dynamic(module, names or spec, dtype=torch.qint8, inplace=True)
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def _many_row_linears(model):
    """(module, qconfig spec) pairs covering the linear layers that see many rows at once:
    the whole encoder, and each GPT-2 cross-attention's key/value projection (c_attn)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    pairs = [(model.encoder, None)]
    for block in getattr(getattr(model.decoder, "transformer", None), "h", []):
        cross = getattr(block, "crossattention", None)
        if cross is not None and hasattr(cross, "c_attn"):
            pairs.append((cross, {"c_attn": per_channel_dynamic_qconfig}))
    return pairs


class _quantized_engine:
    """Set torch.backends.quantized.engine for a block, when this torch build has it."""

    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        import torch

        self.before = torch.backends.quantized.engine
        if self.engine in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = self.engine

    def __exit__(self, *exc):
        import torch

        torch.backends.quantized.engine = self.before


def apply_precision(model, mode):
    """A loaded fp32 model (in eval mode) -> the model that runs in `mode`."""
    import torch

    from .modeling import upcast_decoder_attention

    if mode == "int8":
        return quantize_int8(model)
    if mode == "bf16":
        return model.to(torch.bfloat16)
    if mode == "fp16":
        upcast_decoder_attention(model)  # GPT-2's attention overflows in fp16 otherwise
        return model.to(torch.float16)
    return model


def model_bytes(model):
    """The model's size in memory: parameters and buffers, plus the packed int8 weights that
    dynamic quantization keeps outside the parameter list."""
    import torch

    total = sum(t.numel() * t.element_size() for t in
                {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            total += weight.numel() * weight.element_size()
            total += 0 if bias is None else bias.numel() * bias.element_size()
    return total


def agreement_with_fp32(model_dir, data_dir, modes, device="cpu", split="test", batch_size=32):
    """The quality bar's figures: caption a split of processed data (dataloader.py's output)
    in fp32 and in each mode -> {mode: (share of captions identical to fp32's, CIDEr, CIDEr /
    fp32's CIDEr)}, with "fp32" itself included. CIDEr uses the Python PTB tokeniser on every
    side (no Java start per mode; the ratio is what matters)."""
    import numpy as np

    from .captioner import caption_pixels, load_captioner
    from .scoring import compute_caption_metrics
    from .store import load_split

    rows = load_split(data_dir, split)
    pixels = np.stack(list(rows["pixel_values"]))
    references = [list(r) for r in rows["captions"]]
    captions, cider = {}, {}
    for mode in ("fp32", *[m for m in modes if m != "fp32"]):
        model, tokenizer, processor = load_captioner(model_dir, device, mode)
        captions[mode] = [c for first in range(0, len(pixels), batch_size)
                          for c in caption_pixels(pixels[first:first + batch_size], model,
                                                  tokenizer, processor)]
        cider[mode] = compute_caption_metrics(captions[mode], references,
                                              use_java=False)["cider"]
    return {m: (float(np.mean([a == b for a, b in zip(captions[m], captions["fp32"])])),
                cider[m], cider[m] / cider["fp32"]) for m in captions}
