"""train.py --push_to_hub: the trained model directory, with its card, uploaded in one commit.

What goes up is chosen here, explicitly, file by file: the top-level files of --output_dir
(weights, config, generation config, tokenizer, image processor, metrics, predictions, the
card), never the checkpoint-* folders (optimizer state, several times the model's size) and
never Trainer's pickled training_args.bin (the Hub flags pickles; train_args.json says the
same in JSON). Choosing the list ourselves, rather than passing patterns to upload_folder,
is what lets a test check exactly what would be sent.
"""

import os

from .cider import CACHE_NAME

# Trainer's pickle, and SCST's reward cache (every training caption, written here when the
# data folder is read-only): neither belongs with the model.
NEVER_PUSHED = ("training_args.bin", CACHE_NAME)


def files_to_push(output_dir):
    """-> sorted top-level file names of `output_dir` that belong on the Hub."""
    return sorted(name for name in os.listdir(output_dir)
                  if os.path.isfile(os.path.join(output_dir, name))
                  and name not in NEVER_PUSHED and not name.startswith("."))


def push_to_hub(output_dir, repo_id, card_text, private=False, api=None):
    """Create `repo_id` if needed and upload the chosen files in one commit, README.md being
    `card_text` (the card whose snippet loads `repo_id`, not the local directory). Returns
    the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api or HfApi()
    operations = [CommitOperationAdd(path_in_repo=name,
                                     path_or_fileobj=os.path.join(output_dir, name))
                  for name in files_to_push(output_dir) if name != "README.md"]
    operations.append(CommitOperationAdd(path_in_repo="README.md",
                                         path_or_fileobj=card_text.encode("utf-8")))
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.create_commit(repo_id, operations, repo_type="model",
                             commit_message="Upload captioner trained with train.py")
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"


def push_output_dir(output_dir, repo_id, private=False, api=None):
    """train.py's upload: `output_dir` with a card whose snippet loads `repo_id`."""
    from .model_card import card_for

    return push_to_hub(output_dir, repo_id, card_for(output_dir, model_ref=repo_id),
                       private=private, api=api)
