from pathlib import Path

from setuptools import setup

setup(
    name="extrema",
    version="0.1.0",
    description="ExtreMA (Extreme Masking for Learning Instance and Distributed Visual Representations) as a "
    "HuggingFace transformers model, with an accelerate training script",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    py_modules=[
        "cli_extrema",
        "configuration_extrema",
        "modeling_extrema",
        "data_extrema",
        "eval_extrema",
        "export_extrema",
        "train_extrema",
    ],
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "transformers>=5.0,<6",
        "datasets>=5.1",  # shuffle(max_buffer_input_shards=), split_dataset_by_node(strategy=)
        "accelerate>=1.0",
        "timm>=1.0",  # the fine-tuning recipe: RandAugment, random erasing, Mixup / CutMix
        "safetensors>=0.4",
        "huggingface-hub>=0.30",
        "pillow",
        "tqdm",
        "filelock",
        "tensorboard",
    ],
    extras_require={
        # parameterized: imported by transformers' common model tests (tests/test_transformers_common.py); the onnx
        # packages: tests/test_onnx.py
        "test": ["pytest>=8", "matplotlib", "parameterized", "onnx", "onnxscript", "onnxruntime"],
        "onnx": ["onnx", "onnxscript", "onnxruntime"],  # scripts/export_onnx.py
        "plots": ["matplotlib"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["extrema-train=train_extrema:main"]},
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
