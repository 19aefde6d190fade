"""The shared code beneath the four scripts, one job per module:

    cli          argparse help formatter, argument types, one-line error exits, runtime set-up
    images       file or bytes -> RGB -> uint8 at the encoder's size -> normalised tensor
    fetch        the HTTP client (images by URL, COCO files)
    sources      caption sets (COCO, Karpathy, the built-in shapes) -> one list of entries
    shapes       the built-in synthetic set, written in the COCO 2014 layout
    coco_download  --download: COCO's annotations archive and only the selected images
    store        the on-disk data format: manifest, arrow shards, load_split
    modeling     tokenizer fixes, building and strictly loading the model, ids -> text
    captioner    batched captioning of many images (inference.py, and any later front end)
    checkpoints  finding and validating Trainer checkpoints
    trainer      the collator, the scorer and the Seq2SeqTrainer subclass
    reporting    what training shows people: previews, loss curve, tables, predictions

Importing any of them changes no setting; the scripts call `cli.configure_runtime()`.
"""
