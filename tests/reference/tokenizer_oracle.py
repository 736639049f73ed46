"""Reference side of the tokenizer corpus test: transformers' ``CLIPTokenizer`` (the one Stable Diffusion pipelines
load) on every text of a corpus, as the text encoder receives it (padding to ``max_length``, truncation).

  python tests/reference/tokenizer_oracle.py spec.json

``spec.json``: ``{"texts": [...], "runs": [{"dir": tokenizer folder, "max_length": int, "out": .npy}]}``; each run
writes the ids [len(texts), max_length] as int64.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(path):
    from transformers import CLIPTokenizer

    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    for run in spec["runs"]:
        tok = CLIPTokenizer.from_pretrained(run["dir"])
        ids = tok(spec["texts"], padding="max_length", truncation=True, max_length=run["max_length"])["input_ids"]
        np.save(run["out"], np.asarray(ids, np.int64))
        print(f"{run['dir']}: {len(ids)} texts", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
