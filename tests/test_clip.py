"""CLIP: our Flax towers against transformers' CLIPModel and open_clip's CLIP (tiny, random weights, built and run by
tests/reference/clip_oracle.py in the reference environment), the converters' shape inference against the full-size
architectures' state-dict shapes, the preprocessing against transformers' CLIPImageProcessor, and the CLIP score."""

import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.data.tokenizer import CLIPTokenizer
from ldm_jax.evaluation import clip_score as cs
from ldm_jax.interop import clip_weights, weight_files
from ldm_jax.interop.state_dict import ConversionError, flatten
from ldm_jax.models.clip import CLIP_VARIANTS, MODEL_FIELDS, build_clip
from tests.reference_env import ROOT, run_reference

ORACLE = os.path.join(ROOT, "tests", "reference", "clip_oracle.py")
TOL = 1e-4
CAPTIONS = ["a photo of a cat", "", "a red square on a blue background, " * 20, "diagram"]
# Landscape with an odd excess (the crop offset rounds), portrait, exact, and a large downscale.
IMAGE_SHAPES = [(45, 70), (64, 37), (32, 32), (200, 151)]
OPENCLIP_CASES = [
    {"name": "quickgelu", "quick_gelu": True, "format": "safetensors", "file": "oc_quickgelu.safetensors"},
    {"name": "gelu", "quick_gelu": False, "format": "training_pt", "file": "oc_gelu.pt"},
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    rng = np.random.default_rng(0)
    images = []
    for h, w in IMAGE_SHAPES:
        # Smooth structure plus noise, so that the resize filter's every tap matters.
        yy, xx = np.mgrid[0:h, 0:w]
        base = 127 + 100 * np.sin(xx[..., None] / 5.0 + np.arange(3)) * np.cos(yy[..., None] / 7.0)
        images.append(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    tokens = {pad: CLIPTokenizer(77, pad_token=pad)(CAPTIONS) for pad in ("eot", "zero")}
    np.savez(
        d / "inputs.npz",
        **{f"image_{i}": im for i, im in enumerate(images)},
        **{f"tokens_{p}": t for p, t in tokens.items()},
    )
    cases = [
        dict(c, path=str(d / c["file"]), converted=str(d / (c["name"] + "_converted.safetensors")))
        for c in OPENCLIP_CASES
    ]
    spec = {
        "inputs": str(d / "inputs.npz"),
        "outputs": str(d / "outputs.npz"),
        "shapes": str(d / "shapes.json"),
        "hf_dir": str(d / "hf_clip"),
        "image_size": CLIP_VARIANTS["tiny"]["image_size"],
        "openclip": cases,
        "convert_command": weight_files.TORCH_TO_SAFETENSORS_PY,
    }
    (d / "spec.json").write_text(json.dumps(spec))
    run_reference(ORACLE, str(d / "spec.json"))
    with np.load(spec["outputs"]) as f:
        out = {k: f[k] for k in f.files}
    with open(spec["shapes"]) as f:
        shapes = json.load(f)
    return {**spec, "dir": d, "images": images, "tokens": tokens, "out": out, "shapes": shapes, "cases": cases}


def _embed(scorer, pixels, tokens):
    img = jax.jit(scorer.image_embeddings)(scorer.params, pixels)
    txt = jax.jit(scorer.text_embeddings)(scorer.params, tokens)
    return np.asarray(img), np.asarray(txt)


def _assert_close(got, want, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.abs(got - want).max()
    assert err <= TOL, f"{what}: max abs error {err:.2e} (scale {np.abs(want).max():.2f})"


def test_preprocess_equals_clip_image_processor(reference):
    pixels = cs.preprocess(reference["images"], reference["image_size"])
    want = reference["out"]["pixels"]
    assert pixels.dtype == np.float32 and pixels.shape == want.shape
    # The same PIL resize, crop offsets and float32 arithmetic: equal to the last bit.
    np.testing.assert_array_equal(pixels, want)
    # A uint8 batch array works as well as a list of differently sized images.
    batch = np.stack([reference["images"][2]] * 2)
    np.testing.assert_array_equal(cs.preprocess(batch, reference["image_size"]), np.stack([want[2]] * 2))
    with pytest.raises(ValueError, match=r"uint8"):
        cs.preprocess([reference["images"][0].astype(np.float32)], 32)


def test_transformers_clipmodel_parity(reference):
    out = reference["out"]
    scorer = cs.load_clip_scorer(reference["hf_dir"])
    fields = {k: getattr(scorer.model, k) for k in MODEL_FIELDS}
    assert fields == {k: CLIP_VARIANTS["tiny"][k] for k in MODEL_FIELDS}
    assert scorer.image_size == 32 and scorer.tokenizer.max_length == 77 and scorer.tokenizer.pad_id == 49407
    pixels = scorer.preprocess(reference["images"])
    texts = {}
    for pad in ("eot", "zero"):
        img, texts[pad] = _embed(scorer, pixels, reference["tokens"][pad])
        _assert_close(img, out["hf_image"], "image embeddings")
        _assert_close(texts[pad], out[f"hf_text_{pad}"], f"text embeddings ({pad} padding)")
    # Pooling at argmax(tokens) is the first <|endoftext|> whatever the padding after it (attention is causal).
    np.testing.assert_allclose(texts["eot"], texts["zero"], atol=1e-6)
    n_img, n_txt = out["hf_score"].shape
    scores = cs.clip_score(np.repeat(img, n_txt, axis=0), np.tile(texts["eot"], (n_img, 1))).reshape(n_img, n_txt)
    assert 0.2 < (scores > 0).mean() < 0.8  # both sides of the clamp are exercised
    assert np.abs(scores - out["hf_score"]).max() <= TOL
    # Our tokenizer's output is what the scorer tokenises with.
    np.testing.assert_array_equal(scorer.tokenizer(CAPTIONS), reference["tokens"]["eot"])


@pytest.mark.parametrize("case", range(len(OPENCLIP_CASES)))
def test_openclip_parity(reference, case):
    """quick_gelu from a safetensors file (activation from arch="tiny"); gelu from OpenCLIP's training-checkpoint
    layout ({"state_dict": {"module.*": ...}}, converted to safetensors where torch is absent)."""
    c = reference["cases"][case]
    out = reference["out"]
    path = c["path"] if c["format"] == "safetensors" else c["converted"]
    activation = None if c["quick_gelu"] else "gelu"
    scorer = cs.load_clip_scorer(path, arch="tiny", activation=activation)
    assert scorer.model.activation == ("quick_gelu" if c["quick_gelu"] else "gelu")
    assert scorer.tokenizer.pad_id == 0
    pixels = out["pixels"]
    img, txt = _embed(scorer, pixels, reference["tokens"]["zero"])
    _assert_close(img, out[f"oc_{c['name']}_image"], f"{c['name']}: image embeddings")
    _assert_close(txt, out[f"oc_{c['name']}_text"], f"{c['name']}: text embeddings")
    _, txt_eot = _embed(scorer, pixels, reference["tokens"]["eot"])
    _assert_close(txt_eot, out[f"oc_{c['name']}_text_eot"], f"{c['name']}: text embeddings (eot padding)")
    if c["format"] != "safetensors":
        if importlib.util.find_spec("torch") is None:
            with pytest.raises(weight_files.TorchUnavailable, match="Convert it once"):
                clip_weights.load_clip(c["path"], arch="tiny")
        else:
            _, params, _ = clip_weights.load_clip(c["path"], arch="tiny")
            jax.tree_util.tree_map(np.testing.assert_array_equal, params, scorer.params)
    else:
        # Without arch: the shapes equal the "tiny" variant's, whose heads are taken; the activation defaults to
        # gelu, so this quick_gelu model then gives other embeddings (no error is possible).
        model, params, _ = clip_weights.load_clip(path)
        assert (model.vision_heads, model.text_heads, model.activation) == (4, 4, "gelu")
        wrong = model.apply({"params": params}, jnp.asarray(pixels), method=model.encode_image)
        assert np.abs(np.asarray(wrong) - out["oc_quickgelu_image"]).max() > 100 * TOL


def test_converted_params_fit_the_module(reference):
    """Both layouts give exactly the module's parameter tree (paths, shapes, float32)."""
    tiny = build_clip(CLIP_VARIANTS["tiny"])
    abstract = jax.eval_shape(
        lambda: tiny.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 77), jnp.int32))
    )["params"]
    want = {k: (v.shape, np.dtype(v.dtype)) for k, v in flatten(abstract).items()}
    for path in (reference["hf_dir"], reference["cases"][0]["path"]):
        _, params, _ = clip_weights.load_clip(path, arch=None if os.path.isdir(path) else "tiny")
        assert {k: (v.shape, v.dtype) for k, v in flatten(params).items()} == want


@pytest.mark.parametrize(
    "source, variant, activation",
    [
        ("hf:vit_b16", "vit_b16", "quick_gelu"),
        ("hf:vit_l14", "vit_l14", "quick_gelu"),
        ("openclip:ViT-B-16", "vit_b16", "gelu"),
        ("openclip:ViT-L-14", "vit_l14", "gelu"),
        ("openclip:ViT-H-14", "vit_h14", "gelu"),
    ],
)
def test_full_size_architectures(reference, source, variant, activation):
    """The variants table and both key layouts against the full-size references' state dicts (built on torch's
    meta device): the fields inferred from the config / shapes are the variant's (ViT-H-14's 80-wide vision heads
    included; OpenCLIP files default to gelu), and every key and shape is expected."""
    entry = reference["shapes"][source]
    shapes = {k: tuple(v) for k, v in entry["shapes"].items()}
    if source.startswith("hf:"):
        fields = clip_weights.fields_from_hf_config(entry["config"], source)
        layout = "hf"
    else:
        fields = clip_weights.fields_from_openclip_shapes(shapes, source)
        assert fields["pad_token"] == "zero"
        layout = "openclip"
    want = dict(CLIP_VARIANTS[variant], activation=activation)
    assert {k: fields[k] for k in MODEL_FIELDS} == {k: want[k] for k in MODEL_FIELDS}
    expected = clip_weights.expected_shapes(fields, layout)
    assert {k: v for k, v in shapes.items() if k != "logit_scale"} == expected
    if source.startswith("openclip:"):
        quick = clip_weights.fields_from_openclip_shapes(shapes, source, activation="quick_gelu")
        assert quick["activation"] == "quick_gelu"


def test_conversion_errors_name_the_file_and_keys(reference, tmp_path):
    from safetensors.numpy import save_file

    src = reference["cases"][0]["path"]
    sd = weight_files.read_state_dict(src)
    # A missing tensor.
    broken = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in sd.items() if k != "visual.transformer.resblocks.1.mlp.c_fc.bias"}, str(broken))
    with pytest.raises(ConversionError, match=r"missing visual\.transformer\.resblocks\.1\.mlp\.c_fc\.bias") as e:
        clip_weights.load_clip(str(broken), arch="tiny")
    assert str(e.value).startswith(f"{broken}: ")
    # A mis-shaped one, and an unexpected one.
    bad = dict(sd, text_projection=np.zeros((48, 16), np.float32), **{"visual.attn_pool.query": np.zeros(4)})
    broken = tmp_path / "misshaped.safetensors"
    save_file(bad, str(broken))
    with pytest.raises(ConversionError) as e:
        clip_weights.load_clip(str(broken), arch="tiny")
    msg = str(e.value)
    assert msg.startswith(f"{broken}: ") and "text_projection: (48, 16) (expected (48, 32))" in msg
    assert "unexpected visual.attn_pool.query" in msg
    # A key the architecture is inferred from.
    broken = tmp_path / "noconv.safetensors"
    save_file({k: v for k, v in sd.items() if k != "visual.conv1.weight"}, str(broken))
    with pytest.raises(ConversionError, match=r"noconv\.safetensors: .*'visual\.conv1\.weight' is missing"):
        clip_weights.load_clip(str(broken))
    # An arch that does not match the file.
    with pytest.raises(ConversionError, match=r"arch='vit_b16' does not match.*image_size: file 32, vit_b16 224"):
        clip_weights.load_clip(src, arch="vit_b16")
    with pytest.raises(ValueError, match="not a CLIP variant"):
        clip_weights.load_clip(src, arch="vit_q99")
    # Shapes of no variant: heads are width // 64, which a 48-wide text tower cannot have.
    shapes = {k: v.shape for k, v in sd.items()}
    with pytest.raises(ValueError, match="text_heads=0 must divide text_width=48"):
        clip_weights.fields_from_openclip_shapes(dict(shapes, positional_embedding=(76, 48)), "x.safetensors")


def test_transformers_folder_errors(reference, tmp_path):
    hf = reference["hf_dir"]
    # The folder's weight file alone is not an OpenCLIP checkpoint.
    with pytest.raises(ConversionError, match="pass the model's folder"):
        clip_weights.load_clip(os.path.join(hf, "model.safetensors"))
    with pytest.raises(ValueError, match="OpenCLIP files only"):
        clip_weights.load_clip(hf, activation="gelu")
    # A mis-shaped tensor in the folder names the folder's weight file and the key.
    from safetensors.numpy import save_file

    folder = tmp_path / "hf"
    shutil.copytree(hf, folder)
    sd = weight_files.read_state_dict(str(folder / "model.safetensors"))
    sd["visual_projection.weight"] = sd["visual_projection.weight"][:, :8]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"model\.safetensors: .*visual_projection\.weight: \(32, 8\)"):
        clip_weights.load_clip(str(folder))
    # Only a pickle: refused without allow_pickle, naming it.
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(weight_files.PickleNotAllowed, match="pytorch_model.bin"):
        clip_weights.load_clip(str(folder))
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(weight_files.WeightFileNotFound, match="no model.safetensors"):
        clip_weights.load_clip(str(folder))
    # Unsupported configurations.
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = "gelu"
    with pytest.raises(ValueError, match="one activation for both towers"):
        clip_weights.fields_from_hf_config(cfg, "config.json")
    cfg["vision_config"]["hidden_act"] = "quick_gelu"
    cfg["text_config"]["eos_token_id"] = 3
    with pytest.raises(ValueError, match="eos_token_id=3"):
        clip_weights.fields_from_hf_config(cfg, "config.json")
    with pytest.raises(ValueError, match="expected a CLIPModel config"):
        clip_weights.fields_from_hf_config({"model_type": "clip_text_model"}, "config.json")
    with pytest.raises(weight_files.WeightFileNotFound, match="no such file or folder"):
        clip_weights.load_clip(str(tmp_path / "absent"))


def test_clip_score_formula():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    b[0] = -a[0]  # cos -1: clamped to 0
    b[1] = 3 * a[1]  # cos 1: 100
    cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    got = cs.clip_score(a.astype(np.float32), b)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, 100 * np.maximum(cos, 0), rtol=1e-6)
    assert got[0] == 0 and abs(got[1] - 100) < 1e-4 and (got >= 0).all()
    # Invariant to the embeddings' scale (normalised or not).
    np.testing.assert_allclose(cs.clip_score(7 * a, b / 3), cs.clip_score(a, b), rtol=1e-12)
    with pytest.raises(ValueError, match="equal"):
        cs.clip_score(a, b[:3])
    with pytest.raises(ValueError, match="zero norm"):
        cs.clip_score(np.zeros((1, 5)), b[:1])
