"""Install ders-megatron: DeRS experts (shared base + light per-expert deltas) for megatron-core MoE.

    pip install -e ".[test,hf,plot]"      # what ./test.sh and ./main.sh set up in .venv

Installs into an environment that already has torch, Transformer Engine and apex (NVIDIA's
PyTorch container) without replacing them: ``install_requires`` states ranges (torch as
megatron-core 0.19 requires it; megatron-core 0.19.x, whose internals the plugin relies
on: ders_megatron/_version_check.py). The exact versions tested here are in
constraints.txt, which ./test.sh and ./main.sh install .venv with.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# Ranges, never pins: a pip install must keep the torch a CUDA container was built with.
INSTALL_REQUIRES = [
    "torch>=2.6",  # megatron-core 0.19.2's own requirement (its METADATA)
    "megatron-core>=0.19,<0.20",
    "numpy",
    "safetensors",
    "tqdm",
    "psutil",
    "packaging",
]


def _version() -> str:
    # Read without importing: ders_megatron/__init__.py imports megatron-core.
    init = HERE / "ders_megatron" / "__init__.py"
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', init.read_text(encoding="utf-8"), re.M)
    return match.group(1) if match else "0.1.0"


def _long_description() -> str:
    readme = HERE / "README.md"
    return readme.read_text(encoding="utf-8") if readme.is_file() else __doc__


setup(
    name="ders-megatron",
    version=_version(),
    description="DeRS MoE experts (shared base weight + light per-expert deltas) as a megatron-core plugin",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ders_megatron*"]),
    python_requires=">=3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest", "pytest-timeout", "import-linter"],
        "hf": ["transformers>=5,<6", "tokenizers", "gguf", "peft>=0.17"],  # peft: LoRA target_parameters
        "plot": ["matplotlib"],
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        # GPU only: Transformer Engine builds/loads against CUDA; never installed by ./test.sh.
        "te": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "ders-param-report=ders_megatron.cli.param_report:param_report_main",
            "ders-bench-moe-layer=ders_megatron.cli.bench_moe_layer:bench_moe_layer_main",
            "ders-convert-hf=ders_megatron.cli.convert_hf:main",
            "ders-upcycle=ders_megatron.cli.upcycle:main",
            "ders-compress=ders_megatron.cli.compress:main",
            "ders-analyze=ders_megatron.cli.analyze:main",
            "ders-replicate=ders_megatron.pipeline.replicate.main:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.12",
        "Operating System :: POSIX :: Linux",
    ],
)
