import os

import numpy as np
import pytest

from ldm_jax.data.tokenizer import CLIPTokenizer


def test_ids_match_openai_clip():
    # Reference ids of openai/clip-vit-large-patch14 for this text (see RESOURCES.md).
    tok = CLIPTokenizer(max_length=77)
    ids = tok("a photo of a cat")[0]
    assert ids[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[7:] == 49407).all()
    assert tok.vocab_size == 49408


def test_padding_modes_and_truncation():
    zero = CLIPTokenizer(max_length=6, pad_token="zero")
    ids = zero(["a cat", "a very long caption that does not fit"])
    assert ids[0].tolist() == [49406, 320, 2368, 49407, 0, 0]
    # Truncated rows keep the end token in the last position.
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and ids.shape == (2, 6)


def test_decode_round_trip_and_normalisation():
    tok = CLIPTokenizer(max_length=32)
    text = "a small purple triangle at the bottom right on a gray background"
    assert tok.decode(tok(text)[0]) == text
    np.testing.assert_array_equal(tok("  A  Small   PURPLE triangle "), tok("a small purple triangle"))


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="pad_token"):
        CLIPTokenizer(pad_token="left")
    with pytest.raises(ValueError, match="max_length"):
        CLIPTokenizer(max_length=1)


def _repo_prompts() -> list[str]:
    """Every prompt written in the repository: configs, the demo prompt file, README, docs/ and docstrings."""
    import glob
    import re

    from reference_env import ROOT

    found = []
    for path in (
        glob.glob(os.path.join(ROOT, "configs", "*.py"))
        + glob.glob(os.path.join(ROOT, "ldm_jax", "**", "*.py"), recursive=True)
        + [os.path.join(ROOT, "README.md")]
        + glob.glob(os.path.join(ROOT, "docs", "*.md"))
    ):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        found += re.findall(r'--prompt="([^"]+)"', text)
        found += re.findall(r'"(a (?:small|large) [a-z]+ [a-z]+ [a-z ]+ on a [a-z]+ background)"', text)
    with open(os.path.join(ROOT, "configs", "demo_prompts.txt"), encoding="utf-8") as f:
        found += [line.strip() for line in f if line.strip()]
    return sorted(set(found))


def _generated(n: int, seed: int = 0) -> list[str]:
    """Texts that exercise normalisation and the pre-tokenizer: unicode letters and marks (composed and
    decomposed), emoji (skin tones, ZWJ sequences, flags), punctuation runs, numbers, contractions in any case, long
    words, every kind of whitespace run, HTML entities, control characters and over-long texts."""
    rng = np.random.default_rng(seed)
    pieces = [
        "a", "photo", "of", "the", "Cat", "DOG", "sks", "café", "cafe\u0301", "naïve", "NAÏVE", "Straße", "ΣΟΦΊΑ",
        "ὈΔΥΣΣΕΎΣ", "İstanbul", "東京", "Москва", "العربية", "हिन्दी", "한국어", "ﬁne", "Ⅻ", "①", "½", "x²", "µm",
        "🐶", "👍🏽", "👩‍💻", "🇯🇵", "❤️", "☃", "!!!", "...", "?!", "—", "–", "“quoted”", "«guillemets»", "(parens)",
        "[b]", "{c}", "#tag", "@user", "$5", "100%", "3.14", "1,000,000", "2026-12-03", "007", "٣", "१२",
        "it's", "IT'S", "we're", "they've", "I'm", "you'll", "he'd", "o'clock", "rock'n'roll", "''", "'s",
        "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis", "a" * 60,
        "&amp;", "&lt;b&gt;", "&#39;", "&quot;", "&amp;amp;", "&nbsp;", "&#x1F600;", "<|endoftext|>",
        "<|startoftext|>", "C++", "e-mail", "well-known", "don’t", "l'été", "ＦＵＬＬＷＩＤＴＨ", "ｶﾀｶﾅ",
        "\u200b", "\u00ad", "\x1c", "\x7f",
    ]  # fmt: skip
    spaces = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2003", " \t \n ", "\u2028", "\x0b\x0c"]
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 40 if rng.random() < 0.9 else 120))
        words = [pieces[int(i)] for i in rng.integers(0, len(pieces), k)]
        seps = [spaces[int(i)] if rng.random() < 0.3 else " " for i in rng.integers(0, len(spaces), k)]
        text = "".join(w + s for w, s in zip(words, seps, strict=True))
        out.append(text if rng.random() < 0.8 else "  " + text.upper())
    return out


def test_corpus_matches_transformers_clip_tokenizer(tmp_path):
    """Thousands of texts tokenized like transformers' CLIPTokenizer (the Stable Diffusion pipelines' tokenizer):
    every shapes caption, every prompt in the repository and generated texts, in both pad conventions, at the text
    encoder's length and at a short one (truncation keeps the end token)."""
    import itertools
    import json

    from reference_env import ROOT, run_reference

    from ldm_jax.data import shapes

    captions = [
        shapes.caption(s, c, z, p, b)
        for s, c, z, p, b in itertools.product(
            shapes.SHAPES, shapes.COLOR_NAMES, shapes.SIZES, shapes.POSITIONS, shapes.BACKGROUND_NAMES
        )
    ]
    repo = _repo_prompts()
    texts = captions + repo + _generated(2500) + ["", " ", "\n\t"]
    assert len(captions) > 500 and len(repo) >= 5 and len(texts) > 3000
    runs = []
    for pad, length in (("eot", 77), ("zero", 77), ("eot", 16), ("zero", 24)):
        folder = str(tmp_path / f"{pad}_{length}")
        CLIPTokenizer(length, pad).save_hf_files(folder)
        runs.append(dict(dir=folder, max_length=length, out=str(tmp_path / f"{pad}_{length}.npy"), pad=pad))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"texts": texts, "runs": runs}), encoding="utf-8")
    run_reference(os.path.join(ROOT, "tests", "reference", "tokenizer_oracle.py"), str(spec))
    for run in runs:
        ref = np.load(run["out"])
        ours = CLIPTokenizer(run["max_length"], run["pad"])(texts)
        bad = [i for i in range(len(texts)) if not np.array_equal(ours[i], ref[i])]
        assert not bad, (run["dir"], len(bad), [(texts[i], ours[i].tolist(), ref[i].tolist()) for i in bad[:3]])
