"""The shared code beneath the four scripts, one job per module:

    cli          argparse help formatter, argument types, one-line error exits, runtime set-up
    images       file or bytes -> RGB -> uint8 at the encoder's size -> normalised tensor
    fetch        the HTTP client (images by URL, COCO files)
    sources      caption sets (COCO, Karpathy, imagefolder) -> one entry list
    hub          a Hugging Face dataset as a caption source, read a wave at a time
    splits       which candidates go to which split, and how many
    shapes       the built-in synthetic set, written in the COCO 2014 layout
    coco_download  --download: COCO's annotations archive and only the selected images
    store        the on-disk data format: manifest, arrow shards, load_split
    modeling     tokenizer fixes, building, freezing and strictly loading the model, ids -> text
    devices      device and precision choice, shared by training and captioning
    captioner    batched captioning of many images (inference.py, and any later front end)
    checkpoints  finding and validating Trainer checkpoints
    trainer      caption draw, collator, loss, sharded evaluation, the Seq2SeqTrainer subclass
    scoring      the COCO caption metrics (metrics.py is their command line)
    cider        CIDEr-D as a training reward: fixed document frequencies, cached references
    scst         self-critical sequence training: sampling, rewards, baselines, SCSTTrainer
    reporting    what training shows people: previews, loss curve, tables, predictions

Importing any of them changes no setting; the scripts call `cli.configure_runtime()`.
"""
