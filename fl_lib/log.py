"""One log format for every fl_lib tool: time, module:line, level (as ESPnet's tools print)."""
import logging

LOG_FORMAT = "%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s"


def setup_logging(level: int | str = logging.INFO) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)
