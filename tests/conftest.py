"""Shared fixtures, in two tiers.

Fast (in memory, seconds): `tiny` builds a tokenizer, an image processor, a tiny model and
rows of pixels and caption ids in code, no dataloader run.

Slow (real files under a temp dir, marked `slow`): the built-in COCO-layout set, a full
dataloader.py run on it, and a briefly trained model; loopback HTTP servers (their handlers
are in servers.py); torchrun.
`make test-fast` runs `pytest -m "not slow"`; `make test` runs both, as CI does.
Nothing here touches the network.
"""

import dataclasses
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from captioning.modeling import TINY_IMAGE_SIZE  # noqa: E402
from servers import FakeHub, RealHostServer, RoutesHandler  # noqa: E402

TINY_SIZE = (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real files, subprocesses, servers (make test)")
    config.addinivalue_line("markers", "rehearsal: full-size models on the CPU (make rehearse)")
    config.addinivalue_line("markers", "demo: checks on make demo's trained model "
                            "(make check-demo)")
    config.addinivalue_line("markers", "upstream: notices an upstream bug that our code "
                                       "works around; it fails when upstream fixes the bug")


def run_until_file_then_sigkill(cmd, path, timeout=300, env=None):
    """Start `cmd` in its own process group (with `env`, default: this one's), SIGKILL the
    group as soon as `path` exists (a crash mid-run), and fail with the tail of its stderr
    if it ends or stalls before."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env=env)
    deadline = time.time() + timeout
    while not os.path.isfile(path):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, f"no {path} in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# Subprocesses whose checks don't involve METEOR run with this environment: METEOR's Java
# start (~7 s a process) is left out, every other score is computed (captioning/scoring.py).
# The metric tests, the `trained` fixture and the runs that compare metrics keep METEOR.
NO_METEOR = {"CAPTIONING_SKIP_METEOR": "1"}


def pytest_sessionstart(session):
    os.environ.pop("CAPTIONING_SKIP_METEOR", None)  # only where a test asks for it


def run_train(data, out, runs_dir, *extra, nproc=1, check=True, meteor=True):
    """train.py as a subprocess on `data` into `out` (under torchrun with nproc > 1, one
    thread per process), greedy captions, no previews, a loss logged every step; `extra`
    comes last, so it may override these. meteor=False: CAPTIONING_SKIP_METEOR=1, for runs
    whose checks don't involve METEOR. -> the CompletedProcess; with check, exit 0."""
    cmd = [os.path.join(ROOT, "train.py"), "--data_path", str(data), "--output_dir", str(out),
           "--runs_dir", str(runs_dir), "--num_beams", "1", "--num_preview_images", "0",
           "--logging_steps", "1", "--quiet", *extra]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({} if meteor else NO_METEOR)}
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=900,
                       env=env)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- fast tier

@dataclasses.dataclass
class Tiny:
    tokenizer: object
    processor: object
    rows: list  # {"pixel_values": uint8 (3, H, W), "captions": [...], "caption_ids": [[...]]}

    def model(self, seed=0, **kwargs):
        import torch

        from captioning.modeling import build_model

        torch.manual_seed(seed)
        return build_model("tiny", "tiny", self.tokenizer, TINY_SIZE, **kwargs)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A BPE trained on the shapes captions, a 64 px processor, and 24 rows of random
    pixels, each with 2-5 tokenised captions."""
    from captioning import shapes
    from captioning.modeling import (load_image_processor, tokenize_captions,
                                     train_tiny_tokenizer)

    words = [t.format(color=c, shape=s, pos=p) for t in shapes.TEMPLATES
             for c in shapes.COLORS for s in shapes.SHAPES for p in shapes.POSITIONS]
    tokenizer = train_tiny_tokenizer(words, str(tmp_path_factory.mktemp("bpe")))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        captions = [words[j] for j in rng.choice(len(words), int(rng.integers(2, 6)))]
        rows.append({"pixel_values": rng.integers(0, 256, (3, *TINY_SIZE), dtype=np.uint8),
                     "image_id": i, "file_name": f"{i}.jpg", "captions": captions,
                     "caption_ids": tokenize_captions(captions, tokenizer, 32)})
    return Tiny(tokenizer, load_image_processor("tiny"), rows)


# ----------------------------------------------------------------------------- slow tier

@pytest.fixture(scope="session")
def shapes_coco(tmp_path_factory):
    from captioning import shapes

    root = str(tmp_path_factory.mktemp("shapes_coco"))
    shapes.make_shapes_coco(root, num_train=60, num_val=30, seed=0)
    return root


PREPARED_ROWS = {"train": 40, "validation": 8, "test": 10}


@pytest.fixture(scope="session")
def prepared(shapes_coco, tmp_path_factory):
    import dataloader

    out = str(tmp_path_factory.mktemp("prep") / "data")
    rc = dataloader.main(["--source", "coco", "--coco_dir", shapes_coco, "--save_path", out,
                          "--encoder_model", "tiny", "--decoder_model", "tiny",
                          "--limit_data", str(PREPARED_ROWS["train"]),
                          "--val_size", str(PREPARED_ROWS["validation"]),
                          "--test_size", str(PREPARED_ROWS["test"]),
                          "--num_proc", "2", "--quiet"])
    assert rc == 0
    return out


PUSH_REPO = "someone/tiny-captioner"
PUSHED = {}  # what the `trained` run's --push_to_hub handed to the Hub: repo, files


@pytest.fixture(scope="session")
def trained(prepared, tmp_path_factory):
    """A briefly trained model. The run also pushes to the Hub (--push_to_hub): the repo is
    created through huggingface_hub's own HTTP call, against FakeHub on 127.0.0.1; only the
    upload (create_commit) is replaced by a recorder, so the push costs no second training
    run. `pushed` holds what the Hub was given."""
    from unittest import mock

    from huggingface_hub import HfApi, constants

    import train

    def create_commit(self, repo_id, operations, **kwargs):
        PUSHED["operations"] = {op.path_in_repo: op for op in operations}
        return SimpleNamespace(commit_url=f"{hub.url}/{repo_id}/commit/0")  # no network

    base = tmp_path_factory.mktemp("train")
    out = str(base / "model")
    hub = FakeHub()
    with mock.patch.object(constants, "ENDPOINT", hub.url), \
            mock.patch.object(HfApi, "create_commit", create_commit):
        rc = train.main(["--data_path", prepared, "--output_dir", out, "--epochs", "2",
                         "--batch_size", "8", "--lr", "1e-3", "--runs_dir", str(base / "runs"),
                         "--run_name", "t", "--logging_steps", "1", "--num_beams", "2",
                         "--push_to_hub", PUSH_REPO, "--quiet"])
    hub.shutdown()
    PUSHED["created"] = hub.created
    assert rc == 0
    return out, str(base / "runs" / "t")


@pytest.fixture(scope="session")
def pushed(trained):
    """{"created": [the JSON bodies FakeHub's repo creation got], "operations":
    {path_in_repo: CommitOperationAdd}} from the `trained` run's --push_to_hub."""
    return PUSHED


@pytest.fixture(scope="session")
def split_runs(prepared, tmp_path_factory):
    """Three short train.py runs (subprocesses) over one effective batch of 8 images, with a
    negligible learning rate so that all of them evaluate the initial weights:
    `one`, 1 process at batch 8, 2 steps; `ddp`, torchrun with 2 processes at batch 4, 2
    steps; `acc`, batch 4 with 2 accumulation steps, 1 step (only its logged first step is
    checked: no METEOR). One and ddp evaluate with batches of 3 (ragged shards), with
    METEOR, and write previews. `ddp_stdout` is ddp's stdout, `runs`
    the TensorBoard root (runs/one, runs/ddp). Shared by test_training_invariants.py (the
    loss under a batch split, sharded evaluation) and test_resume.py (torchrun writes its
    outputs once), instead of each training its own."""
    base = tmp_path_factory.mktemp("split_runs")
    runs = base / "runs"
    common = ("--lr", "1e-12", "--num_preview_images", "8")
    shared = (*common, "--max_steps", "2", "--save_steps", "2", "--eval_batch_size", "3")
    run_train(prepared, base / "one", runs, *shared, "--batch_size", "8", "--run_name", "one")
    ddp = run_train(prepared, base / "ddp", runs, *shared, "--batch_size", "4",
                    "--run_name", "ddp", nproc=2)
    run_train(prepared, base / "acc", runs, *common, "--max_steps", "1", "--save_steps", "1",
              "--max_eval_samples", "2", "--batch_size", "4",
              "--gradient_accumulation_steps", "2", "--run_name", "acc", meteor=False)
    return SimpleNamespace(one=base / "one", ddp=base / "ddp", acc=base / "acc",
                           ddp_stdout=ddp.stdout, runs=runs)


@pytest.fixture(scope="session")
def hub_shaped_dirs(tmp_path_factory):
    """Local folders shaped like the Hub repos google/vit-base-patch16-224-in21k and gpt2:
    a ViTModel with preprocessor_config.json, and a GPT2LMHeadModel with vocab.json and
    merges.txt and no pad token, as the real gpt2 repo has."""
    import json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import (GPT2Config, GPT2LMHeadModel, ViTConfig, ViTImageProcessor,
                              ViTModel)

    from captioning import shapes

    base = tmp_path_factory.mktemp("hub")
    vit_dir, gpt_dir = str(base / "vit"), str(base / "gpt2")
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=37)).save_pretrained(vit_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit_dir)

    bpe = ByteLevelBPETokenizer()
    words = [f"{c} {s} in the {p}" for c in shapes.COLORS for s in shapes.SHAPES
             for p in shapes.POSITIONS]
    bpe.train_from_iterator(words * 5, vocab_size=600, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    os.makedirs(gpt_dir)
    bpe.save_model(gpt_dir)
    vocab = json.load(open(os.path.join(gpt_dir, "vocab.json")))
    eos = vocab["<|endoftext|>"]
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2,
                               n_positions=64, bos_token_id=eos, eos_token_id=eos)
                    ).save_pretrained(gpt_dir)
    return vit_dir, gpt_dir


@pytest.fixture(scope="session")
def nlpconnect_dir(hub_shaped_dirs, tmp_path_factory):
    """A trained-captioner folder shaped like nlpconnect/vit-gpt2-image-captioning: a plain
    GPT-2 tokenizer (vocab.json, merges.txt) with no pad token, a ViTImageProcessor, and the
    generation settings in config.json with no generation_config.json."""
    import json
    import shutil

    from transformers import AutoConfig, VisionEncoderDecoderModel

    vit_dir, gpt_dir = hub_shaped_dirs
    cfg = AutoConfig.from_pretrained(gpt_dir)
    cfg.is_decoder, cfg.add_cross_attention = True, True
    model = VisionEncoderDecoderModel.from_encoder_decoder_pretrained(vit_dir, gpt_dir,
                                                                      decoder_config=cfg)
    d = tmp_path_factory.mktemp("nlpconnect")
    model.save_pretrained(d)
    os.remove(d / "generation_config.json")
    vocab = json.load(open(os.path.join(gpt_dir, "vocab.json")))
    eos = vocab["<|endoftext|>"]
    config = json.load(open(d / "config.json"))
    config.update(decoder_start_token_id=eos, pad_token_id=eos, eos_token_id=eos,
                  bos_token_id=eos, max_length=16, num_beams=4)
    json.dump(config, open(d / "config.json", "w"))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(gpt_dir, name), d / name)
    json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024,
               "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}, open(d / "tokenizer_config.json", "w"))
    shutil.copy(os.path.join(vit_dir, "preprocessor_config.json"), d)
    return str(d)


@pytest.fixture()
def http_server():
    """A server on 127.0.0.1 serving `routes[path] = (status, body, content_type[, options])`,
    options: delay (s), extra headers, no_length (omit Content-Length), length (claim this
    Content-Length: a larger one than the body makes a truncated response).
    Every requested path is appended to `routes.log`."""

    class Routes(dict):
        log = []

    routes = Routes()
    handler = type("H", (RoutesHandler,), {"routes": routes, "log": routes.log})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", routes
    server.shutdown()
    server.server_close()


@pytest.fixture()
def real_host():
    """A factory: real_host(files, ranges=True) -> a started RealHostServer."""
    servers = []

    def start(files, ranges=True):
        server = RealHostServer(files, ranges)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
