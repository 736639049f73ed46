"""Test set-up: 8 fake CPU devices (set before jax is imported) and a session-wide prepared tiny dataset."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests compile the same programs many times (every train_and_evaluate of a resume test, every CLI subprocess):
# XLA's persistent compilation cache turns the repeats into cache hits. One fresh directory per session keeps
# runs hermetic.
_CACHE_DIR = tempfile.mkdtemp(prefix="ldm_jax_test_xla_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR  # inherited by CLI subprocesses
# Tar-shard indexes of this session's webdataset fixtures, not the user's ~/.cache.
os.environ["LDM_JAX_INDEX_CACHE"] = tempfile.mkdtemp(prefix="ldm_jax_test_tar_index_")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from ldm_jax import jax_setup  # noqa: E402

jax_setup.configure()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from ldm_jax.data import shapes

    path = str(tmp_path_factory.mktemp("tfds"))
    shapes.get_builder("tiny", path)
    return path


@pytest.fixture(scope="session")
def first_stage_workdir(tmp_path_factory, data_dir):
    """A tiny KL autoencoder trained for a few steps through the real training loop."""
    from configs import autoencoder_kl
    from ldm_jax.training.loop import train_and_evaluate

    config = autoencoder_kl.get_config("tiny")
    config.data.data_dir = data_dir
    # The diffusion tests need a first stage, not its GAN (test_first_stage covers that); no discriminator saves
    # each xdist worker its compile.
    config.disc.enabled = False
    workdir = str(tmp_path_factory.mktemp("ae"))
    train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture
def txt2img_config(data_dir, first_stage_workdir):
    from configs import txt2img

    config = txt2img.get_config("tiny")
    config.data.data_dir = data_dir
    config.first_stage.workdir = first_stage_workdir
    return config


@pytest.fixture(scope="session")
def txt2img_workdir(tmp_path_factory, data_dir, first_stage_workdir):
    from configs import txt2img
    from ldm_jax.training.loop import train_and_evaluate

    config = txt2img.get_config("tiny")
    config.data.data_dir = data_dir
    config.first_stage.workdir = first_stage_workdir
    config.train.preview_every = 4  # exercises the preview grid path during training
    workdir = str(tmp_path_factory.mktemp("txt2img"))
    train_and_evaluate(config, workdir)
    return workdir


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
