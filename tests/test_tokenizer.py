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
