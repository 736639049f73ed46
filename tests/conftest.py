"""Test set-up: 8 fake CPU devices (set before jax is imported) and a session-wide prepared tiny dataset."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


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
