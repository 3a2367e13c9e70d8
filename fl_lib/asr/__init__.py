"""ESPnet model building, decoding, scoring and result reports."""

LOG_FORMAT = "%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s"
