"""Confidence of pseudo-labels: how much the seed model believes its own hypothesis.

`lattice` computes it with k2 in `.venv-k2` (python3.9, torch 1.13.1), so it and
`tables` import only the standard library, numpy, torch, kaldiio and k2; `beam`
is the fallback from ESPnet's beam score when that environment is missing.
"""
