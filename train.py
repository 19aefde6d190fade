"""Train the ViT + GPT-2 captioner on data written by dataloader.py.

    python train.py --data_path ./processed_data --epochs 10

The encoder and decoder are the ones dataloader.py recorded in manifest.json. Every epoch
the model captions each validation image once (generation settings from
model.generation_config) and is scored against all of that image's references; the best
epoch by --metric_for_best_model is kept. At the end the test split is captioned and scored.
Written to --output_dir: the model in Hugging Face format (safetensors, config,
generation_config, tokenizer, preprocessor_config), metrics.json, metrics.md,
loss_curve.png, test_predictions.json, test_results_coco.json and a model card (README.md,
whose usage snippet loads the directory). TensorBoard logs go to runs/<run_name>/.
--push_to_hub REPO_ID uploads all but the checkpoints to the Hugging Face Hub.

Training uses one caption per image per epoch, drawn from that image's ~5 as a pure
function of (seed, epoch, image): pixels are stored once per image, over epochs the model
sees every phrasing, and a resumed run draws exactly what the uninterrupted one would have.
The loss is the mean over every caption token of the effective batch, whatever the
accumulation steps and number of processes.

    python train.py --data_path ./processed_data --init_from ./ce_model --scst

continues a cross-entropy-trained model with self-critical sequence training: sampled
captions rewarded by their CIDEr-D against the image's references (captioning/scst.py).
"""

import argparse
import os
import shutil
import sys

from captioning.checkpoints import checkpoint_to_resume, tensorboard_dir
from captioning.cli import (HelpFormatter, configure_runtime, error_exit, non_negative_int,
                            positive_float, positive_int, quiet_transformers)
from captioning.devices import choose_precision, cuda_capability, pick_device
from captioning.model_card import write_card
from captioning.modeling import (DEFAULT_NUM_BEAMS, build_model, load_image_processor,
                                 load_tokenizer)
from captioning.store import SPLITS, Manifest, load_split, write_json
from captioning.scoring import SKIP_METEOR_ENV, meteor_skipped
from metrics import METRIC_NAMES, TABLE_METRICS, compute_caption_metrics, java_available


# ----------------------------------------------------------------------------- arguments

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data_path", default="./processed_data", help="output of dataloader.py")
    p.add_argument("--output_dir", default="./image_captioning_model",
                   help="where the model, checkpoints and metrics.json are written")
    p.add_argument("--overwrite", action="store_true",
                   help="train into a non-empty --output_dir, deleting what is there")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --output_dir "
                        "(weights, optimizer, scheduler and data position, exactly)")
    p.add_argument("--resume_from", default=None, help="continue from this checkpoint directory")
    p.add_argument("--init_from", default=None,
                   help="start from this trained VisionEncoderDecoderModel (train.py's output, "
                        "or a folder or Hub id shaped like nlpconnect/vit-gpt2-image-captioning) "
                        "and its generation settings, instead of building a new model "
                        "(default: the manifest's --from_model, if dataloader.py had one)")
    p.add_argument("--epochs", type=float, default=10, help="training epochs")
    p.add_argument("--max_steps", type=int, default=-1,
                   help="stop after this many optimizer steps (overrides --epochs when > 0)")
    p.add_argument("--batch_size", type=positive_int, default=32,
                   help="training images per step and process")
    p.add_argument("--eval_batch_size", type=positive_int, default=64,
                   help="images per generate call")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (AdamW) (default: 5e-5; 1e-5 with --scst)")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup_steps", type=non_negative_int, default=0,
                   help="linear warm-up steps, then linear decay to 0")
    p.add_argument("--num_beams", type=positive_int, default=None,
                   help=f"beam width for generation (default: {DEFAULT_NUM_BEAMS}, or the "
                        f"--init_from model's own)")
    p.add_argument("--max_new_tokens", "--gen_max_length", dest="max_new_tokens",
                   type=positive_int, default=None,
                   help="longest generated caption in tokens, EOS included, the start token "
                        "not (default: the manifest's max_length, so the longest training "
                        "caption can come back whole)")
    p.add_argument("--metric_for_best_model", default="cider",
                   choices=[*METRIC_NAMES, "loss"],
                   help="validation metric that picks the checkpoint kept at the end (loss: "
                        "lowest wins; the caption metrics: highest wins)")
    p.add_argument("--max_eval_samples", type=positive_int, default=None,
                   help="score only the first N validation images each epoch (the final "
                        "test evaluation always covers the whole test split)")
    p.add_argument("--num_preview_images", type=non_negative_int, default=8,
                   help="validation images shown captioned in TensorBoard at each evaluation")
    p.add_argument("--save_steps", type=positive_int, default=None,
                   help="checkpoint (and evaluate) every N optimizer steps (default: every epoch)")
    p.add_argument("--save_total_limit", type=positive_int, default=2,
                   help="checkpoints kept in --output_dir (the best one is never deleted)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on GPUs that compute it natively (compute capability 8.0+), "
                        "fp16 on older GPUs (with GPT-2's attention upcast), fp32 on CPU/mps")
    p.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                   help="optimizer step every N batches (effective batch = N x --batch_size "
                        "x processes; the loss is the same per-token mean whatever N)")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, ~30%% slower")
    p.add_argument("--dataloader_num_workers", type=non_negative_int, default=0,
                   help="processes collating batches (0: in the training process)")
    p.add_argument("--freeze_encoder", action="store_true", help="train without updating the ViT")
    p.add_argument("--freeze_decoder", action="store_true",
                   help="freeze GPT-2 except its cross-attention and LM head")
    p.add_argument("--logging_steps", type=positive_int, default=10,
                   help="log train loss every N steps")
    p.add_argument("--run_name", default=None,
                   help="TensorBoard run directory under runs/ (default: a timestamp)")
    p.add_argument("--runs_dir", default="runs", help="TensorBoard root directory")
    p.add_argument("--seed", type=int, default=42,
                   help="seed for weights, data order and caption draws")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--push_to_hub", default=None, metavar="REPO_ID",
                   help="after training, upload the model, tokenizer, image processor, "
                        "generation config, metrics and model card (never checkpoint-*) to "
                        "this Hugging Face repo, created if missing; needs a token (HF_TOKEN "
                        "or `hf auth login`) (default: nothing is uploaded)")
    p.add_argument("--hub_private", action="store_true",
                   help="with --push_to_hub, create the repo private")
    g = p.add_argument_group("self-critical sequence training (SCST), after cross-entropy")
    g.add_argument("--scst", action="store_true",
                   help="optimise CIDEr-D itself, continuing from the cross-entropy-trained "
                        "--init_from model: sampled captions, rewarded against the image's "
                        "references, raised or lowered against a baseline")
    g.add_argument("--scst_samples", type=positive_int, default=5,
                   help="captions sampled per image and step")
    g.add_argument("--scst_baseline", choices=["mean", "greedy"], default="mean",
                   help="mean: the mean reward of the image's other samples; greedy: the "
                        "reward of its greedy caption (one more generate call, no gradients)")
    args = p.parse_args(argv)
    if args.resume and args.resume_from:
        p.error("give --resume or --resume_from, not both")
    args.resume = args.resume or bool(args.resume_from)
    if args.epochs <= 0 and args.max_steps <= 0:
        p.error("--epochs must be positive (or give --max_steps)")
    if args.metric_for_best_model == "meteor" and not java_available():
        p.error("--metric_for_best_model meteor needs Java, which is not installed")
    if args.metric_for_best_model == "meteor" and meteor_skipped():
        p.error(f"--metric_for_best_model meteor: {SKIP_METEOR_ENV}=1 leaves METEOR out")
    if args.lr is None:
        args.lr = 1e-5 if args.scst else 5e-5  # SCST from a CE model diverges at CE's rates
    if args.scst:
        if not args.init_from:
            p.error("--scst needs --init_from DIR, a model trained with cross-entropy first "
                    "(train.py's --output_dir): SCST from an untrained model rewards noise")
        if args.scst_baseline == "mean" and args.scst_samples < 2:
            p.error("--scst_samples must be at least 2 with --scst_baseline mean (each "
                    "sample's baseline is the mean reward of the image's other samples)")
        if args.metric_for_best_model == "loss":
            p.error("--metric_for_best_model loss picks nothing under --scst (its loss is not "
                    "a cross-entropy); use a caption metric such as cider")
    return args


# ----------------------------------------------------------------------------- steps

def check_inputs(args):
    """-> (manifest, checkpoint to resume from or None, precision); ValueError in one line."""
    manifest = Manifest.read(args.data_path)
    if args.max_new_tokens and args.max_new_tokens < manifest["max_length"]:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens} is less than the data's "
                         f"--max_length {manifest['max_length']}: its longest captions could "
                         f"not be generated whole")
    precision = choose_precision(args.precision, pick_device(), cuda_capability())
    return manifest, checkpoint_to_resume(args), precision


def make_model(args, manifest, tokenizer, precision, is_main):
    from captioning.modeling import (check_init_model, fill_generation_ids, freeze,
                                     load_model_strict, upcast_decoder_attention)

    init_from = args.init_from or manifest.get("from_model")
    if init_from:
        model = fill_generation_ids(load_model_strict(init_from), tokenizer)
        check_init_model(model, manifest, tokenizer, init_from)
        if args.num_beams:
            # early_stopping is a beam-search flag: GenerationConfig refuses to save it
            # (at the first checkpoint) beside num_beams 1.
            model.generation_config.num_beams = args.num_beams
            model.generation_config.early_stopping = args.num_beams > 1
        model.generation_config.max_new_tokens = args.max_new_tokens or manifest["max_length"]
        model.generation_config.max_length = None
    else:
        model = build_model(manifest["encoder_model"], manifest["decoder_model"], tokenizer,
                            manifest["image_size"], num_beams=args.num_beams or DEFAULT_NUM_BEAMS,
                            max_new_tokens=args.max_new_tokens or manifest["max_length"])
    freeze(model, encoder=args.freeze_encoder, decoder=args.freeze_decoder)
    if precision == "fp16":
        upcast_decoder_attention(model)
    if args.gradient_checkpointing:
        model.config.decoder.use_cache = False  # the KV cache is useless while training
    if is_main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        origin = (f"from {init_from}" if init_from
                  else f"{manifest['encoder_model']} + {manifest['decoder_model']}")
        print(f"model: {origin}, "
              f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable, "
              f"{precision}, attention: {model.encoder.config._attn_implementation}")
    return model


def load_splits(args):
    splits = {split: load_split(args.data_path, split) for split in SPLITS}
    if args.max_eval_samples:
        val = splits["validation"]
        splits["validation"] = val.select(range(min(args.max_eval_samples, len(val))))
    return splits


def make_training_args(args, run_dir, precision):
    import torch
    from transformers import Seq2SeqTrainingArguments

    strategy = "steps" if args.save_steps else "epoch"  # evaluate where we save
    return Seq2SeqTrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear",
        eval_strategy=strategy, save_strategy=strategy,
        eval_steps=args.save_steps, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=True,  # strictly: see CaptionTrainer._load_best_model
        metric_for_best_model=args.metric_for_best_model,
        greater_is_better=args.metric_for_best_model != "loss",
        logging_steps=args.logging_steps,
        report_to="none",  # TensorBoard is attached explicitly, with our directory
        run_name=os.path.basename(run_dir),
        remove_unused_columns=False,  # the collator needs caption_ids
        bf16=precision == "bf16", fp16=precision == "fp16",
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        average_tokens_across_devices=True,  # the loss divides by the global token count
        ddp_find_unused_parameters=False,  # every trainable parameter reaches the loss
        activation_checkpointing=args.gradient_checkpointing,  # transformers 5 name
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        # On a machine without a GPU, accelerate treats torchrun's processes as data-parallel
        # (MULTI_CPU, DDP over gloo) only when told use_cpu; without it each process trained
        # alone, unsynchronised (measured in transformers 5.24 / accelerate 1.15).
        use_cpu=pick_device() == "cpu",
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1
        and not torch.cuda.is_available() else None,
        seed=args.seed, disable_tqdm=args.quiet,
    )


def make_trainer(args, model, tokenizer, processor, splits, precision, run_dir, tb_writer):
    from captioning.reporting import OpenTensorBoardCallback, PreviewWriter
    from captioning.trainer import CaptionCollator, CaptionTrainer, TrainView

    val = splits["validation"]
    n_preview = min(args.num_preview_images, len(val)) if tb_writer is not None else 0
    previews = PreviewWriter(tb_writer, val[:n_preview]["pixel_values"] if n_preview else [],
                             [r[0] for r in val[:n_preview]["captions"]] if n_preview else [])
    cls, view, collator, extra = CaptionTrainer, TrainView, CaptionCollator, {}
    if args.scst:
        from captioning.scst import SCSTCollator, SCSTTrainer, SCSTView, make_reward

        cls, view, collator = SCSTTrainer, SCSTView, SCSTCollator
        extra = dict(reward=make_reward(splits["train"], args.data_path, args.output_dir,
                                        is_main=tb_writer is not None),  # main writes TB
                     samples=args.scst_samples, baseline=args.scst_baseline)
    return cls(
        model=model, args=make_training_args(args, run_dir, precision),
        train_dataset=view(splits["train"], args.seed), eval_dataset=val,
        data_collator=collator(processor), eval_collator=CaptionCollator(processor),
        processing_class=tokenizer, score=compute_caption_metrics,
        on_predictions=previews if n_preview else None,
        callbacks=[OpenTensorBoardCallback(tb_writer=tb_writer)] if tb_writer else [], **extra)


def write_outputs(args, trainer, train_result, test, test_ds, manifest, run_dir, tb_writer):
    from captioning.reporting import write_predictions, write_reports

    step = trainer.state.global_step
    test_metrics = {k.removeprefix("test_"): v for k, v in test.metrics.items()}
    for name, value in test_metrics.items():
        tb_writer.add_scalar(f"test/{name}", value, step)
    tb_writer.close()
    write_predictions(args.output_dir, test_ds, test.predictions)
    validation = [{k.removeprefix("eval_"): v for k, v in entry.items()}
                  for entry in trainer.state.log_history if "eval_loss" in entry]
    write_reports(args.output_dir, trainer.state.log_history, validation, test_metrics)
    write_json(os.path.join(args.output_dir, "metrics.json"), {
        "validation": validation, "test": test_metrics,
        "train": {**train_result.metrics, "global_step": step},
        "best_checkpoint": trainer.state.best_model_checkpoint, "data": manifest,
        "tensorboard": run_dir, "log_history": trainer.state.log_history})
    print(f"best checkpoint by {args.metric_for_best_model}: "
          f"{trainer.state.best_model_checkpoint}")
    print("test: " + ", ".join(f"{k} {test_metrics[k]:.4f}" for k in TABLE_METRICS
                               if k in test_metrics))
    write_card(args.output_dir)  # after metrics.json: the card is built from it
    print(f"model, model card (README.md), metrics.json and test predictions written to "
          f"{args.output_dir}")


# ----------------------------------------------------------------------------- the recipe

def main(argv=None):
    args = parse_args(argv)
    configure_runtime()
    is_main = int(os.environ.get("RANK", "0")) == 0  # torchrun / accelerate set RANK
    try:
        manifest, resume_from, precision = check_inputs(args)
    except ValueError as e:
        return error_exit("train.py", e)
    if args.overwrite and not resume_from and is_main and os.path.isdir(args.output_dir):
        shutil.rmtree(args.output_dir)  # under torchrun, one process deletes

    import torch
    from torch.utils.tensorboard import SummaryWriter
    from transformers import set_seed

    from captioning.trainer import NonFiniteLossError

    quiet_transformers()
    set_seed(args.seed)
    if torch.cuda.is_available() and cuda_capability()[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere and newer: TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    tokenizer, processor = load_tokenizer(args.data_path), load_image_processor(args.data_path)
    try:
        model = make_model(args, manifest, tokenizer, precision, is_main)
    except (ValueError, OSError, RuntimeError) as e:  # an --init_from missing, broken or unfit
        return error_exit("train.py", e)
    splits = load_splits(args)
    run_dir = tensorboard_dir(args, resume_from)
    tb_writer = SummaryWriter(run_dir) if is_main else None  # only the main process writes
    trainer = make_trainer(args, model, tokenizer, processor, splits, precision, run_dir,
                           tb_writer)
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(os.path.join(args.output_dir, "train_args.json"),
                   {**vars(args), "tensorboard": run_dir, "precision_used": precision})
    try:
        train_result = trainer.train(resume_from_checkpoint=resume_from)
    except NonFiniteLossError as e:
        return error_exit("train.py", e, code=1)
    trainer.save_model(args.output_dir)  # the best checkpoint's weights, loaded strictly
    test = trainer.caption_split(splits["test"], "test")  # always the whole test split
    if is_main:
        processor.save_pretrained(args.output_dir)
        write_outputs(args, trainer, train_result, test, splits["test"], manifest, run_dir,
                      tb_writer)
        if args.push_to_hub:
            from captioning.publish import push_output_dir

            try:
                url = push_output_dir(args.output_dir, args.push_to_hub, args.hub_private)
            except Exception as e:  # network, auth, a refused name: the model stays on disk
                return error_exit("train.py", f"--push_to_hub {args.push_to_hub} failed: {e}",
                                  code=1)
            print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
