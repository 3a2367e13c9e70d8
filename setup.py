"""fl_lib: federated learning for speech recognition on ESPnet, Lhotse and k2."""
from setuptools import find_packages, setup

setup(
    name="fl_lib",
    version="0.1.0",
    description="Federated acoustic-model training (FedAvg, DGA, BMUF) around stock ESPnet ASR models",
    packages=find_packages(include=["fl_lib", "fl_lib.*"]),
    python_requires=">=3.11,<3.12",
    # Exact pins live in requirements.txt (top level) and constraints.txt (the full
    # resolved set); these ranges only say what the code was written against.
    install_requires=[
        "torch==2.9.1",
        "torchaudio==2.9.1",
        "espnet==202511",
        "lhotse>=1.30",
        "kaldiio>=2.18",
        "sentencepiece>=0.2",
        "tensorboard>=2.14",
        "jiwer>=3.0",
        "matplotlib>=3.7",
        "tqdm",
        "PyYAML",
        "dp-accounting>=0.6",
        "flwr[simulation]==1.42.0",
    ],
    extras_require={"test": ["pytest>=8"]},
)
