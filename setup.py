from setuptools import find_packages, setup

setup(
    name="lora-core",
    version="0.1.0",
    description="Instruction-tune LLaMA-family models with LoRA on modest hardware and ship them to llama.cpp",
    packages=find_packages(include=["lora_core", "lora_core.*", "kernels", "kernels.*"]),
    py_modules=["train", "generate", "export"],
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "triton",
        "sentencepiece",
        "protobuf",  # sentencepiece's model proto, to rebuild SentencePiece vocabularies stored in GGUF
        "safetensors",
        "numpy",
        "gguf",
        "tokenizers",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # independent references for the tests; never imported by runtime code
        "test": ["pytest", "transformers", "peft"],
        # llama.cpp itself as an oracle (compiles from source: several minutes)
        "oracle": ["llama-cpp-python"],
    },
)
