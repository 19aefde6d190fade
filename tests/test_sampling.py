"""captioning/sampling.py, GPT-2 run by hand for SCST: the sampling loop draws from the
model's own distribution (given uniforms, step by step against the teacher-forced pass),
greedy equals generate, penalties saved with the init model are ignored; the prefix tree;
the scoring pass equals the model's own forward in log-probabilities and gradients, and
through DDP its gradients are averaged over processes."""

import os

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from captioning import sampling
from captioning.modeling import through_first_eos
from conftest import free_port


def _eos_biased(tiny, bias=4.0, gain=0.0):
    """The tiny model with its EOS logit moved by bias + gain x the first feature of the
    decoder's last hidden state (a hook on lm_head, which the sampling loop and the
    teacher-forced pass both run), so that captions end at varied lengths."""
    model = tiny.model()
    eos = tiny.tokenizer.eos_token_id

    def hook(module, args, out):
        out = out.clone()
        out[..., eos] += bias + gain * args[0][..., 0]
        return out

    model.decoder.lm_head.register_forward_hook(hook)
    return model


def _teacher_forced_log_softmax(model, states, ids):
    """log-softmax (N, T, V) of the decoder over the start token + ids, one full pass."""
    start = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        logits = model(encoder_outputs=(states,), decoder_input_ids=torch.cat([start, ids[:, :-1]], 1),
                       use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1)


def test_draw_inverts_the_cumulative_distribution():
    # Exact binary fractions, so that the boundaries are exact in float32 and float64.
    probs = torch.tensor([[0.25, 0.0, 0.5, 0.25]]).repeat(6, 1)
    u = torch.tensor([[0.0], [0.2499], [0.25], [0.7499], [0.75], [0.99999]])
    assert sampling.draw(probs, u).tolist() == [0, 0, 2, 2, 3, 3]  # never the zero-probability 1
    # Many uniforms: the frequencies are the probabilities.
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(1, 50, generator=gen), -1)
    drawn = sampling.draw(probs.repeat(200_000, 1), torch.rand(200_000, 1, generator=gen))
    freq = torch.bincount(drawn, minlength=50).double() / 200_000
    assert float((freq - probs[0].double()).abs().max()) < 0.004


@pytest.mark.parametrize("lean", [True, False])
def test_sampling_loop_draws_from_the_models_own_distribution(tiny, lean):
    """With given uniforms: at every step up to and including a caption's EOS, the loop's
    distribution equals the teacher-forced pass's over the sampled caption (to 1e-5), and
    the token it took is that distribution inverted at the uniform. Captions end at varied
    lengths, so rows leave the batch mid-loop; after EOS a row holds the pad id. The loop
    runs in eval mode (dropout off) and gives the model back in train mode."""
    model = _eos_biased(tiny)
    for module in model.modules():  # dropout that would show if sampling ran in train mode
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model.train()
    eos, pad, k = tiny.tokenizer.eos_token_id, model.config.pad_token_id, 5
    states = torch.randn(4, 17, model.config.decoder.n_embd,
                         generator=torch.Generator().manual_seed(0))
    rows, max_new = 4 * k, model.generation_config.max_new_tokens
    uniforms = torch.rand(rows, max_new, generator=torch.Generator().manual_seed(1))
    ids, log_probs = sampling.generate_from_encoding(model, states, k, sample=True, lean=lean,
                                                 return_log_probs=True, uniforms=uniforms)
    assert model.training
    mask, finished = through_first_eos(ids, eos)
    lengths = mask.sum(1)
    assert finished.sum() >= rows - 2 and len(set(lengths.tolist())) >= 4, lengths
    assert (ids[~mask] == pad).all()
    model.eval()
    reference = _teacher_forced_log_softmax(model, states.repeat_interleave(k, 0), ids)
    np.testing.assert_allclose(log_probs[mask].numpy(), reference[mask].numpy(), atol=1e-5)
    expected = sampling.draw(reference.exp().flatten(0, 1), uniforms[:, :ids.shape[1]].reshape(-1, 1))
    assert (ids[mask] == expected.view(ids.shape)[mask]).all()
    # The two step implementations agree token for token.
    model.train()
    other = sampling.generate_from_encoding(model, states, k, sample=True, lean=not lean,
                                        uniforms=uniforms)
    assert torch.equal(ids, other)


@pytest.mark.parametrize("lean", [True, False])
def test_greedy_loop_equals_generate(tiny, lean):
    """Greedy decoding (argmax in the same loop) gives generate's ids exactly, EOS at
    different steps in different rows and the pad id after it included."""
    model = _eos_biased(tiny, bias=-2.0, gain=5.0)
    states = torch.randn(6, 17, model.config.decoder.n_embd,
                         generator=torch.Generator().manual_seed(0))
    ids = sampling.generate_from_encoding(model, states, 1, sample=False, lean=lean)
    start = torch.full((6, 1), model.config.decoder_start_token_id)
    model.eval()
    with torch.no_grad():
        theirs = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states),
                                decoder_input_ids=start, decoder_attention_mask=torch.ones_like(start),
                                do_sample=False, num_beams=1)[:, 1:]
    assert len(set(through_first_eos(theirs, tiny.tokenizer.eos_token_id)[0].sum(1).tolist())) >= 2
    assert torch.equal(ids, theirs)


def test_sampling_ignores_the_init_models_generation_penalties(tiny):
    """Penalties and bans saved in the generation config would change the distribution
    sampled; the loop reads only max_new_tokens from it."""
    model = _eos_biased(tiny)
    states = torch.randn(3, 17, model.config.decoder.n_embd,
                         generator=torch.Generator().manual_seed(0))
    uniforms = torch.rand(6, model.generation_config.max_new_tokens,
                          generator=torch.Generator().manual_seed(2))
    before = sampling.generate_from_encoding(model, states, 2, sample=True, uniforms=uniforms)
    greedy = sampling.generate_from_encoding(model, states, 1, sample=False)
    model.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=1,
                                   bad_words_ids=[[int(t)] for t in before[0, :3]],
                                   temperature=0.3, top_k=2, top_p=0.5, min_new_tokens=20)
    assert torch.equal(sampling.generate_from_encoding(model, states, 2, sample=True,
                                                   uniforms=uniforms), before)
    assert torch.equal(sampling.generate_from_encoding(model, states, 1, sample=False), greedy)


def test_lean_loop_steps_aside_for_gpt2_upcast_attention(tiny):
    """fp16 training upcasts GPT-2's attention (train.py), which the hand-written step does
    not do: then samples come from the decoder's own forward, as the scoring pass does."""
    model = tiny.model()
    assert sampling.lean_gpt2(model.decoder) is not None
    model.decoder.config.reorder_and_upcast_attn = True
    assert sampling.lean_gpt2(model.decoder) is None


def test_prefix_tree_shares_the_states_of_common_prefixes():
    """Two images, 3 samples each (eos = 1). Image 0: rows 0 and 2 are the same caption and
    row 1 shares its first word; image 1: rows 3 and 5 are the same, row 4 never ends.
    Every state, what each token reads, and who sees whom, by hand."""
    ids = torch.tensor([[5, 6, 1], [5, 7, 1], [5, 6, 1],
                        [8, 1, 1], [9, 9, 9], [8, 1, 1]])
    mask, _ = through_first_eos(ids, 1)
    tree = sampling.prefix_tree(ids, mask, 3)
    # image 0: s0 (start), s1 after "5", s2 after "5 6", s3 after "5 7"
    # image 1: s4 (start), s5 after "8", s6 after "9", s7 after "9 9"
    assert tree["token"].tolist() == [-1, 5, 6, 7, -1, 8, 9, 9]
    assert tree["depth"].tolist() == [0, 1, 2, 2, 0, 1, 1, 2]
    assert tree["image"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert tree["slot"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert tree["reads"].tolist() == [0, 1, 2, 0, 1, 3, 0, 1, 2, 4, 5, 4, 6, 7, 4, 5]
    assert tree["size"] == 4
    sees = [[j for j in range(4) if tree["ancestors"][b, i, j]] for b in range(2) for i in range(4)]
    assert sees == [[0], [0, 1], [0, 1, 2], [0, 1, 3],   # "5 7" does not see "5 6"
                    [0], [0, 1], [0, 2], [0, 2, 3]]      # "9" does not see "8"


def _shared_prefix_samples(model, states, k, eos, seed):
    """Sampled captions (varied lengths), then some rows made to repeat another row of the
    same image whole or up to a point, as samples of a trained model do; the last row
    never ends (no EOS within the length limit)."""
    gen = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(states.shape[0] * k, model.generation_config.max_new_tokens,
                          generator=gen)
    ids = sampling.generate_from_encoding(model, states, k, sample=True, uniforms=uniforms)
    ids = torch.cat([ids, torch.randint(eos + 2, eos + 30, (len(ids), 3), generator=gen)], 1)
    ids[1] = ids[0]                          # a repeated caption
    ids[2, :2] = ids[0, :2]                  # a shared start
    ids[k + 1, :1] = ids[k, :1]
    ids[ids == eos] = eos + 1                # no early ends in the copied parts...
    for row, length in enumerate(torch.randint(1, ids.shape[1], (len(ids) - 1,), generator=gen)):
        ids[row, length:] = eos              # ...then each row ends at its own length
    return ids


def _scoring_case(tiny, case):
    """-> (model in eval mode, its EOS id, encoder width, whether the prefix tree serves it)."""
    if case in ("tree", "fallback", "dataparallel"):
        model = _eos_biased(tiny, bias=-1.0, gain=3.0)
        if case == "fallback":  # fp16 training's upcast attention: the model's own forward
            model.decoder.config.reorder_and_upcast_attn = True
        width, eos = model.config.encoder.hidden_size, tiny.tokenizer.eos_token_id
    else:  # "projection": encoder wider than decoder, so enc_to_dec_proj sits between them
        model, width, eos = _small_vision_gpt2(encoder_width=48), 48, 1
    return model.eval(), eos, width, case in ("tree", "projection")


@pytest.mark.parametrize("case", ["tree", "projection", "fallback", "dataparallel"])
def test_scoring_pass_equals_the_models_own_forward(tiny, case, monkeypatch):
    """sample_log_probs against the model's own teacher-forced forward over the padded,
    K-times repeated batch: the same log p of every sampled token (to 1e-5), 0 after a
    caption's EOS, and the same gradients of an advantage-weighted loss for every weight
    and for the encoding (to 1e-4 relative). The prefix tree (fewer decoder states than
    tokens) serves a bare GPT-2, also behind an encoder-to-decoder projection; GPT-2 with
    upcast attention and a model under DataParallel go through their own forward."""
    model, eos, width, tree_expected = _scoring_case(tiny, case)
    k = 4
    base = torch.randn(3, 17, width, generator=torch.Generator().manual_seed(0))
    ids = _shared_prefix_samples(model, base, k, eos, seed=3)
    mask, finished = through_first_eos(ids, eos)
    assert not finished[-1] and finished[:-1].all() and len(set(mask.sum(1).tolist())) > 3
    assert len(sampling.prefix_tree(ids, mask, k)["token"]) < int(mask.sum())
    advantage = torch.randn(len(ids), 1, generator=torch.Generator().manual_seed(4))
    wrapped = torch.nn.DataParallel(model) if case == "dataparallel" else model
    tree_calls = []
    tree_pass = sampling._prefix_tree_log_probs
    monkeypatch.setattr(sampling, "_prefix_tree_log_probs",
                        lambda *a, **kw: tree_calls.append(1) or tree_pass(*a, **kw))

    def run(score):
        model.zero_grad()
        states = base.clone().requires_grad_()
        log_probs = score(states)
        (advantage * log_probs).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return log_probs.detach(), grads, states.grad

    def own_forward(states):
        start = torch.full((len(ids), 1), model.config.decoder_start_token_id)
        logits = model(encoder_outputs=(states.repeat_interleave(k, 0),),
                       decoder_input_ids=torch.cat([start, ids[:, :-1]], 1)).logits
        return torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1) * mask

    theirs, their_grads, their_states = run(own_forward)
    ours, our_grads, our_states = run(
        lambda s: sampling.sample_log_probs(wrapped, model, s, ids, k, mask))
    assert len(tree_calls) == tree_expected
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5)
    assert (ours[~mask] == 0).all() and (ours[mask] < 0).all()
    assert our_grads.keys() == their_grads.keys() and len(our_grads) > 20
    for name, grad in their_grads.items():
        scale = float(grad.norm())
        if scale > 1e-6:  # a bias with no effect (the keys' bias) has a zero-ish gradient
            assert float((our_grads[name] - grad).norm()) <= 1e-4 * scale, name
    assert float((our_states - their_states).norm()) <= 1e-4 * float(their_states.norm())


def test_scoring_pass_under_bf16_autocast_stays_close(tiny):
    """Mixed precision (SCSTTrainer wraps the pass in accelerate's autocast): the prefix tree
    under CPU bf16 autocast against the model's own forward under the same autocast."""
    model, eos, width, _ = _scoring_case(tiny, "tree")
    base = torch.randn(3, 17, width, generator=torch.Generator().manual_seed(0))
    ids = _shared_prefix_samples(model, base, 4, eos, seed=3)
    mask, _ = through_first_eos(ids, eos)
    start = torch.full((len(ids), 1), model.config.decoder_start_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = sampling.sample_log_probs(model, model, base, ids, 4, mask)
        logits = model(encoder_outputs=(base.repeat_interleave(4, 0),),
                       decoder_input_ids=torch.cat([start, ids[:, :-1]], 1)).logits
    theirs = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1) * mask
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=0.05, rtol=0.02)


def test_scoring_pass_refuses_train_mode(tiny):
    model = tiny.model().train()
    ids = torch.tensor([[5, tiny.tokenizer.eos_token_id]])
    mask, _ = through_first_eos(ids, tiny.tokenizer.eos_token_id)
    with pytest.raises(RuntimeError, match="eval mode"):
        sampling.sample_log_probs(model, model, torch.randn(1, 17, 128), ids, 1, mask)


def _small_vision_gpt2(encoder_width=32):
    """A ViT + GPT-2 small enough to start fast in a spawned process (seeded), its pooler
    frozen as train.py freezes it (DDP there runs with find_unused_parameters off)."""
    from transformers import (GPT2Config, ViTConfig, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    from captioning.modeling import freeze

    torch.manual_seed(0)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(image_size=32, patch_size=16, hidden_size=encoder_width, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=64),
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32,
                   bos_token_id=0, eos_token_id=1))
    config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = 0, 1, 1
    model = VisionEncoderDecoderModel(config=config).eval()
    model.generation_config.max_new_tokens = 12
    freeze(model)
    return model


def _rank_batch(rank):
    """Rank `rank`'s images and samples: 2 images x 3 samples, varied lengths, a repeat."""
    gen = torch.Generator().manual_seed(10 + rank)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    ids = torch.randint(2, 50, (6, 5), generator=gen)
    ids[0, 3:] = 1
    ids[3] = ids[2]
    return pixels, ids, through_first_eos(ids, 1)[0]


def _scoring_gradients(model, forward, rank):
    pixels, ids, mask = _rank_batch(rank)
    states = model.encoder(pixel_values=pixels).last_hidden_state
    sampling.sample_log_probs(forward, model, states, ids, 3, mask).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(rank, world, port, out):
    """One process of test_scoring_through_ddp_averages_gradients."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    model = _small_vision_gpt2()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    torch.save(_scoring_gradients(model, ddp, rank), os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_scoring_through_ddp_averages_gradients(tmp_path):
    """The scoring pass runs as the wrapped module's forward, called through DDP, so DDP's
    backward all-reduce is armed: with different samples on two gloo processes, both end
    with the mean of the two single-process gradients, not with their own."""
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    synced = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    alone = []
    for rank in range(2):
        model = _small_vision_gpt2()
        alone.append(_scoring_gradients(model, model, rank))
    assert synced[0].keys() == alone[0].keys() and len(alone[0]) > 20
    differs = 0
    for name in alone[0]:
        mean = (alone[0][name] + alone[1][name]) / 2
        for r in range(2):
            torch.testing.assert_close(synced[r][name], mean, rtol=1e-5, atol=1e-7)
        differs += not torch.allclose(alone[0][name], mean, rtol=1e-3, atol=1e-6)
    assert differs > 10  # the two ranks' own gradients were far from their mean
