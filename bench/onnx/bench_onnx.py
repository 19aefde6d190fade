"""ONNX Runtime vs torch, captioning on the CPU, side by side in one run (issue 15, ONNX part).

    ONNX_WORK=/some/dir  $ONNX_WORK/venv/bin/python bench/onnx/bench_onnx.py \
        [--images 8] [--images_b1 4] [--repeats 3] [--threads 2]

Not part of the product (ONNX was left out by this measurement; README "ONNX"). It needs two
virtual environments under $ONNX_WORK (default bench/out/onnx, ~9 GB with the graphs):
venv  = requirements.txt + onnxruntime 1.32.0, onnx 1.23.2, onnxscript 0.7.2;
venvx = optimum-onnx 0.1.0 (optimum 2.1.0), which needs transformers<4.58 (4.57.6 here).

The full-size architecture (ViT-B/16 at 224 px + GPT-2 124M, 50,257 tokens, random weights),
built by bench/cpu.py's build_full_size (torch.manual_seed(0)) into
$ONNX_WORK/model/captioner. Missing artefacts are (re)built first (slow: minutes each):
  onnx_fp32/        optimum-onnx 0.1.0 export (venvx: transformers 4.57.6), task
                    image-to-text-with-past: encoder_model + decoder_model + decoder_with_past
                    (the GPT-2 decoder caches self-attention only; cross-attention K/V of the
                    197 image tokens are recomputed at every step)
  onnx_int8/        the same graphs, onnxruntime quantize_dynamic (int8 per-channel weights)
  onnx_custom_fp32/ export_custom.py (torch.onnx, TorchScript exporter): encoder_cross (ViT +
                    the cross-attention K/V of all 12 layers, once per image) + decoder_step
                    (self AND cross caches as explicit inputs, like transformers 5.24's
                    EncoderDecoderCache)
  onnx_custom_int8/ the same, quantize_dynamic

Sides (each its own process, so its peak RSS is its own; all alive at once and run round-robin,
so the machine's load drifts over all sides alike):
  torch fp32 / torch int8   model.generate through captioning.captioner.load_captioner (the
                            path inference.py takes; int8 = captioning.quantize), transformers 5.24
  ort-opt fp32 / int8       ONNX Runtime over optimum's graphs, beam search written here
  ort-kv fp32 / int8        ONNX Runtime over the custom graphs, the same beam search
  optimum-gen fp32          optimum's ORTModelForVision2Seq.generate (transformers 4.57 in venvx):
                            checks the beam search written here against HF's on the same graphs
Same work for every side: the same normalised pixels (uint8 noise, rng 0), 1 warm-up call
(1 image, beam 3, 16 tokens), then per repeat one pass over --images_b1 at batch 1 and one
over --images at batch 8; beam 3, min_new_tokens = max_new_tokens = 16; best of --repeats.
--threads (default 2) everywhere (torch.set_num_threads; ORT intra_op, inter_op 1).
Agreement: generated token ids of each side vs torch fp32 / torch int8, whole sequences
identical (%) and tokens identical (%).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MAIN = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.environ.get("ONNX_WORK", os.path.join(MAIN, "bench", "out", "onnx"))
SCRIPTS = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "model", "captioner")
VENV = os.path.join(HERE, "venv", "bin", "python")
VENVX = os.path.join(HERE, "venvx", "bin", "python")
BEAMS, NEW, BOS, EOS = 3, 16, 50256, 50256
THREADS = int(os.environ.get("BENCH_THREADS", "2"))  # set by --threads for the workers
SIDES = ["torch-fp32", "torch-int8", "ort-opt-fp32", "ort-opt-int8", "ort-kv-fp32",
         "ort-kv-int8", "optimum-gen-fp32"]
DIRS = {"ort-opt-fp32": "onnx_fp32", "ort-opt-int8": "onnx_int8",
        "ort-kv-fp32": "onnx_custom_fp32", "ort-kv-int8": "onnx_custom_int8",
        "optimum-gen-fp32": "onnx_fp32"}


# ----------------------------------------------------------------------------- artefacts

def sh(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(["nice", "-n", "5", *cmd], check=True, cwd=HERE)


def build_artefacts():
    os.makedirs(HERE, exist_ok=True)
    if not os.path.exists(os.path.join(MODEL, "model.safetensors")):
        sh([VENV, "-c", f"import sys, torch; sys.path[:0] = [{os.path.join(MAIN, 'bench')!r}, "
            f"{MAIN!r}]; torch.manual_seed(0); import cpu; "
            f"cpu.build_full_size({os.path.join(HERE, 'model')!r})"])
    if not os.path.exists(os.path.join(HERE, "onnx_fp32", "decoder_with_past_model.onnx")):
        sh([os.path.join(HERE, "venvx", "bin", "optimum-cli"), "export", "onnx", "--model", MODEL,
            "--task", "image-to-text-with-past", "--framework", "pt", "--device", "cpu",
            "onnx_fp32"])
    if not os.path.exists(os.path.join(HERE, "onnx_custom_fp32", "decoder_step.onnx")):
        sh([VENV, os.path.join(SCRIPTS, "export_custom.py"), MODEL, "onnx_custom_fp32"])
    if not os.path.exists(os.path.join(HERE, "onnx_custom_int8", "decoder_step.onnx")):
        sh([VENV, os.path.join(SCRIPTS, "quantize_ort.py"), "onnx_custom_fp32", "onnx_custom_int8", "encoder_cross.onnx",
            "decoder_step.onnx"])
    if not os.path.exists(os.path.join(HERE, "onnx_int8", "decoder_with_past_model.onnx")):
        sh([VENV, os.path.join(SCRIPTS, "quantize_ort.py"), "onnx_fp32", "onnx_int8", "encoder_model.onnx",
            "decoder_model.onnx", "decoder_with_past_model.onnx"])


# ----------------------------------------------------------------------------- ORT sides

def ort_session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def log_softmax(x):
    import numpy as np

    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def beam_search(encode, step, pixels):
    """HF beam search semantics for this setting: log_softmax, then min_new_tokens (EOS at
    -inf while fewer than 16 new tokens, i.e. at every step), accumulated log-probs, the top 3
    of beams x vocab per image (HF keeps the top 2x3 and drops EOS ones: none here), the
    caches reordered by beam; all hypotheses end at the same length, so the best is the
    highest score (length penalty 1.0 divides all by the same length). -> ids (B, 1 + 16)."""
    import numpy as np

    b = len(pixels)
    n = b * BEAMS
    state = encode(pixels)  # arrays at batch b -> expanded to b * beams
    state = {k: np.ascontiguousarray(np.repeat(v, BEAMS, axis=0)) for k, v in state.items()}
    ids = np.full((n, 1), BOS, dtype=np.int64)
    scores = np.zeros((b, BEAMS), dtype=np.float32)
    scores[:, 1:] = -1e9
    past = None
    rows = np.arange(b)[:, None]
    for _ in range(NEW):
        logits, past = step(ids, past, state)
        logp = log_softmax(logits.astype(np.float32))
        logp[:, EOS] = -np.inf
        vocab = logp.shape[-1]
        cand = (logp + scores.reshape(n, 1)).reshape(b, BEAMS * vocab)
        top = np.argpartition(-cand, BEAMS, axis=1)[:, :BEAMS]
        top = np.take_along_axis(top, np.argsort(-cand[rows, top], axis=1, kind="stable"), 1)
        scores = cand[rows, top]
        src = (rows * BEAMS + top // vocab).ravel()
        ids = np.concatenate([ids[src], (top % vocab).reshape(n, 1)], axis=1)
        past = [p[src] for p in past]
    return ids[::BEAMS]


class OrtOptimum:
    """optimum's three graphs: encoder_model, decoder_model (first step), decoder_with_past."""

    def __init__(self, folder):
        self.enc = ort_session(os.path.join(folder, "encoder_model.onnx"))
        self.dec = ort_session(os.path.join(folder, "decoder_model.onnx"))
        self.dwp = ort_session(os.path.join(folder, "decoder_with_past_model.onnx"))
        self.past_names = [i.name for i in self.dwp.get_inputs() if i.name.startswith("past")]

    def encode(self, pixels):
        return {"encoder_hidden_states": self.enc.run(None, {"pixel_values": pixels})[0]}

    def step(self, ids, past, state):
        feed = {"input_ids": ids[:, -1:], **state}
        if past is None:
            out = self.dec.run(None, feed)
        else:
            out = self.dwp.run(None, {**feed, **dict(zip(self.past_names, past))})
        return out[0][:, -1, :], out[1:]

    def generate(self, pixels):
        return beam_search(self.encode, self.step, pixels)


class OrtKV:
    """export_custom.py's graphs: encoder_cross (cross K/V once) + decoder_step (both caches)."""

    def __init__(self, folder):
        self.enc = ort_session(os.path.join(folder, "encoder_cross.onnx"))
        self.dec = ort_session(os.path.join(folder, "decoder_step.onnx"))
        self.cross_names = [o.name for o in self.enc.get_outputs()]
        self.past_names = [i.name for i in self.dec.get_inputs() if i.name.startswith("past")]

    def encode(self, pixels):
        return dict(zip(self.cross_names, self.enc.run(None, {"pixel_values": pixels})))

    def step(self, ids, past, state):
        import numpy as np

        if past is None:
            past = [np.zeros((len(ids), 12, 0, 64), np.float32)] * len(self.past_names)
        out = self.dec.run(None, {"input_ids": ids[:, -1:], **state,
                                  **dict(zip(self.past_names, past))})
        return out[0], out[1:]

    def generate(self, pixels):
        return beam_search(self.encode, self.step, pixels)


# ----------------------------------------------------------------------------- torch / optimum sides

class Torch:
    def __init__(self, mode):
        import torch

        sys.path.insert(0, MAIN)
        from captioning.captioner import load_captioner

        torch.set_num_threads(THREADS)
        self.model, self.tokenizer, _ = load_captioner(MODEL, "cpu", mode)
        self.torch = torch

    def generate(self, pixels):
        with self.torch.inference_mode():
            out = self.model.generate(pixel_values=self.torch.from_numpy(pixels), num_beams=BEAMS,
                                      min_new_tokens=NEW, max_new_tokens=NEW)
        return out.numpy()


class OptimumGen:
    def __init__(self, folder):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForVision2Seq

        torch.set_num_threads(THREADS)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
        self.model = ORTModelForVision2Seq.from_pretrained(folder, session_options=so,
                                                           use_cache=True, use_merged=False)
        self.torch = torch

    def generate(self, pixels):
        out = self.model.generate(pixel_values=self.torch.from_numpy(pixels), num_beams=BEAMS,
                                  min_new_tokens=NEW, max_new_tokens=NEW)
        return out.numpy()


def decoder(side):
    """ids -> texts with the model's tokenizer (what inference.py does after generate)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL if not side.startswith("optimum") else
                                        os.path.join(HERE, "onnx_fp32"))
    return lambda ids: tok.batch_decode(ids, skip_special_tokens=True)


def worker(side, pixels_path):
    import numpy as np

    logging_off()
    t0 = time.perf_counter()
    if side.startswith("torch"):
        runner = Torch(side.split("-")[1])
    elif side.startswith("optimum"):
        runner = OptimumGen(os.path.join(HERE, DIRS[side]))
    elif side.startswith("ort-opt"):
        runner = OrtOptimum(os.path.join(HERE, DIRS[side]))
    else:
        runner = OrtKV(os.path.join(HERE, DIRS[side]))
    decode = decoder(side)
    pixels = np.load(pixels_path)
    decode(runner.generate(pixels[:1]))  # warm-up, 1 call
    size = (sum(os.path.getsize(os.path.join(HERE, DIRS[side], f))
                for f in os.listdir(os.path.join(HERE, DIRS[side])) if f.endswith(".onnx"))
            if side in DIRS else None)
    reply({"ready": side, "load_s": time.perf_counter() - t0, "onnx_mb": size and size / 2**20})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        batch, count = cmd["batch"], cmd["count"]
        ids = []
        start = time.perf_counter()
        for first in range(0, count, batch):
            out = runner.generate(np.ascontiguousarray(pixels[first:first + batch]))
            decode(out)
            ids += out.tolist()
        seconds = time.perf_counter() - start
        reply({"seconds": seconds, "ids": ids,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def reply(obj):
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def logging_off():
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
    except ImportError:
        pass


class Worker:
    def __init__(self, side, pixels_path):
        python = VENVX if side.startswith("optimum") else VENV
        self.side = side
        self.p = subprocess.Popen([python, os.path.abspath(__file__), "--side", side,
                                   "--pixels", pixels_path], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def read(self):
        for line in self.p.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"{self.side}: worker died (rc {self.p.wait()})")

    def run(self, batch, count):
        self.p.stdin.write(json.dumps({"op": "run", "batch": batch, "count": count}) + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self):
        self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.p.stdin.close()
        self.p.wait()


# ----------------------------------------------------------------------------- main

def agreement(a, b):
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return 100 * float((a == b).all(axis=1).mean()), 100 * float((a == b).mean())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8, help="images at batch 8")
    p.add_argument("--images_b1", type=int, default=4, help="images at batch 1")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per side and batch (best)")
    p.add_argument("--sides", nargs="+", default=SIDES, choices=SIDES)
    p.add_argument("--threads", type=int, default=2,
                   help="intra-op threads of every side (torch.set_num_threads, ORT intra_op)")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--pixels", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return worker(args.side, args.pixels)
    os.environ["BENCH_THREADS"] = str(args.threads)
    global THREADS
    THREADS = args.threads

    import numpy as np

    began = time.perf_counter()
    build_artefacts()
    sys.path.insert(0, MAIN)
    from transformers import AutoImageProcessor

    from captioning.images import normalize_pixels

    processor = AutoImageProcessor.from_pretrained(MODEL)
    raw = np.random.default_rng(0).integers(0, 256, (max(args.images, args.images_b1), 3, 224, 224),
                                            np.uint8)
    pixels_path = os.path.join(HERE, "pixels.npy")
    np.save(pixels_path, normalize_pixels(raw, processor).numpy())  # inference.py's normalisation

    import onnxruntime
    import torch
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__} (optimum-gen: "
          f"4.57.6 in venvx), onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPUs, "
          f"{THREADS} threads per side; load average at start {os.getloadavg()[0]:.1f}")
    print(f"full-size ViT-B/16 + GPT-2 124M, random weights; beam {BEAMS}, {NEW} new tokens "
          f"(min = max); batch 1: {args.images_b1} images, batch 8: {args.images} images; "
          f"1 warm-up call; best of {args.repeats}, sides run round-robin", flush=True)
    workers, info = {}, {}
    for side in args.sides:  # started one at a time so that loads don't overlap
        workers[side] = Worker(side, pixels_path)
        info[side] = workers[side].read()
        print(f"  {side}: loaded + warmed up in {info[side]['load_s']:.0f} s", flush=True)
    best = {s: {1: 1e9, 8: 1e9} for s in args.sides}
    ids = {s: {} for s in args.sides}
    rss = {}
    for rep in range(args.repeats):
        for batch, count in ((1, args.images_b1), (8, args.images)):
            for side in args.sides:
                r = workers[side].run(batch, count)
                best[side][batch] = min(best[side][batch], r["seconds"])
                ids[side].setdefault(batch, r["ids"])
                rss[side] = r["peak_rss_mb"]
                print(f"  rep {rep + 1} batch {batch} {side}: {count / r['seconds']:.3f} img/s "
                      f"(load avg {os.getloadavg()[0]:.1f})", flush=True)
    for w in workers.values():
        w.close()

    rate = {s: {b: n / best[s][b] for b, n in ((1, args.images_b1), (8, args.images))}
            for s in args.sides}
    torch_best = {b: max((s for s in args.sides if s.startswith("torch")),
                         key=lambda s: rate[s][b], default=None) for b in (1, 8)}
    print()
    print(f"{'side':<17} {'b1 img/s':>9} {'b8 img/s':>9} {'b1 vs fp32':>10} {'b8 vs fp32':>10} "
          f"{'b1 vs best torch':>16} {'b8 vs best torch':>16} {'peak RSS MB':>11} {'onnx MB':>8}")
    ref = "torch-fp32" if "torch-fp32" in args.sides else args.sides[0]
    for s in args.sides:
        tb = [rate[s][b] / rate[torch_best[b]][b] if torch_best[b] else float("nan")
              for b in (1, 8)]
        onnx_mb = info[s]["onnx_mb"]
        print(f"{s:<17} {rate[s][1]:>9.3f} {rate[s][8]:>9.3f} {rate[s][1] / rate[ref][1]:>9.2f}x "
              f"{rate[s][8] / rate[ref][8]:>9.2f}x {tb[0]:>15.2f}x {tb[1]:>15.2f}x "
              f"{rss[s]:>11,.0f} {onnx_mb and f'{onnx_mb:,.0f}' or '-':>8}")
    print(f"best torch mode: batch 1 {torch_best[1]}, batch 8 {torch_best[8]}")
    print()
    print("agreement of generated ids (first timed pass; batch 1 and batch 8 pooled): "
          "sequences identical % / tokens identical %")
    for s in args.sides:
        cells = []
        for r in ("torch-fp32", "torch-int8"):
            if r in args.sides and r != s:
                a = ids[s][1] + ids[s][8]
                b = ids[r][1] + ids[r][8]
                seq, tok = agreement(a, b)
                cells.append(f"vs {r}: {seq:5.1f}% / {tok:5.1f}%")
        same = agreement(ids[s][1], ids[s][8][:len(ids[s][1])])
        cells.append(f"batch 1 vs batch 8 (same images): {same[0]:.0f}% / {same[1]:.1f}%")
        print(f"  {s:<17} " + "; ".join(cells))
    print(f"  torch-fp32 ids of image 0: {ids[ref][8][0]}")
    print(f"bench took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
