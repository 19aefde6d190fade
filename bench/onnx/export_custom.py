"""torch.onnx export of the captioner as two graphs whose decoder keeps BOTH caches:
  encoder_cross.onnx : pixel_values -> cross-attention K/V of all 12 GPT-2 layers (computed once)
  decoder_step.onnx  : input_ids (N,1), self K/V past (N,12,T,64) x24, cross K/V (N,12,197,64) x24
                       -> logits (N,V), present self K/V (N,12,T+1,64) x24
optimum's GPT-2 decoder graph caches only self-attention and recomputes the cross-attention
K/V projection of the 197 image tokens at every step; torch (transformers 5.24's
EncoderDecoderCache) does not. This export puts ORT on the same footing.
    venv/bin/python export_custom.py MODEL_DIR OUT_DIR
"""
import math, os, sys, time
import torch
from transformers import VisionEncoderDecoderModel

D, H, HD = 768, 12, 64


def heads(x):  # (N, T, D) -> (N, H, T, HD)
    n, t, _ = x.shape
    return x.view(n, t, H, HD).transpose(1, 2)


class EncoderCross(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.vit, self.blocks = m.encoder, m.decoder.transformer.h

    def forward(self, pixel_values):
        enc = self.vit(pixel_values=pixel_values).last_hidden_state
        out = []
        for b in self.blocks:
            k, v = b.crossattention.c_attn(enc).split(D, dim=2)
            out += [heads(k), heads(v)]
        return tuple(out)


class DecoderStep(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        g = m.decoder
        self.wte, self.wpe, self.blocks, self.ln_f = g.transformer.wte, g.transformer.wpe, g.transformer.h, g.transformer.ln_f
        self.lm_head = g.lm_head
        self.scale = 1.0 / math.sqrt(HD)

    def attend(self, q, k, v):
        w = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
        o = torch.matmul(w, v)  # (N, H, 1, HD)
        return o.transpose(1, 2).reshape(o.shape[0], 1, D)

    def forward(self, input_ids, *caches):
        L = len(self.blocks)
        past, cross = caches[:2 * L], caches[2 * L:]
        pos = torch.zeros_like(input_ids) + past[0].shape[2]  # the one new token's position
        h = self.wte(input_ids) + self.wpe(pos)
        present = []
        for i, b in enumerate(self.blocks):
            q, k, v = b.attn.c_attn(b.ln_1(h)).split(D, dim=2)
            k = torch.cat([past[2 * i], heads(k)], dim=2)
            v = torch.cat([past[2 * i + 1], heads(v)], dim=2)
            present += [k, v]
            h = h + b.attn.c_proj(self.attend(heads(q), k, v))
            q = b.crossattention.q_attn(b.ln_cross_attn(h))
            h = h + b.crossattention.c_proj(self.attend(heads(q), cross[2 * i], cross[2 * i + 1]))
            h = h + b.mlp(b.ln_2(h))
        logits = self.lm_head(self.ln_f(h))[:, -1, :]
        return (logits, *present)


def check(m, enc_mod, dec_mod):
    """The custom step loop reproduces HF's logits (greedy, 5 steps)."""
    torch.manual_seed(1)
    px = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        cross = enc_mod(px)
        past = [torch.zeros(2, H, 0, HD) for _ in range(24)]
        ids = torch.full((2, 1), m.generation_config.decoder_start_token_id)
        enc = m.encoder(pixel_values=px).last_hidden_state
        worst = 0.0
        for step in range(5):
            logits, *past = dec_mod(ids[:, -1:], *past, *cross)
            ref = m.decoder(input_ids=ids, encoder_hidden_states=enc).logits[:, -1]
            worst = max(worst, (logits - ref).abs().max().item())
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    print(f"custom step vs HF decoder, max |dlogit| over 5 steps: {worst:.2e}")
    assert worst < 1e-3


def main(model_dir, out_dir):
    torch.set_num_threads(2)
    os.makedirs(out_dir, exist_ok=True)
    m = VisionEncoderDecoderModel.from_pretrained(model_dir).eval()
    enc_mod, dec_mod = EncoderCross(m).eval(), DecoderStep(m).eval()
    check(m, enc_mod, dec_mod)
    L = len(dec_mod.blocks)
    kv = [f"{n}.{i}.{t}" for i in range(L) for t in ("key", "value") for n in ("x",)]
    cross_names = [f"cross.{i}.{t}" for i in range(L) for t in ("key", "value")]
    past_names = [f"past.{i}.{t}" for i in range(L) for t in ("key", "value")]
    present_names = [f"present.{i}.{t}" for i in range(L) for t in ("key", "value")]
    t = time.time()
    with torch.no_grad():
        torch.onnx.export(enc_mod, (torch.randn(1, 3, 224, 224),), os.path.join(out_dir, "encoder_cross.onnx"),
                          input_names=["pixel_values"], output_names=cross_names,
                          dynamic_axes={"pixel_values": {0: "batch"}, **{n: {0: "batch"} for n in cross_names}},
                          opset_version=17, dynamo=False)
        print(f"encoder_cross.onnx exported in {time.time() - t:.0f} s")
        t = time.time()
        n = 3
        args = (torch.full((n, 1), 50256), *[torch.randn(n, H, 4, HD) for _ in range(2 * L)],
                *[torch.randn(n, H, 197, HD) for _ in range(2 * L)])
        torch.onnx.export(dec_mod, args, os.path.join(out_dir, "decoder_step.onnx"),
                          input_names=["input_ids", *past_names, *cross_names],
                          output_names=["logits", *present_names],
                          dynamic_axes={"input_ids": {0: "batch"}, "logits": {0: "batch"},
                                        **{p: {0: "batch", 2: "past"} for p in past_names},
                                        **{p: {0: "batch", 2: "total"} for p in present_names},
                                        **{c: {0: "batch"} for c in cross_names}},
                          opset_version=17, dynamo=False)
        print(f"decoder_step.onnx exported in {time.time() - t:.0f} s")


if __name__ == "__main__":
    main(*sys.argv[1:3])
