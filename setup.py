"""d2v2: a fast, faithful data2vec 2.0 pretraining engine on Triton kernels.

The four source folders are mapped into one import namespace, so other projects write
``from d2v2.kernels import attention`` and nothing named ``kernels`` lands in site-packages.
"""

import os

from setuptools import setup

# "d2v2" itself is an implicit namespace package: the repository's top level stays exactly
# setup.py, README.md and the folders below.
FOLDERS = {"d2v2.kernels": "kernels", "d2v2.models": "models", "d2v2.engine": "engine", "d2v2.bench": "bench"}


def _packages(folders: dict[str, str]) -> dict[str, str]:
    """Every folder with an __init__.py below the mapped folders, as {package name: folder}."""
    packages = {}
    for name, root in folders.items():
        for folder, _, files in os.walk(root):
            if "__init__.py" in files:
                rel = os.path.relpath(folder, root)
                packages[name if rel == "." else name + "." + rel.replace(os.sep, ".")] = folder
    return packages


PACKAGES = _packages(FOLDERS)

# `pip install d2v2` is what d2v2.kernels and d2v2.models import, and nothing more (safetensors, tiny
# and dependency-free, reads exported encoders: d2v2.models.load_pretrained); the engine (command
# line, data, trainer), the benchmarks and the tests are extras.
ENGINE = ["pyyaml", "tqdm", "pillow", "soundfile", "tokenizers", "safetensors", "scikit-learn", "threadpoolctl", "espeakng-loader",
          "jiwer"]
BENCH = ENGINE + ["matplotlib", "pytest-benchmark"]

setup(
    name="d2v2",
    version="0.1.0",
    description="data2vec 2.0 pretraining for images, speech and text on Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"d2v2.engine": ["recipes/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        # Triton wheels exist for Linux x86-64 only; elsewhere every op runs its PyTorch reference.
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
        "safetensors",
    ],
    extras_require={
        "engine": ENGINE,
        "bench": BENCH,
        # transformers checks the Hugging Face exports (it pulls no torch of its own); omegaconf only builds
        # the tests' fairseq-style checkpoints, the import never needs it.
        "test": BENCH + ["pytest>=8.2", "pytest-xdist", "tensorboard", "transformers", "omegaconf"],
        # TensorBoard event files beside metrics.jsonl (--set train.tensorboard=true).
        "tensorboard": ["tensorboard"],
        # The classes `d2v2 export` targets; timm needs torchvision, so it stays out of "test".
        "interop": ["transformers", "timm"],
        # Speech recognition's beam search with a KenLM n-gram model (`d2v2 evaluate --beam N --lm LM`); import-guarded.
        "lm": ["pyctcdecode", "kenlm"],
        # Optional comparison providers in `d2v2 bench`; import-guarded, never required.
        "providers": ["xformers"],
    },
    entry_points={
        "console_scripts": ["d2v2 = d2v2.engine.cli:console_main"],
        # Subcommands the engine's CLI finds at run time, so that it never imports d2v2.bench.
        "d2v2.commands": ["bench = d2v2.bench.cli:main"],
    },
)
