"""Inference precision: which mode a captioning run uses (--precision) and turning a loaded
fp32 model into it. Training's precision choice stays in devices.choose_precision; this
module reuses it for GPUs and adds the CPU modes.

    fp32  the model as trained
    bf16  weights in bfloat16 (on GPUs; on CPUs without native bf16 it is emulated and slow)
    fp16  GPUs older than Ampere only, picked by auto the way training picks it
    int8  dynamic quantization of every linear layer of encoder and decoder (CPU only):
          int8 weights (7-bit on AVX2) with one scale per output channel, uint8 activations
          quantized on the fly, per call or per image (int8_scheme, Int8Linear); oneDNN's
          kernel for the many-row layers, fbgemm's for the rest; the LM head's top logits
          recomputed in fp32 (ExactTopLogits)
"""

import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from .devices import choose_precision

INFERENCE_PRECISIONS = ("auto", "fp32", "bf16", "int8")

# What auto picks on a CPU, and why: the fastest mode that met the quality bar (>= 95% of
# test captions identical to fp32's and test CIDEr within 2%) on the demo-style tiny model.
# Set from bench/cpu.py (speed, full size) and
# tests/test_quantize.py::test_auto_mode_meets_the_quality_bar_on_the_demo_model (make
# check-demo, run by CI), which fails if this mode stops meeting the bar.
CPU_AUTO = "int8"
CPU_AUTO_REASON = ("int8 on a CPU: the fastest mode in bench/cpu.py that keeps >= 95% of the "
                   "demo model's test captions identical to fp32's (98%, CIDEr 0.998x); "
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
    embeddings keep theirs, and the head's best few logits per row are recomputed exactly from
    them (ExactTopLogits).

    Weights get one scale per output channel, not one per matrix: on the demo model that took
    the test captions identical to fp32's from 89% to 97% (CIDEr 0.995x -> 0.999x fp32's) at
    the same speed; a per-matrix scale is set by the matrix's largest weight, which costs the
    LM head's small logit differences (README, *CPU precision*: 89% identical, 0.9946x).
    Activations get all 8 bits wherever a probe shows the CPU's kernel multiplies them
    without saturating (int8_scheme: 8-bit weights on VNNI/AMX, 7-bit on AVX2), and the
    layers that see whole images (the encoder, the cross-attention keys/values) one scale
    per image, so that the batch an image is captioned in changes only the decoder's steps
    (Int8Linear; where encoder and decoder widths differ, enc_to_dec_proj keeps one scale a
    call). On make demo's model these and ExactTopLogits took the test captions
    identical to fp32's from 92% to 98% (`python bench/int8_quality.py` prints the figures,
    for four models and both kernel sets)."""
    import warnings

    conv1d_to_linear(model)
    head = model.decoder.get_output_embeddings()
    # torch 2.13 still ships eager dynamic quantization but warns that it is deprecated in
    # favour of torchao (not a dependency here): a user of inference.py can do nothing about
    # that, so the warnings are not passed on. tests/test_quantize.py notices if it goes.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        from torch.ao.quantization import quantize_dynamic

        # Which int8 kernel a layer gets is fixed when its weight is packed, by the quantized
        # engine set then. oneDNN's is the fast one for many rows (the encoder: 197 rows an
        # image; the cross-attention keys/values, once per image), fbgemm's (torch's default
        # "x86" engine) for the few rows of a decoder step (beams x 1 token) and the LM head.
        # Measured here (AMD EPYC, AVX2 only, 1 thread), int8 vs fp32 linear: 1576 x 768 ->
        # 3072, oneDNN 4.0x, fbgemm 1.6x; 24 x 768 -> 50257 (LM head, batch 8), oneDNN 1.9x,
        # fbgemm 6.0x; 3 x 768 -> 3072 (batch 1 step), oneDNN 2.5x, fbgemm >= 7x. Same
        # arithmetic either way (uint8 activations with one scale per call, or per image;
        # per-channel int8 weights).
        for module, names in _many_row_linears(model):
            with _quantized_engine("onednn") as engine:
                qconfig, _, per_image_class = int8_scheme(engine)
                quantize_dynamic(module, {name: qconfig for name in names} if names else
                                 {torch.nn.Linear: qconfig}, dtype=torch.qint8, inplace=True,
                                 mapping={torch.nn.Linear: per_image_class})
        qconfig, linear_class, _ = int8_scheme(torch.backends.quantized.engine)
        quantize_dynamic(model, {torch.nn.Linear: qconfig}, dtype=torch.qint8, inplace=True,
                         mapping={torch.nn.Linear: linear_class})
    if head is not None and model.decoder.get_output_embeddings() is not head:
        model.decoder.set_output_embeddings(ExactTopLogits(
            model.decoder.get_output_embeddings(), head.weight, head.bias))
    return model


class Int8Linear(DynamicLinear):
    """torch's dynamic int8 Linear with two choices made by the class, so that they survive
    the copies torch's __deepcopy__ rebuilds from the weights (a copy is repacked for the
    engine current then, so copy an int8 model only where that is the engine it was built
    under; load_captioner quantizes each process's own model instead):

    reduce_range  torch's own module always passes True: activations quantized to 7 bits, so
                  that the AVX2 kernel's 16-bit sums of two uint8 x int8 products cannot
                  saturate. False (all 8 bits) is for kernels that add in 32 bits (VNNI,
                  AMX) or for 7-bit weights on AVX2 (int8_scheme): half the activations'
                  quantization error.
    per_image     an activation scale per image (dim 0 of a batch x tokens x features
                  input) instead of one per call, so that an image's encoding no longer
                  depends on the other images in its batch: for the encoder and the
                  cross-attention keys/values, whose calls hold whole images (197 rows each
                  at ViT-B/16). The calls per image cost about 10 % of an int8 generate
                  call at batch 8 (README, *int8's precision*)."""

    reduce_range = True
    per_image = False

    def forward(self, x):
        if self.per_image and x.dim() == 3 and x.shape[0] > 1:
            return torch.cat([self._linear(image) for image in x.split(1)])
        return self._linear(x)

    def _linear(self, x):
        return torch.ops.quantized.linear_dynamic(
            x, self._packed_params._packed_params, reduce_range=self.reduce_range).to(x.dtype)

    def _get_name(self):
        return type(self).__name__


class FullRangeInt8Linear(Int8Linear):
    reduce_range = False


class PerImageInt8Linear(Int8Linear):
    per_image = True


class FullRangePerImageInt8Linear(FullRangeInt8Linear):
    per_image = True


_SCHEMES = {}  # engine -> int8_scheme's answer, measured once a process


def int8_scheme(engine):
    """-> (weight qconfig, Int8Linear class, per-image Int8Linear class) for layers packed with
    `engine` on this CPU, the most precise of three that its kernel computes exactly:

    8-bit weights, 8-bit activations  where the kernel adds uint8 x int8 products in 32 bits
                                      (VNNI, AMX)
    7-bit weights, 8-bit activations  AVX2: its 16-bit sums of two products stay below 32,767
                                      (2 x 255 x 63 = 32,130). On the demo models it beats
                                      torch's 8/7 split (bench/int8_quality.py --schemes
                                      auto torch): there the activations are the larger
                                      error. Not a general rule: on a layer whose rows'
                                      scales are set by a few outlier weights, 7-bit
                                      weights cost more than 7-bit activations do
    8-bit weights, 7-bit activations  torch's own choice, if neither measures exact
    """
    if engine not in _SCHEMES:
        from torch.ao.quantization import (QConfig, PerChannelMinMaxObserver,
                                           default_dynamic_quant_observer,
                                           per_channel_dynamic_qconfig)

        seven_bit = QConfig(activation=default_dynamic_quant_observer,
                            weight=PerChannelMinMaxObserver.with_args(
                                dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                quant_min=-63, quant_max=63))
        if full_range_is_exact(engine, per_channel_dynamic_qconfig):
            scheme = per_channel_dynamic_qconfig, FullRangeInt8Linear, FullRangePerImageInt8Linear
        elif full_range_is_exact(engine, seven_bit):
            scheme = seven_bit, FullRangeInt8Linear, FullRangePerImageInt8Linear
        else:
            scheme = per_channel_dynamic_qconfig, Int8Linear, PerImageInt8Linear
        _SCHEMES[engine] = scheme
    return _SCHEMES[engine]


def full_range_is_exact(engine, qconfig):
    """Whether `engine`'s int8 linear kernel, on this CPU, multiplies 8-bit activations by
    weights quantized with `qconfig` without saturating: measured, not guessed from CPU flags,
    since FBGEMM_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA can hold a kernel below what the
    CPU has. The probe is the worst case: every activation at the top of its range (uint8
    255) against every weight at its row's largest, where AVX2's pairwise 16-bit sums of
    8-bit values (2 x 255 x 127 = 64,770) saturate at 32,767 and the output is off by about
    half; rounding alone is off by under 1%."""
    from torch.ao.quantization import quantize_dynamic

    linear = torch.nn.utils.skip_init(torch.nn.Linear, 256, 4, bias=False)  # no RNG draw
    with torch.no_grad():
        linear.weight.fill_(1.0)
        linear.weight[1::2] *= -1
    x = torch.ones(2, 256)
    x[:, 0] = -1e-3  # the range's zero stays code 0, so 1.0 is code 255
    with _quantized_engine(engine):
        probe = quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: qconfig},
                                 dtype=torch.qint8)[0]
    with torch.no_grad():
        want = linear(x)
        got = torch.ops.quantized.linear_dynamic(x, probe._packed_params._packed_params,
                                                 reduce_range=False)
    return bool((got - want).abs().max() <= 0.1 * want.abs().max())


class ExactTopLogits(torch.nn.Module):
    """An int8 LM head whose `k` largest logits per row are recomputed in fp32 from the
    original weight. Beam search and greedy decoding choose among a row's top few tokens, and
    near ties there are where int8 changed captions: on make demo's model (600 images) an int8
    head alone left 96.0% of captions identical to fp32's, and with the rest int8 this head
    gave as many as an fp32 head (97.8% both, before the per-image scales). The other logits (which only enter
    the softmax's normaliser) stay int8. GPT-2's head weight is its input embedding matrix,
    which stays fp32 anyway, so this costs no memory there (an untied head keeps its fp32
    weight alive); per step it costs a top-k and k x hidden multiply-adds a row. Beam search
    ranks 2 x num_beams candidates a step, so from --num_beams 9 on (k = 16) some of those
    are int8 logits; so can be, with fewer beams, candidates that logits processors
    (bad_words_ids, no_repeat_ngram_size) push below the int8 top 16."""

    def __init__(self, int8_head, weight, bias=None, k=16):
        super().__init__()
        self.int8_head, self.weight, self.bias, self.k = int8_head, weight, bias, k

    def forward(self, hidden):
        logits = self.int8_head(hidden)
        top = logits.topk(min(self.k, logits.shape[-1]), dim=-1, sorted=False).indices
        exact = torch.einsum("...d,...kd->...k", hidden.to(self.weight.dtype),
                             torch.nn.functional.embedding(top, self.weight))
        if self.bias is not None:
            exact = exact + self.bias[top]
        return logits.scatter_(-1, top, exact.to(logits.dtype))  # logits is this call's own


def _many_row_linears(model):
    """(module, names of its linear layers or None for all) pairs covering the linear layers
    that see many rows at once, each call whole images: the whole encoder and each GPT-2
    cross-attention's key/value projection (c_attn). (enc_to_dec_proj, where the widths
    differ, is left to the default: transformers applies it to every beam row at every
    step, where a call per image would cost.)"""
    pairs = [(model.encoder, None)]
    for block in getattr(getattr(model.decoder, "transformer", None), "h", []):
        cross = getattr(block, "crossattention", None)
        if cross is not None and hasattr(cross, "c_attn"):
            pairs.append((cross, ["c_attn"]))
    return pairs


class _quantized_engine:
    """Set torch.backends.quantized.engine for a block, when this torch build has it."""

    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        self.before = torch.backends.quantized.engine
        if self.engine in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = self.engine
        return torch.backends.quantized.engine

    def __exit__(self, *exc):
        torch.backends.quantized.engine = self.before


def apply_precision(model, mode):
    """A loaded fp32 model (in eval mode) -> the model that runs in `mode`."""
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
    total = sum(t.numel() * t.element_size() for t in
                {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            total += weight.numel() * weight.element_size()
            total += 0 if bias is None else bias.numel() * bias.element_size()
    return total


def agreement_with_fp32(model_dir, data_dir, modes, device="cpu", split="test", batch_size=32,
                        limit=None):
    """The quality bar's figures: caption a split of processed data (dataloader.py's output;
    its first `limit` rows if given) in fp32 and in each mode -> {mode: (share of captions
    identical to fp32's, CIDEr, CIDEr / fp32's CIDEr)}, with "fp32" itself included. CIDEr
    uses the Python PTB tokeniser on every side (no Java start per mode; the ratio is what
    matters)."""
    import numpy as np

    from .captioner import caption_pixels, load_captioner
    from .scoring import compute_caption_metrics
    from .store import load_split

    rows = load_split(data_dir, split)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
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
