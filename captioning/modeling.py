"""The ViT + GPT-2 VisionEncoderDecoderModel: its tokenizer and image processor, building it,
its generation defaults, loading it strictly, and turning caption text into ids and back.

The name "tiny" stands for a small randomly initialised model built from a config. It is
what `make demo` and the tests use, since this machine cannot reach the Hugging Face Hub.
"""

import os

import numpy as np

TINY = "tiny"
TINY_IMAGE_SIZE = 64
# Big enough to learn the synthetic shapes set in about two minutes of CPU time. Measured on
# it (20 epochs): 16 px patches beat 8 px ones (test BLEU-4 0.76 vs 0.67, and faster), and
# GPT-2's default 0.1 dropout only slowed a model this small down (0.70 without it).
TINY_ENCODER = dict(patch_size=16, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=256)
TINY_DECODER = dict(n_embd=128, n_layer=2, n_head=4, n_positions=128,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
# Below ~512 a byte-level BPE splits ordinary words into letters, which makes captions long.
TINY_VOCAB_SIZE = 1024
DEFAULT_NUM_BEAMS = 3


# ----------------------------------------------------------------------------- tokenizer

def fix_gpt2_tokens(tokenizer):
    """GPT-2 ships without a pad token; pad with EOS. Labels mask padding by length, never by
    id, so the one real EOS that ends each caption stays in the loss."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_tiny_tokenizer(captions, save_dir, vocab_size=TINY_VOCAB_SIZE):
    """A byte-level BPE trained on the training captions, saved as a GPT-2 tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    os.makedirs(save_dir, exist_ok=True)
    bpe.save_model(save_dir)
    tokenizer = GPT2Tokenizer.from_pretrained(save_dir)
    for name in ("vocab.json", "merges.txt"):  # save_pretrained writes tokenizer.json instead
        os.remove(os.path.join(save_dir, name))
    return fix_gpt2_tokens(tokenizer)


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    return fix_gpt2_tokens(AutoTokenizer.from_pretrained(name_or_path))


def load_image_processor(name_or_path):
    from transformers import AutoImageProcessor, ViTImageProcessor

    if name_or_path == TINY:
        return ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return AutoImageProcessor.from_pretrained(name_or_path)


def tokenize_captions(captions, tokenizer, max_length, stats=None):
    """Captions -> token ids, each at most max_length tokens *including* the EOS that ends
    it (cut to max_length - 1 caption tokens first; counted in stats["captions_truncated"]
    when a dict is given)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer itself: 6x faster than going through
        ids = [e.ids for e in backend.encode_batch(list(captions), add_special_tokens=False)]
    else:
        ids = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    if stats is not None:
        stats["captions_truncated"] = (stats.get("captions_truncated", 0)
                                       + sum(len(row) > max_length - 1 for row in ids))
    return [row[:max_length - 1] + [tokenizer.eos_token_id] for row in ids]


def decode_captions(token_ids, tokenizer):
    """Generated ids (B, T), -100 allowed as padding -> whitespace-normalised caption texts."""
    token_ids = np.asarray(token_ids.cpu() if hasattr(token_ids, "cpu") else token_ids)
    token_ids = np.where(token_ids < 0, tokenizer.pad_token_id, token_ids)
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts]


def through_first_eos(ids, eos):
    """Generated ids (N, T) without the start token -> (mask (N, T) of the tokens up to and
    including the first EOS, finished (N,) bool). After EOS generate pads (with EOS, for
    GPT-2): those positions are not the caption's. `eos` is an id or a list of ids."""
    import torch

    eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=ids.device)
    is_eos = torch.isin(ids, eos)
    return (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) == 0, is_eos.any(dim=1)


# ----------------------------------------------------------------------------- model

def set_generation_defaults(model, tokenizer, max_new_tokens=32, num_beams=DEFAULT_NUM_BEAMS):
    """GPT-2 has no start token of its own: decoding starts at BOS and pads with EOS. These
    live in the saved config and generation_config, so inference needs no extra flags.
    `max_new_tokens` counts caption tokens including EOS, not the start token."""
    from transformers import GenerationConfig

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    model.config.decoder_start_token_id = bos
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        decoder_start_token_id=bos, bos_token_id=bos, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
        num_beams=num_beams, early_stopping=num_beams > 1)
    return model


def build_model(encoder_model, decoder_model, tokenizer, image_size, max_new_tokens=32,
                num_beams=DEFAULT_NUM_BEAMS):
    """ViT encoder + GPT-2 decoder with cross-attention, joined as a VisionEncoderDecoderModel.

    `encoder_model` / `decoder_model` are Hub ids, local directories, or "tiny".
    """
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, GPT2Config,
                              GPT2LMHeadModel, VisionEncoderDecoderModel, ViTConfig, ViTModel)

    if encoder_model != TINY and decoder_model != TINY:
        # transformers 5.24 forgets is_decoder on GPT2Config when left to build the decoder
        # config itself (AttributeError), so hand it a finished one. Upstream-labelled test:
        # tests/test_train.py::test_upstream_from_encoder_decoder_pretrained_forgets_is_decoder.
        decoder_config = AutoConfig.from_pretrained(decoder_model)
        decoder_config.is_decoder = True
        decoder_config.add_cross_attention = True
        model = VisionEncoderDecoderModel.from_encoder_decoder_pretrained(
            encoder_model, decoder_model, decoder_config=decoder_config)
    else:
        if encoder_model == TINY:
            # With the pooler, like a Hub ViTModel, so that a saved model reloads with exactly
            # the tensors it was saved with (the pooler is frozen: see trainer.freeze).
            encoder = ViTModel(ViTConfig(image_size=image_size[0], **TINY_ENCODER))
        else:
            encoder = AutoModel.from_pretrained(encoder_model)
        if decoder_model == TINY:
            decoder = GPT2LMHeadModel(GPT2Config(
                vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, is_decoder=True, add_cross_attention=True,
                **TINY_DECODER))
        else:
            config = AutoConfig.from_pretrained(decoder_model)
            config.is_decoder, config.add_cross_attention = True, True
            decoder = AutoModelForCausalLM.from_pretrained(decoder_model, config=config)
        model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    if model.decoder.get_input_embeddings().num_embeddings < len(tokenizer):
        model.decoder.resize_token_embeddings(len(tokenizer))
    return set_generation_defaults(model, tokenizer, max_new_tokens, num_beams)


def load_model_strict(model_dir, into=None):
    """Load a saved VisionEncoderDecoderModel and check that *every* tensor came back.

    transformers 5.x's Trainer reloads checkpoints (resume_from_checkpoint,
    load_best_model_at_end) with raw key names; the ViT keys were renamed, so only some of
    the model's tensors are restored, with nothing but a warning. `from_pretrained` maps the
    names. With `into`, the loaded weights are copied into that model with strict=True.
    """
    from transformers import VisionEncoderDecoderModel

    loaded, info = VisionEncoderDecoderModel.from_pretrained(model_dir, output_loading_info=True)
    bad = {k: v for k, v in info.items()
           if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"{model_dir}: checkpoint does not match the model: {bad}")
    if into is None:
        return loaded
    into.load_state_dict(loaded.state_dict(), strict=True)
    return into


def freeze(model, *, encoder=False, decoder=False):
    """encoder: the whole ViT. decoder: GPT-2 except its cross-attention (and the layer norm
    before it) and the LM head, which must learn to read the image; GPT-2 ties the LM head to
    the input embeddings, so those stay trainable too.

    The ViT pooler is always frozen: the decoder reads the patch states, never the pooled
    output, so the pooler would be a trainable parameter without a gradient (which DDP
    refuses once find_unused_parameters is off). It stays in the saved model."""
    for p in model.encoder.parameters():
        p.requires_grad = not encoder
    pooler = getattr(model.encoder, "pooler", None)
    if pooler is not None:
        for p in pooler.parameters():
            p.requires_grad = False
    for name, p in model.decoder.named_parameters():
        p.requires_grad = not decoder or any(
            k in name for k in ("crossattention", "ln_cross_attn", "lm_head", "wte"))


def upcast_decoder_attention(model):
    """fp16 and GPT-2: attention scores overflow in half precision. transformers applies
    GPT-2's `reorder_and_upcast_attn` only on the eager attention path, so take that path."""
    model.decoder.config.reorder_and_upcast_attn = True
    for module in model.decoder.modules():
        if hasattr(module, "reorder_and_upcast_attn"):
            module.reorder_and_upcast_attn = True
    model.decoder.set_attn_implementation("eager")


def fill_generation_ids(model, tokenizer):
    """Published captioners (nlpconnect/vit-gpt2-image-captioning, say) keep their token ids
    in config.json and may have no generation_config.json, or the other way round: fill
    what generate and the training loss need in both, from the other or the tokenizer."""
    gen, config = model.generation_config, model.config
    for name, fallback in (("decoder_start_token_id", tokenizer.bos_token_id),
                           ("eos_token_id", tokenizer.eos_token_id),
                           ("pad_token_id", tokenizer.pad_token_id)):
        value = next((v for v in (getattr(gen, name, None), getattr(config, name, None),
                                  fallback) if v is not None), None)
        setattr(gen, name, value)
        setattr(config, name, value)
    return model


def check_init_model(model, manifest, tokenizer, source):
    """Refuse, in one line, a model whose tokenizer or image size don't fit the data: the
    same vocabulary (token for token, where the model folder has its tokenizer), and the
    same input size."""
    vocab = model.config.decoder.vocab_size
    image = model.config.encoder.image_size
    hint = f"prepare the data with dataloader.py --from_model {source}"
    if vocab != len(tokenizer):
        raise ValueError(f"--init_from {source} has a {vocab}-token vocabulary, the data's "
                         f"tokenizer {len(tokenizer)}: {hint}")
    try:
        own = load_tokenizer(source)
    except (OSError, ValueError):
        own = None  # weights only: the size check above is all there is
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"--init_from {source} has another vocabulary than the data's "
                         f"tokenizer (same size, different tokens): {hint}")
    if [image, image] != list(manifest["image_size"]):
        raise ValueError(f"--init_from {source} takes {image} px images, the data was prepared "
                         f"at {manifest['image_size'][0]} px: {hint}")
