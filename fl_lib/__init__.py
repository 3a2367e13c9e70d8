"""fl_lib: federated learning for speech recognition around stock ESPnet models.

Kept import-light on purpose: ESPnet (about 12 s to import) is only loaded by the
modules that build or run models.
"""

__version__ = "0.1.0"
