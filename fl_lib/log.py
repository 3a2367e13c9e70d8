"""One log format for every fl_lib tool: time, module:line, level (as ESPnet's tools print)."""
from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s"


def drop_pad_mask_warning(record: logging.LogRecord) -> bool:
    """ESPnet's RNN models warn about make_pad_mask on every batch; it says nothing about the result."""
    return not record.getMessage().startswith("Using make_pad_mask with a list of lengths")


def setup_logging(level: int | str = logging.INFO) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(drop_pad_mask_warning)
