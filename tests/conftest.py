"""Test set-up: 8 fake CPU devices (set before jax is imported) and session-wide tiny trained runs, built once for
all xdist workers."""

import os

from cli import xla_flags  # noqa: E402 (no jax import: the flags must be set before jax is)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import fcntl  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# One folder per test run, shared by every xdist worker: pytest's controller imports this file first and sets the
# variable; the workers it starts inherit it. It holds XLA's persistent compilation cache (tests compile the same
# programs many times: every train_and_evaluate of a resume test, every CLI subprocess, and the same fixture and
# step on each worker), the tar-shard indexes of the webdataset fixtures (not the user's ~/.cache), and the tiny
# trained runs below. A fresh folder per run keeps runs hermetic; the process that made it removes it.
_OWN_SHARED = "LDM_JAX_TEST_SHARED" not in os.environ
if _OWN_SHARED:
    os.environ["LDM_JAX_TEST_SHARED"] = tempfile.mkdtemp(prefix="ldm_jax_test_")
_SHARED = os.environ["LDM_JAX_TEST_SHARED"]
_CACHE_DIR = os.path.join(_SHARED, "xla_cache")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR  # inherited by CLI subprocesses
os.environ["LDM_JAX_INDEX_CACHE"] = os.path.join(_SHARED, "tar_index")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from ldm_jax import jax_setup  # noqa: E402

jax_setup.configure()


def pytest_unconfigure(config):
    if _OWN_SHARED and not hasattr(config, "workerinput"):
        shutil.rmtree(_SHARED, ignore_errors=True)


def shared_run(name: str, build) -> str:
    """The folder ``name`` of this test run, made by ``build(folder)`` in whichever xdist worker asks first; the
    others wait for it on a file lock and reuse it (each would otherwise train the same tiny run). A build that
    failed leaves no completion mark: the next worker that asks builds it again, and fails with its own error."""
    path = os.path.join(_SHARED, name)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path + ".done"):
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
            build(path)
            open(path + ".done", "w").close()
    return path


@pytest.fixture(scope="session")
def data_dir():
    from ldm_jax.data import shapes

    return shared_run("tfds", lambda path: shapes.get_builder("tiny", path))


@pytest.fixture(scope="session")
def first_stage_workdir(data_dir):
    """A tiny KL autoencoder trained for a few steps through the real training loop."""
    from configs import autoencoder_kl
    from ldm_jax.training.loop import train_and_evaluate

    config = autoencoder_kl.get_config("tiny")
    config.data.data_dir = data_dir
    # The diffusion tests need a first stage, not its GAN (test_first_stage covers that); no discriminator saves
    # its compile.
    config.disc.enabled = False
    return shared_run("ae", lambda workdir: train_and_evaluate(config, workdir))


@pytest.fixture
def txt2img_config(data_dir, first_stage_workdir):
    from configs import txt2img

    config = txt2img.get_config("tiny")
    config.data.data_dir = data_dir
    config.first_stage.workdir = first_stage_workdir
    return config


@pytest.fixture(scope="session")
def txt2img_workdir(data_dir, first_stage_workdir):
    from configs import txt2img
    from ldm_jax.training.loop import train_and_evaluate

    config = txt2img.get_config("tiny")
    config.data.data_dir = data_dir
    config.first_stage.workdir = first_stage_workdir
    config.train.preview_every = 4  # exercises the preview grid path during training
    return shared_run("txt2img", lambda workdir: train_and_evaluate(config, workdir))


# The longest files first: two xdist workers each take whole files (--dist loadfile) in collection order, so a long
# file collected last (the multi-host matrix, ~9 min of one worker) would run alone at the end. Longest first keeps
# both workers busy to the end. The rest keep their order.
_LONGEST_FIRST = (
    "test_multihost_tasks.py",
    "test_latent_cache.py",
    "test_own_data.py",
    "test_interop.py",
    "test_preemption.py",
    "test_own_data_kill.py",
    "test_multihost.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
