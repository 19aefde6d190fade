"""Inference precision: Conv1D -> Linear, int8 dynamic quantization, bf16, the mode auto
picks, and (slow) the quality bar on a briefly trained demo-style tiny model."""

import copy
import os
import sys

import numpy as np
import pytest
import torch

from captioning.captioner import caption_pixels
from captioning.modeling import decode_captions
from captioning.quantize import (CPU_AUTO, apply_precision, conv1d_to_linear, model_bytes,
                                 quantize_int8, resolve_precision)


def _batch(tiny, n=4):
    return np.stack([r["pixel_values"] for r in tiny.rows[:n]])


def test_conv1d_to_linear_is_equivalent_in_fp32(tiny):
    from transformers.pytorch_utils import Conv1D

    model = tiny.model().eval()
    pixels = torch.randn(2, 3, 64, 64)
    ids = torch.tensor([[tiny.tokenizer.eos_token_id, 5, 9, 11]] * 2)
    with torch.no_grad():
        before = model(pixel_values=pixels, decoder_input_ids=ids).logits
        converted = conv1d_to_linear(copy.deepcopy(model))
        after = converted(pixel_values=pixels, decoder_input_ids=ids).logits
    assert not any(isinstance(m, Conv1D) for m in converted.modules())
    assert sum(isinstance(m, Conv1D) for m in model.modules()) > 0  # there was work to do
    assert (after - before).abs().max().item() <= 1e-6


def test_int8_round_trip_quantizes_both_halves_and_keeps_eos_handling(tiny):
    from torch.ao.nn.quantized.dynamic import Linear as QLinear
    from transformers.pytorch_utils import Conv1D

    model = tiny.model().eval()
    linears = {half: sum(isinstance(m, (torch.nn.Linear, Conv1D)) for m in
                         getattr(model, half).modules()) for half in ("encoder", "decoder")}
    pixels = _batch(tiny, 3)
    # Greedy, so that a row whose next token is EOS ends there (beam search may keep a
    # longer beam); the random model's favourite token is the pad id, so it is barred.
    kw = dict(max_new_tokens=6, num_beams=1, bad_words_ids=[[tiny.tokenizer.pad_token_id]])
    from captioning.images import normalize_pixels
    norm = normalize_pixels(pixels, tiny.processor)
    # Make EOS a token the model really emits early in some rows and never in others, so
    # that those rows stop at once while the rest go on, and the padding after EOS is
    # exercised (the random model's own EOS never comes).
    model.generation_config.eos_token_id = None  # free-running first
    with torch.inference_mode():
        rows = [row[1:] for row in model.generate(pixel_values=norm, **kw).tolist()]
    model.generation_config.eos_token_id = next(
        row[p] for p in range(min(map(len, rows)) - 1) for row in rows
        if any(row[p] not in other for other in rows))
    with torch.inference_mode():
        ref = model.generate(pixel_values=norm, **kw)
    q = quantize_int8(copy.deepcopy(model))
    for half, n in linears.items():
        assert sum(isinstance(m, QLinear) for m in getattr(q, half).modules()) == n, half
    assert not any(isinstance(m, Conv1D) for m in q.modules())
    assert model_bytes(q) < 0.6 * model_bytes(model)
    with torch.inference_mode():
        out = q.generate(pixel_values=norm, **kw)
    eos, pad = q.generation_config.eos_token_id, q.generation_config.pad_token_id
    assert out.shape[0] == ref.shape[0] and out.shape[1] <= 1 + kw["max_new_tokens"]
    ended_early = 0
    for row in out.tolist():
        body = row[1:]
        if eos in body:  # after the first EOS only padding
            assert all(t == pad for t in body[body.index(eos) + 1:])
            ended_early += body.index(eos) + 1 < len(body)
    assert ended_early, "no row stopped before the others: the padding check saw nothing"
    # The quantized model computes nearly the fp32 function (a broken scale or a skipped
    # layer shows here first), and captions are what its own generate says.
    assert_close_logits(model, q, norm, max_error=0.3, min_cosine=0.995)
    captions = caption_pixels(pixels, q, tiny.tokenizer, tiny.processor, **kw)
    assert captions == decode_captions(out, tiny.tokenizer)


def _int8_layer_error(qconfig, linear_class, engine, x, linear):
    from torch.ao.quantization import quantize_dynamic

    from captioning.quantize import _quantized_engine

    with _quantized_engine(engine):
        q = quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: qconfig},
                             dtype=torch.qint8, mapping={torch.nn.Linear: linear_class})[0]
    with torch.no_grad():
        want = linear(x)
        return float((q(x) - want).norm() / want.norm())


_SCHEME_CHECK = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from tests.test_quantize import _int8_layer_error
from captioning.quantize import FullRangeInt8Linear, Int8Linear, int8_scheme
from torch.ao.quantization import per_channel_dynamic_qconfig
torch.manual_seed(0)
out = {{}}
for engine in ("x86", "onednn"):
    qconfig, linear_class, per_image_class = int8_scheme(engine)
    # A GPT-2-sized layer whose weights reach their row's largest value everywhere and whose
    # activations sit near the top of their range: where a saturating kernel goes wrong.
    worst_layer = torch.nn.Linear(768, 256)
    with torch.no_grad():
        worst_layer.weight.copy_(torch.randint(0, 2, (256, 768)) * 2.0 - 1)
    worst = torch.rand(8, 768) * 0.1 + 0.9
    typical_layer, typical = torch.nn.Linear(768, 256), torch.randn(24, 768)
    with torch.no_grad():
        typical_layer.weight.normal_(0, 0.02)  # Gaussian, GPT-2's init scale
    out[engine] = dict(
        weight_max=qconfig.weight.p.keywords.get("quant_max", 127),
        reduce_range=linear_class.reduce_range, per_image=per_image_class.per_image,
        worst=_int8_layer_error(qconfig, linear_class, engine, worst, worst_layer),
        # what 8-bit weights with 8-bit activations do on this kernel: exact or saturating
        worst_8_8=_int8_layer_error(per_channel_dynamic_qconfig, FullRangeInt8Linear, engine,
                                    worst, worst_layer),
        typical=_int8_layer_error(qconfig, linear_class, engine, typical, typical_layer),
        torch_typical=_int8_layer_error(per_channel_dynamic_qconfig, Int8Linear, engine,
                                        typical, typical_layer))
print(json.dumps(out))
"""


@pytest.mark.parametrize("forced_avx2", [False, True])
def test_int8_scheme_is_exact_on_this_kernel_and_beats_torchs(forced_avx2):
    """int8_scheme measures what the CPU's kernels compute exactly. Under
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 / ONEDNN_MAX_CPU_ISA=AVX2 (16-bit pair sums, whatever the
    CPU) it must take 7-bit weights with 8-bit activations. Everywhere: 8-bit weights exactly
    when 8/8 does not saturate on a worst-case layer (so it never gives up precision a
    VNNI/AMX kernel has, nor takes it where an AVX2 kernel saturates); whatever it takes
    does not saturate; and 8/8 beats torch's own 8/7 split on a Gaussian layer. (7/8 against
    8/7 depends on the weights: no assertion, README.)"""
    import json
    import subprocess

    if "x86" not in torch.backends.quantized.supported_engines:
        pytest.skip("no x86 quantized engine")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    if forced_avx2:
        env.update(FBGEMM_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    done = subprocess.run([sys.executable, "-c", _SCHEME_CHECK.format(root=root)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    for engine, got in json.loads(done.stdout.strip().splitlines()[-1]).items():
        assert got["per_image"], engine
        if forced_avx2:
            assert (got["weight_max"], got["reduce_range"]) == (63, False), (engine, got)
            assert got["worst_8_8"] > 0.2, (engine, got)  # the saturation is real
        eight_bit_exact = got["worst_8_8"] < 0.02  # saturation is off by tens of percent
        assert (got["weight_max"] == 127) == eight_bit_exact, (engine, got)
        assert got["worst"] < 0.02, (engine, got)
        # On x86 one of the two probes always passes (7-bit weights are exact on AVX2), so
        # the activations always get 8 bits; with 8-bit weights that must show on a layer.
        assert not got["reduce_range"], (engine, got)
        if eight_bit_exact:
            assert got["typical"] < 0.8 * got["torch_typical"], (engine, got)


def test_int8_encoder_states_do_not_depend_on_the_batch(tiny):
    """Per-image activation scales in the encoder and cross-attention keys/values: an image's
    int8 encoding, and every layer's keys/values for it, are bit-for-bit the same alone and
    beside a much brighter image, where one scale per call (torch's default module) changes
    them."""
    from captioning.beamshare import cross_keys_values
    from captioning.images import normalize_pixels

    q = quantize_int8(tiny.model().eval())
    crosses = [block.crossattention for block in q.decoder.transformer.h]
    pixels = _batch(tiny, 2)
    pixels[1] = 255 - pixels[1] // 8  # a bright, low-contrast neighbour
    norm = normalize_pixels(pixels, tiny.processor)

    def encodings():
        with torch.inference_mode():
            alone = q.encoder(pixel_values=norm[:1]).last_hidden_state
            both = q.encoder(pixel_values=norm).last_hidden_state
            # The keys/values of the same states, alone and beside states of 4x the range.
            loud = torch.cat([both[:1], 4 * both[1:]])
            kv = [(cross_keys_values(c, both[:1])[0], cross_keys_values(c, loud)[0][:1])
                  for c in crosses]
        return torch.equal(alone, both[:1]), [torch.equal(a, b) for a, b in kv]

    assert encodings() == (True, [True] * len(crosses))
    for m in q.modules():  # the same model with one scale per call
        if hasattr(m, "per_image"):
            m.per_image = False
    encoder_same, kv_same = encodings()
    assert not encoder_same and not any(kv_same), "the neighbour never mattered"


def test_int8_head_top_logits_are_fp32s(tiny):
    """ExactTopLogits: each row's 16 largest int8 logits are recomputed from the fp32 weight,
    so greedy and beam choices among them are fp32's; the rest stay int8."""
    from captioning.quantize import ExactTopLogits

    model = tiny.model().eval()
    head = model.decoder.get_output_embeddings()
    q = quantize_int8(copy.deepcopy(model))
    exact = q.decoder.get_output_embeddings()
    assert isinstance(exact, ExactTopLogits)
    assert exact.weight is q.decoder.get_input_embeddings().weight  # tied: no extra memory
    hidden = torch.randn(2, 5, head.in_features) * 3
    with torch.no_grad():
        want, got, int8 = head(hidden), exact(hidden), exact.int8_head(hidden)
    top = int8.topk(16, dim=-1).indices  # the 16 the docs promise, whatever k says
    assert torch.allclose(got.gather(-1, top), want.gather(-1, top), atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    rest = torch.ones_like(got, dtype=torch.bool).scatter(-1, top, False)
    assert torch.equal(got[rest], int8[rest])
    assert not torch.allclose(int8.gather(-1, top), want.gather(-1, top), atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "int8", "bf16"])
def test_cross_attention_shared_over_beams_gives_the_same_generation(tiny, precision):
    """captioning/beamshare.py (load_captioner sets it in every mode): the same ids and beam
    scores as transformers' own cross-attention, for beam search, return sequences and
    greedy, with two identical images in the batch; the state dict's keys unchanged."""
    from captioning.beamshare import share_cross_attention_over_beams
    from captioning.images import normalize_pixels

    base = apply_precision(tiny.model().eval(), precision)
    # Each side quantized from the fp32 model, as load_captioner does it: a deepcopy of an int8
    # model is not the same model, since torch's quantized Linear.__deepcopy__ repacks its
    # weight for the engine current at the copy (fbgemm), not the one it was packed for.
    shared = apply_precision(share_cross_attention_over_beams(tiny.model().eval()), precision)
    assert list(shared.state_dict()) == list(base.state_dict())
    pixels = _batch(tiny, 4)
    pixels[1] = pixels[0]
    norm = normalize_pixels(pixels, tiny.processor).to(base.dtype)
    for kw in (dict(num_beams=3, max_new_tokens=8, num_return_sequences=2),
               dict(num_beams=3, max_new_tokens=8, min_new_tokens=8),
               dict(num_beams=1, max_new_tokens=6)):
        with torch.inference_mode():
            ref, out = (m.generate(pixel_values=norm, return_dict_in_generate=True,
                                   output_scores=True, **kw) for m in (base, shared))
        assert torch.equal(ref.sequences, out.sequences), kw
        # ... and the shared path really ran, in every layer: the rows come in runs of
        # 2 * beams (the duplicate pair), beams, beams, so groups of `beams` rows, one
        # key/value set per image.
        store = out.past_key_values.__dict__.get("_beam_shared_cross_kv")
        assert store and len(store) == len(shared.decoder.transformer.h), kw
        keys, _, group, _ = store[0]
        assert group == kw["num_beams"] and keys.shape[0] == len(pixels), kw
        if kw["num_beams"] > 1:
            assert torch.allclose(ref.sequences_scores, out.sequences_scores, atol=1e-5), kw


def test_bf16_weights_compute_the_fp32_function_and_caption(tiny):
    fp32 = tiny.model().eval()
    model = apply_precision(copy.deepcopy(fp32), "bf16")
    assert model.dtype == torch.bfloat16
    pixels = _batch(tiny, 2)
    from captioning.images import normalize_pixels
    assert_close_logits(fp32, model, normalize_pixels(pixels, tiny.processor),
                        max_error=0.1, min_cosine=0.999)
    captions = caption_pixels(pixels, model, tiny.tokenizer, tiny.processor, max_new_tokens=4)
    with torch.inference_mode():
        ids = model.generate(pixel_values=normalize_pixels(pixels, tiny.processor).to(
            torch.bfloat16), max_new_tokens=4)
    assert captions == decode_captions(ids, tiny.tokenizer)


def assert_close_logits(reference, model, pixels, max_error, min_cosine):
    """Teacher-forced logits of `model` against `reference` (fp32) on the same input: the
    largest difference in units of the reference's standard deviation, and their cosine.
    Measured on the tiny random model: int8 0.11 and 0.9996, bf16 0.03 and 0.99997."""
    start = reference.generation_config.decoder_start_token_id
    ids = torch.tensor([[start, 5, 6, 7]] * len(pixels))
    with torch.no_grad():
        want = reference(pixel_values=pixels, decoder_input_ids=ids).logits
        got = model(pixel_values=pixels.to(model.dtype), decoder_input_ids=ids).logits.float()
    error = float((got - want).abs().max() / want.std())
    cosine = float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), 0))
    assert error < max_error and cosine > min_cosine, (error, cosine)


def test_resolve_precision():
    assert resolve_precision("auto", "cpu")[0] == CPU_AUTO
    assert resolve_precision("auto", "cuda", (8, 0))[0] == "bf16"
    assert resolve_precision("auto", "cuda", (7, 5))[0] == "fp16"
    assert resolve_precision("auto", "mps")[0] == "fp32"
    assert resolve_precision("bf16", "cpu")[0] == "bf16"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_precision("int8", "cuda", (8, 0))


# ----------------------------------------------------------------------------- slow tier

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "data", "demo")


@pytest.mark.demo
def test_auto_mode_meets_the_quality_bar_on_the_demo_model():
    """The issue's quality bar is set on the demo model itself (make demo's output), so this
    runs after `make demo` (`make check-demo`, which .ci/run calls), not inside make test:
    a model trained for less (400 images, 12 epochs) had int8 at 94% identical, and training
    one in make test costs minutes. The model make demo trains differs between machines (CI's
    had 94% under the int8 before int8_scheme, per-image scales and the exact head; this
    machine's 92%): bench/int8_quality.py measures the margin on four demo-recipe models.
    Prints every mode's figures; asserts the bar for the mode auto picks on a CPU: >= 95% of
    test captions identical to fp32's, CIDEr within 2%."""
    from captioning.quantize import agreement_with_fp32

    model_dir, data_dir = os.path.join(DEMO_MODEL, "model"), os.path.join(DEMO_MODEL, "processed")
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        pytest.fail(f"no demo model in {model_dir}: run `make demo` first")
    quality = agreement_with_fp32(model_dir, data_dir, ["bf16", "int8"])
    for mode, (same, cider, ratio) in quality.items():
        print(f"\n{mode}: {same:.0%} of test captions identical to fp32's, CIDEr {cider:.3f} "
              f"= {ratio:.4f}x fp32's", file=sys.stderr)
    assert CPU_AUTO != "fp32", "auto should pick a faster mode that meets the bar"
    same, _, ratio = quality[CPU_AUTO]
    assert same >= 0.95
    assert abs(ratio - 1) <= 0.02


@pytest.fixture(scope="module")
def tiny_model_dir(tiny, tmp_path_factory):
    """The fast tier's tiny model (random weights), saved the way train.py saves one."""
    d = str(tmp_path_factory.mktemp("tiny_model"))
    tiny.model().save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    tiny.processor.save_pretrained(d)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_torchrun_two_processes_equal_one(tiny_model_dir, tmp_path, precision):
    """40 inputs, 3 of them bad: torchrun --nproc_per_node 2 prints the same stdout and
    writes the same --json and --coco_results as one process; each bad input is reported
    once. --batch_size 1 under int8: dynamic quantization scales activations per batch, so a
    caption can depend on the other images of its batch (README)."""
    import subprocess

    from PIL import Image

    from conftest import ROOT, free_port

    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(37):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8)).save(
            d / f"COCO_val2014_{i:012d}.jpg")
    bad = [d / "COCO_val2014_000000000100.jpg", d / "COCO_val2014_000000000200.jpg",
           d / "COCO_val2014_000000000300.jpg"]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(b"not an image at all")
    bad[2].write_bytes(b"\xff\xd8\xff\xe0 truncated")
    batch = "1" if precision == "auto" else "6"
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        out.mkdir()
        cmd = [os.path.join(ROOT, "inference.py"), "--model_path", tiny_model_dir,
               "--image_path", str(d), "--max_new_tokens", "6", "--num_beams", "2",
               "--batch_size", batch, "--precision", precision, "--workers", "2",
               "--json", str(out / "c.json"), "--coco_results", str(out / "r.json")]
        if nproc > 1:
            cmd = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), *cmd]
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert r.returncode == 1, r.stderr[-2000:]  # some inputs failed
        outputs[nproc] = (r.stdout, (out / "c.json").read_text(), (out / "r.json").read_text())
        for path in bad:
            assert r.stderr.count(f"{path}:") == 1, r.stderr[-2000:]
        assert r.stderr.count("inference.py: precision") == 1  # the choice, printed once
    assert len(outputs[1][0].splitlines()) == 37
    assert outputs[2] == outputs[1]
