"""A user's mistake on any entry point ends with exit status 2 and one message naming the field, the value and the
rule, no traceback; LDM_JAX_DEBUG=1 shows the traceback."""

import os
import shutil
import subprocess
import sys

import pytest
from cli import ROOT, xla_flags

from configs import autoencoder_kl, txt2img
from ldm_jax import config_lib

# A workdir a refused run must not create (a run started before the run it starts from: nothing written).
UNTOUCHED = "/tmp/ldm_jax_test_untouched_workdir"
# A first stage whose run has its config.json but no checkpoint yet (written by the test).
UNTRAINED = "/tmp/ldm_jax_test_untrained_first_stage"
# A txt2img run whose config names UNTRAINED (its first stage's checkpoints moved or never made).
ON_UNTRAINED = "/tmp/ldm_jax_test_run_on_untrained_first_stage"
# (entry point, arguments, what the message must say): a sample of mistakes in flags, config fields and paths.
MISTAKES = [
    (
        "train",
        ["--config=configs/txt2img.py:tiny", "--workdir=/tmp/x", "--config.optim.lr=-1"],
        "optim.lr=-1.0: must be > 0",
    ),
    ("train", ["--config=configs/txt2img.py:nope", "--workdir=/tmp/x"], "config preset 'nope': must be one of"),
    ("train", ["--config=configs/txt2img.py:tiny", "--workdir=/tmp/x", "--config.optim.nope=1"], "nope"),
    ("train", ["--config=configs/txt2img.py:tiny"], "--workdir"),
    (
        "train",
        [
            "--config=configs/txt2img.py:tiny",
            "--workdir=/tmp/x",
            "--config.unet.num_heads=2,2",
            "--config.unet.num_heads",
            "4,4",
        ],
        "--config.unet.num_heads is given 2 times (2,2 and 4,4): its values would be appended",
    ),
    (
        "train",
        ["--config=configs/dreambooth.py:tiny", "--workdir=/tmp/x", "--config.init_from=/nonexistent/sd"],
        "/nonexistent/sd/config.json: no config.json",
    ),
    (
        "train",
        ["--config=configs/autoencoder_kl.py:tiny", f"--workdir={UNTOUCHED}", "--config.init_from=/nonexistent/ae"],
        "init_from='/nonexistent/ae': no checkpoints/ folder; train that run first",
    ),
    (
        "train",
        ["--config=configs/txt2img.py:tiny", f"--workdir={UNTOUCHED}", f"--config.first_stage.workdir={UNTRAINED}"],
        f"first_stage.workdir='{UNTRAINED}': no checkpoints/ folder; train that run first",
    ),
    (
        "train",
        ["--config=configs/txt2img.py:tiny", f"--workdir={UNTOUCHED}", "--config.first_stage.workdir=/nonexistent/ae"],
        "first_stage.workdir='/nonexistent/ae': no config.json; train that run first",
    ),
    (
        "sample",
        [f"--workdir={ON_UNTRAINED}", "--prompt=a cat", f"--outdir={UNTOUCHED}"],
        f"first_stage.workdir='{UNTRAINED}': no checkpoints/ folder; train that run first",
    ),
    ("evaluate", [f"--workdir={ON_UNTRAINED}"], f"first_stage.workdir='{UNTRAINED}': no checkpoints/ folder"),
    ("sample", ["--workdir=/nonexistent/run", "--prompt=a cat"], "/nonexistent/run/config.json: no config.json"),
    ("sample", ["--workdir=/nonexistent/run", "--num_per_prompt=0"], "--num_per_prompt=0: must be >= 1"),
    ("evaluate", ["--workdir=/nonexistent/run", "--samples=/tmp/s"], "not both"),
    ("evaluate", ["--workdir=/nonexistent/run", "--seed=-1"], "--seed=-1: example i uses seed + i as a uint32 key"),
    ("evaluate", ["--workdir=/nonexistent/run"], "--workdir='/nonexistent/run': no config.json; train that run first"),
    ("export", ["--workdir=/nonexistent/run", "--out=/tmp/o"], "no config.json"),
    ("convert", ["--src=/nonexistent/sd", "--out=/tmp/o"], "--src=/nonexistent/sd: no such file or folder"),
    ("cache_latents", ["--out=/tmp/c"], "Flag --first_stage must have a value other than None"),
]


def _run(module, args, debug=False):
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    env.pop("LDM_JAX_DEBUG", None)
    if debug:
        env["LDM_JAX_DEBUG"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", f"ldm_jax.{module}", *args], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_user_errors_exit_2_with_one_message():
    shutil.rmtree(UNTOUCHED, ignore_errors=True)
    os.makedirs(UNTRAINED, exist_ok=True)
    config_lib.save_config(autoencoder_kl.get_config("tiny"), os.path.join(UNTRAINED, "config.json"))
    os.makedirs(ON_UNTRAINED, exist_ok=True)
    run = txt2img.get_config("tiny")
    run.first_stage.workdir = UNTRAINED
    config_lib.save_config(run, os.path.join(ON_UNTRAINED, "config.json"))
    procs = [(m, a, want, _run(m, a)) for m, a, want in MISTAKES]  # all at once: one start-up's wall time
    for module, args, want, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (module, args, proc.returncode, err[-2000:])
        assert "Traceback" not in err, (module, args, err[-2000:])
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and want in lines[0], (module, args, err[-2000:])
    assert not os.path.exists(UNTOUCHED)


@pytest.mark.parametrize("debug", [True])
def test_debug_shows_the_traceback(debug):
    proc = _run("train", list(MISTAKES[0][1]), debug=debug)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" in err and "optim.lr=-1.0" in err
