"""fl_lib: federated learning for speech recognition around stock ESPnet models.

Kept import-light on purpose: ESPnet (about 12 s to import) is only loaded by the
modules that build or run models.
"""
import os

# MKL's conditional numerical reproducibility: without it, MKL kernels may sum
# in an order that depends on the memory alignment of their operands, so the
# same model can decode differently in two processes and a resumed run can
# drift from an uninterrupted one. AUTO keeps the fastest code path for the CPU.
# It must be set before MKL starts; spawned workers inherit it.
os.environ.setdefault("MKL_CBWR", "AUTO")

__version__ = "0.1.0"
