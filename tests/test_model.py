"""The model, the collator, the loss and the trainer's pure parts, on tiny models built in
code (fast tier)."""

import os

import numpy as np
import pytest
import torch

from captioning.devices import choose_precision
from captioning.modeling import decode_captions, freeze, load_model_strict
from captioning.trainer import (CaptionCollator, EpochSampler, TrainView, caption_index,
                                shard_range, token_loss_sum)
from conftest import TINY_SIZE


def test_collator_masks_padding_only_and_keeps_eos(tiny):
    rows = tiny.rows[:6]
    batch = CaptionCollator(tiny.processor)(rows)
    labels, eos = batch["labels"], tiny.tokenizer.eos_token_id
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].shape == (6, 3, *TINY_SIZE)
    for row, lab in zip(rows, labels):
        ids = list(row["caption_ids"][0])
        assert lab[:len(ids)].tolist() == ids          # EOS (== pad id) stays in the loss
        assert lab[len(ids) - 1] == eos
        assert (lab[len(ids):] == -100).all()          # padding never does
    assert labels.shape[1] == max(len(r["caption_ids"][0]) for r in rows)  # dynamic padding


def test_caption_draw_is_a_pure_function_that_covers_every_caption(tiny):
    view = TrainView(tiny.rows, seed=7)
    first = [view[(3, i)]["caption_ids"][0] for i in range(len(tiny.rows))]
    again = [view[(3, i)]["caption_ids"][0] for i in reversed(range(len(tiny.rows)))][::-1]
    assert first == again  # order of requests does not matter
    drawn = {caption_index(7, e, 0, 5) for e in range(60)}
    assert drawn == set(range(5))  # over epochs, every phrasing is seen
    assert [caption_index(7, e, 0, 5) for e in range(10)] != [caption_index(8, e, 0, 5)
                                                              for e in range(10)]


def test_epoch_sampler_is_a_permutation_per_epoch():
    sampler = EpochSampler(10, seed=1)
    e0 = list(sampler)
    sampler.set_epoch(1)
    e1 = list(sampler)
    assert sorted(i for _, i in e0) == sorted(i for _, i in e1) == list(range(10))
    assert {e for e, _ in e0} == {0} and {e for e, _ in e1} == {1}
    assert [i for _, i in e0] != [i for _, i in e1]
    sampler.set_epoch(0)
    assert list(sampler) == e0


def test_shards_cover_every_image_once_in_order():
    for n in (0, 1, 7, 50, 51):
        for world in (1, 2, 3, 8):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert [i for s, e in ranges for i in range(s, e)] == list(range(n))


def test_token_loss_sum_is_the_same_however_the_batch_is_split(tiny):
    model = tiny.model()
    collate = CaptionCollator(tiny.processor)
    with torch.no_grad():
        whole, count = token_loss_sum(model, collate(tiny.rows[:8]), model.config)
        parts = [token_loss_sum(model, collate(tiny.rows[i:j]), model.config)
                 for i, j in ((0, 3), (3, 6), (6, 8))]
    assert count == sum(c for _, c in parts)
    assert float(whole) == pytest.approx(sum(float(s) for s, _ in parts), rel=1e-5)
    # ... and equals the model's own per-token mean times the token count
    batch = collate(tiny.rows[:8])
    with torch.no_grad():
        assert float(whole) / count == pytest.approx(float(model(**batch).loss), rel=1e-5)


def test_tiny_model_shapes_and_generate(tiny):
    model = tiny.model(max_new_tokens=12, num_beams=2)
    tok = tiny.tokenizer
    pixels = torch.randn(2, 3, *TINY_SIZE)
    labels = torch.tensor([[5, 6, tok.eos_token_id], [7, tok.eos_token_id, -100]])
    out = model(pixel_values=pixels, labels=labels)
    assert out.logits.shape == (2, 3, len(tok)) and out.loss.ndim == 0
    gen = model.generate(pixel_values=pixels)
    assert gen.shape[0] == 2 and gen.shape[1] <= 1 + 12  # start token + max_new_tokens
    assert (gen[:, 0] == model.generation_config.decoder_start_token_id).all()
    assert len(decode_captions(gen, tok)) == 2


def test_save_reload_restores_every_tensor(tiny, tmp_path):
    model = tiny.model(max_new_tokens=9, num_beams=4)
    model.save_pretrained(tmp_path)
    assert {"model.safetensors", "config.json", "generation_config.json"} <= set(os.listdir(tmp_path))
    fresh = tiny.model(seed=1)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    load_model_strict(str(tmp_path), into=fresh)
    want, got = model.state_dict(), fresh.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    reloaded = load_model_strict(str(tmp_path))
    assert reloaded.generation_config.num_beams == 4
    assert reloaded.generation_config.max_new_tokens == 9


def test_checkpoint_missing_tensors_is_an_error(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny.model()
    model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    dropped = [k for k in tensors if "encoder" in k][:3]
    save_file({k: v for k, v in tensors.items() if k not in dropped}, path,
              metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="does not match"):
        load_model_strict(str(tmp_path), into=model)


@pytest.mark.upstream
def test_upstream_raw_state_dict_load_loses_vit_tensors(tiny, tmp_path):
    """transformers 5.x: a raw load_state_dict of a saved VisionEncoderDecoderModel (what
    Trainer's checkpoint loaders do) misses the renamed ViT tensors. If this fails after an
    upgrade, transformers fixed it: CaptionTrainer's _load_from_checkpoint and
    _load_best_model overrides may go. Not a regression of ours."""
    from safetensors.torch import load_file

    tiny.model().save_pretrained(tmp_path)
    result = tiny.model().load_state_dict(load_file(os.path.join(tmp_path, "model.safetensors")),
                                          strict=False)
    assert result.missing_keys, "transformers fixed the renamed-key bug; see the docstring"


def test_freezing(tiny):
    model = tiny.model()
    freeze(model, encoder=True)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    model = tiny.model()
    freeze(model, decoder=True)
    trainable = {n for n, p in model.decoder.named_parameters() if p.requires_grad}
    assert any("crossattention" in n for n in trainable)
    assert not any(".attn." in n or ".mlp." in n for n in trainable)
    assert all(p.requires_grad for n, p in model.encoder.named_parameters()
               if not n.startswith("pooler"))


@pytest.mark.parametrize("encoder, decoder", [(False, False), (True, False), (False, True)])
def test_every_trainable_parameter_gets_a_gradient(tiny, encoder, decoder):
    """DDP with find_unused_parameters off refuses trainable parameters outside the loss's
    graph (the ViT pooler was one)."""
    model = tiny.model()
    freeze(model, encoder=encoder, decoder=decoder)
    loss, _ = token_loss_sum(model, CaptionCollator(tiny.processor)(tiny.rows[:4]), model.config)
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead
    assert "encoder.pooler.dense.weight" in model.state_dict()  # still saved


@pytest.mark.parametrize("requested, device, capability, expected", [
    ("auto", "cpu", None, "fp32"), ("auto", "mps", None, "fp32"),
    ("auto", "cuda", (7, 0), "fp16"),   # V100: bf16 only emulated
    ("auto", "cuda", (7, 5), "fp16"),   # T4
    ("auto", "cuda", (8, 0), "bf16"),   # A100
    ("auto", "cuda", (9, 0), "bf16"),   # H100
    ("fp32", "cuda", (9, 0), "fp32"), ("fp16", "cuda", (9, 0), "fp16"),
])
def test_precision_choice(requested, device, capability, expected):
    assert choose_precision(requested, device, capability) == expected


def test_half_precision_refused_without_cuda():
    for precision in ("bf16", "fp16"):
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            choose_precision(precision, "cpu")


def test_fp16_upcasts_gpt2_attention(tiny):
    from captioning.modeling import upcast_decoder_attention

    model = tiny.model()
    upcast_decoder_attention(model)
    attn = [m for m in model.decoder.modules() if hasattr(m, "reorder_and_upcast_attn")]
    assert attn and all(m.reorder_and_upcast_attn for m in attn)
    assert model.decoder.config._attn_implementation == "eager"  # the path that upcasts
    labels = torch.tensor(np.asarray([[5, 6, tiny.tokenizer.eos_token_id]]))
    assert torch.isfinite(model(pixel_values=torch.randn(1, 3, *TINY_SIZE), labels=labels).loss)


@pytest.mark.parametrize("metric, greater", [("loss", False), ("cider", True), ("bleu4", True)])
def test_best_checkpoint_follows_the_metric_direction(tmp_path, metric, greater):
    import train

    args = train.parse_args(["--output_dir", str(tmp_path), "--metric_for_best_model", metric])
    targs = train.make_training_args(args, str(tmp_path / "runs"), "fp32")
    assert targs.greater_is_better is greater and targs.metric_for_best_model == metric


def test_a_maximal_training_caption_fits_through_generate(tiny):
    """dataloader.py --max_length N stores at most N tokens, EOS included; the model's
    generation_config (max_new_tokens = N) lets all N come back. Forcing the stored ids
    token by token, generate must end with that caption's EOS, not be cut before it."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from captioning.modeling import tokenize_captions

    max_length = 12
    long_caption = " ".join(["a red circle in the top left of the picture"] * 3)
    ids = tokenize_captions([long_caption], tiny.tokenizer, max_length)[0]
    assert len(ids) == max_length and ids[-1] == tiny.tokenizer.eos_token_id

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - 1  # after the start token
            forced = torch.full_like(scores, float("-inf"))
            forced[:, ids[min(step, len(ids) - 1)]] = 0
            return forced

    model = tiny.model(max_new_tokens=max_length, num_beams=1)
    out = model.generate(pixel_values=torch.randn(1, 3, *TINY_SIZE),
                         logits_processor=LogitsProcessorList([Force()]))
    assert out[0, 1:].tolist() == ids  # every token, EOS last
    assert decode_captions(out, tiny.tokenizer) == [tiny.tokenizer.decode(ids[:-1]).strip()]


def test_best_model_load_restores_every_tensor_of_the_best_checkpoint(tiny, tmp_path):
    """CaptionTrainer._load_best_model on a checkpoint whose weights all differ from the
    model in memory: afterwards every tensor equals the checkpoint's (Trainer's own loader
    misses the renamed ViT tensors)."""
    from transformers import Seq2SeqTrainingArguments

    from captioning.trainer import CaptionTrainer

    best = tiny.model(seed=1)
    best.save_pretrained(tmp_path / "checkpoint-7")
    model = tiny.model(seed=2)
    trainer = CaptionTrainer(model=model, args=Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True), eval_collator=None,
        score=None)
    trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-7")
    want = best.state_dict()
    assert any(not torch.equal(want[k], v) for k, v in model.state_dict().items())
    trainer._load_best_model()
    got = model.state_dict()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
