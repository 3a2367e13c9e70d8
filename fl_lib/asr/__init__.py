"""ESPnet model building, decoding, scoring and result reports."""

