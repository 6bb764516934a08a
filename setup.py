"""Install `shortened`: continued pretraining of depth-pruned LLaMA models on DeepSpeed.

torch is deliberately a range, not a pin: on a GPU cluster the user's own CUDA build must be kept, and
`make setup` installs the CPU wheel torch==2.13.0 first so that nothing here pulls a CUDA build.
Every other dependency is pinned to the version the test suite runs against, with the reason beside it.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.4",  # range on purpose: keep the cluster's CUDA build; tested with 2.13.0 (CPU)
    "deepspeed==0.19.8",  # ZeRO-2 engine; checkpoint layout and universal-checkpoint conversion tested on it
    "transformers==5.23.0",  # the Llama model we prune and train; layer_idx/KV-cache behaviour tested on it
    "datasets==5.2.0",  # the Hugging Face streaming input path of data prep
    "zstandard==0.25.0",  # streamed decompression of SlimPajama's .jsonl.zst
    "sentencepiece==0.2.3",  # the exact LLaMA/Vicuna token ids (HF fast tokenizers differ)
    "lm-eval==0.4.13",  # zero-shot tasks; results compared to simple_evaluate run directly
    "pyyaml==6.0.3",  # run configs
    "numpy>=1.26,<3",  # memory-mapped shards; a range so torch/datasets choose a compatible build
    "tqdm==4.70.1",  # progress bars with ETA
    "matplotlib==3.11.2",  # curves.png
    "tensorboard==2.21.0",  # training logs users already read
    "peft==0.21.2",  # LoRA retraining after pruning
    "safetensors==0.8.0",  # the pruned / exported model format
    "accelerate==1.15.0",  # needed by peft and lm-eval's HF model wrapper
    "psutil==7.2.2",  # peak-RSS and memory figures in logs and benchmarks
    "jinja2==3.1.6",  # chat templates of tokenizer.json models (transformers renders them and refuses older)
    "gguf==0.19.0",  # GGUF import (launch/import_gguf.py): transformers' GGUF loader reads files with it; tested on it
]

EXTRAS = {
    "dev": [
        "pytest==9.2.0",  # the test runner
        "pytest-timeout==2.4.0",  # a hung distributed test fails instead of stalling CI
        "pytest-xdist==3.8.0",  # `make test` runs test files on both cores: most multi-process tests wait on I/O
        "filelock==4.3.1",  # the test workers share one trained pruning model: the first trains it, under a lock
        "ruff==0.14.0",  # `make lint`: unused names, import order, pycodestyle errors
        "mypy==1.18.2",  # `make lint`: the package's type hints checked
        "types-PyYAML==6.0.12.20250915",  # yaml's type stubs for mypy
    ],
    # CUDA machines only (`pip install -e '.[gpu]'`): it pulls Triton, which a CPU install neither needs nor runs
    "gpu": [
        "liger-kernel==0.8.5",  # model.liger: fused RMSNorm, RoPE, SwiGLU Triton kernels (shortened/train/kernels.py)
    ],
}

setup(
    name="shortened",
    version="0.1.0",
    description="Continued pretraining of depth-pruned LLaMA models (Shortened LLaMA) on DeepSpeed",
    packages=find_packages(include=["shortened", "shortened.*"]),
    package_data={"shortened.eval": ["tasks.yaml"]},  # the evaluation task table ships with the package
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
