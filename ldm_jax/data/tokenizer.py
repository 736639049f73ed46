"""The CLIP byte-pair-encoding tokenizer, offline, from the vocabulary file shipped in ``data/assets``.

Gives the same ids as openai/clip-vit-large-patch14 ("a photo of a cat" -> 49406 320 1125 539 320 2368 49407), and
exactly transformers' ``CLIPTokenizer`` (the tokenizer Stable Diffusion pipelines load; checked on a corpus of
thousands of texts, tests/test_tokenizer.py): Unicode NFC, every run of Unicode whitespace made one space, lower case,
then CLIP's pre-tokenizer pattern and byte-level BPE. Like transformers, and unlike openai's own script, HTML entities
are not unescaped and ftfy's mojibake repair is not applied: a model served through diffusers sees "&amp;" as written.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import regex

VOCAB_PATH = os.path.join(os.path.dirname(__file__), "assets", "bpe_simple_vocab_16e6.txt.gz")
# Merges used by CLIP: lines 1 .. 48894 of the vocabulary file (line 0 is a header).
_NUM_MERGES = 49152 - 256 - 2
SOT = "<|startoftext|>"
EOT = "<|endoftext|>"

_WHITESPACE = regex.compile(r"[\p{White_Space}]+")
_BYTE_LEVEL = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """Reversible map from bytes to printable unicode characters (the GPT-2 / CLIP scheme)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


class CLIPTokenizer:
    """Byte-level BPE tokenizer.

    Args:
      max_length: length of every encoded row, start and end tokens included (77 for Stable Diffusion).
      pad_token: "eot" pads with <|endoftext|> (SD 1.x), "zero" pads with id 0 (SD 2.x / OpenCLIP).
    """

    def __init__(self, max_length: int = 77, pad_token: str = "eot", vocab_path: str = VOCAB_PATH):
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: must be >= 2 to hold the start and end tokens")
        if pad_token not in ("eot", "zero"):
            raise ValueError(f"pad_token={pad_token!r}: must be 'eot' or 'zero'")
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : _NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        byte_chars = list(_bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.merges = merges
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.max_length = max_length
        self.sot_id = self.encoder[SOT]
        self.eot_id = self.encoder[EOT]
        self.pad_id = self.eot_id if pad_token == "eot" else 0
        # Tokens transformers matches verbatim before normalising: the special tokens, and the pad token of the
        # "zero" convention ("!", id 0: SD 2.x's tokenizer isolates every "!" of a prompt as that token).
        specials = [SOT, EOT] + ([self.decoder[0]] if pad_token == "zero" else [])
        self._specials = regex.compile("(" + "|".join(regex.escape(t) for t in specials) + ")")
        self.vocab_size = len(vocab)
        self._cache: dict[str, list[str]] = {}

    def save_hf_files(self, folder: str) -> None:
        """Writes the Hugging Face ``CLIPTokenizer`` files (vocab.json, merges.txt, configs) for this vocabulary."""
        os.makedirs(folder, exist_ok=True)
        pad = EOT if self.pad_id == self.eot_id else self.decoder[0]
        files = {
            "vocab.json": json.dumps(self.encoder, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges),
            "special_tokens_map.json": json.dumps(
                {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": pad}, indent=2
            ),
            "tokenizer_config.json": json.dumps(
                {
                    "tokenizer_class": "CLIPTokenizer",
                    "model_max_length": self.max_length,
                    "bos_token": SOT,
                    "eos_token": EOT,
                    "unk_token": EOT,
                    "pad_token": pad,
                    "do_lower_case": True,
                },
                indent=2,
            ),
        }
        for name, text in files.items():
            tmp = os.path.join(folder, f"{name}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, os.path.join(folder, name))

    def check_hf_files(self, folder: str) -> str:
        """Checks that a Hugging Face tokenizer folder holds this vocabulary; returns its pad token ("eot"/"zero")."""
        # vocab.json + merges.txt (transformers 4 and the hub's SD folders), or only tokenizer.json (transformers 5).
        vocab_path, fast_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "tokenizer.json")
        if os.path.isfile(vocab_path):
            with open(vocab_path, encoding="utf-8") as f:
                vocab = json.load(f)
        elif os.path.isfile(fast_path):
            with open(fast_path, encoding="utf-8") as f:
                vocab = json.load(f).get("model", {}).get("vocab", {})
        else:
            raise FileNotFoundError(f"{folder}: neither vocab.json nor tokenizer.json found")
        if vocab != self.encoder:
            diff = sorted(set(vocab.items()) ^ set(self.encoder.items()))[:5]
            raise ValueError(
                f"{folder}/vocab.json: differs from the CLIP BPE vocabulary ldm_jax ships ({len(vocab)} vs "
                f"{len(self.encoder)} entries; first differences {diff}); only the CLIP vocabulary is supported"
            )
        pad = EOT
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    entry = json.load(f).get("pad_token")
                if entry is not None:
                    pad = entry.get("content", pad) if isinstance(entry, dict) else entry
                    break
        if pad == EOT:
            return "eot"
        if self.encoder.get(pad) == 0:
            return "zero"
        raise ValueError(
            f"{folder}: pad_token={pad!r}; supported: {EOT!r} (SD 1.x) or {self.decoder[0]!r} (id 0, SD 2.x)"
        )

    def _bpe(self, token: str) -> list[str]:
        if token in self._cache:
            return self._cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[token] = word
        return word

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` without start/end tokens or padding."""
        ids = []
        # The special tokens written verbatim are the special ids (transformers matches them before normalising).
        for i, segment in enumerate(self._specials.split(text)):
            if i % 2:
                ids.append(self.encoder[segment])
                continue
            # transformers' normalizer: NFC, whitespace runs (Unicode White_Space, as Rust's regex \s) to " ", then
            # lower case character by character: a capital sigma is always "σ" (Python's lower() would write a
            # word-final "ς", the one context-dependent rule it has).
            segment = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", segment)).replace("Σ", "σ").lower()
            for piece in _PATTERN.findall(segment):
                # transformers' byte-level step splits each piece again with GPT-2's pattern; it only changes a
                # special token's text that was not written verbatim ("<|ENDOFTEXT|>" -> "<|", "endoftext", "|>").
                for word in _BYTE_LEVEL.findall(piece):
                    word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                    ids.extend(self.encoder[t] for t in self._bpe(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        specials = {self.sot_id, self.eot_id}
        raw = bytearray()
        for i in ids:
            if i in specials or i not in self.decoder:
                continue
            tok = self.decoder[i]
            end = tok.endswith("</w>")
            raw.extend(self.byte_decoder[c] for c in (tok[:-4] if end else tok))
            if end:
                raw.extend(b" ")
        return raw.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        """Encode to a padded int32 array [N, max_length]; over-long texts are truncated, keeping the end token."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [self.sot_id] + self.tokenize(text)[: self.max_length - 2] + [self.eot_id]
            out[row, : len(ids)] = ids
        return out
