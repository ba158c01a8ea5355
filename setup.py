"""saitjax: token-sparse Vision Transformers in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # JAX 0.11 needs Python 3.12; stay on the 0.10 series while 3.11 is supported.
    "jax>=0.10.0,<0.11",
    "jaxlib>=0.10.0,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "ml-collections>=1.0,<2",
    "numpy>=1.26,<3",
    "absl-py>=2.1",
    "safetensors>=0.4,<1",
    "matplotlib>=3.8,<4",
    "tqdm>=4.66",  # the progress bar in terminals and notebooks
    "tensorboard>=2.16,<3",  # to view the logs; tests read events back with it
    "tensorboardX>=2.6,<3",  # writes the TensorBoard events (no TensorFlow)
    # TensorFlow is only imported inside saitjax.data (input pipelines); the models,
    # conversion and benchmark paths never import it.
    "tensorflow-datasets>=4.9.6,<5",
    "tensorflow-cpu>=2.18,<2.22",
    "importlib_resources>=6",  # TFDS needs it to prepare custom builders (saitjax_shapes)
]

EXTRAS = {
    # nbclient/nbformat/ipykernel: the test suite executes experiments/quickstart.ipynb.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],
    # PyTorch-based conversion of .pth checkpoints, and parity tests/benchmarks against timm.
    # timm itself is installed with --no-deps (README): it pins torchvision, which has no CPU
    # build on every index, and its DeiT models never use it.
    "torch": ["torch>=2.1", "pyyaml", "huggingface_hub"],
}

setup(
    name="saitjax",
    version="0.1.0",
    description="Token-sparse Vision Transformers (SaiT, AS-ViT, DynamicViT, EViT, ToMe) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["saitjax", "saitjax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["saitjax-convert=saitjax.tools.convert:main",
                                      "saitjax-benchmark=saitjax.benchmark:main"]},
)
