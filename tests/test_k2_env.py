"""The k2 environment (.venv-k2, python3.9 + torch 1.13.1) runs, and exchanges data through Kaldi ark files.

k2's PyPI wheels exist only for torch 1.13.1, so k2 tools run in their own
environment; this checks that `make install` built it and that a matrix written
here with kaldiio comes back from a k2 CTC decode there.
"""
import subprocess
from pathlib import Path

import kaldiio
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
K2_PYTHON = ROOT / ".venv-k2/bin/python"

K2_SCRIPT = r"""
import sys, kaldiio, torch, k2
logp = torch.from_numpy(kaldiio.load_mat(sys.argv[1])).float()   # [T, V] log-probs, blank = 0
T, V = logp.shape
dense = k2.DenseFsaVec(logp.unsqueeze(0), torch.tensor([[0, 0, T]], dtype=torch.int32))
lattice = k2.intersect_dense(k2.arc_sort(k2.ctc_topo(V - 1)), dense, output_beam=10.0)
best = k2.shortest_path(lattice, use_double_scores=True)
labels = [int(x) for x in best[0].aux_labels.tolist() if x > 0]
print(" ".join(map(str, labels)))
"""


def test_k2_ctc_decode_over_kaldi_ark(tmp_path):
    assert K2_PYTHON.exists(), "run `make install`: .venv-k2 is missing"
    # Frames spell 3 3 _ 1 2 2 (blank = 0): the best CTC path is 3 1 2.
    frames = [3, 3, 0, 1, 2, 2]
    logp = np.full((len(frames), 4), np.log(0.02), dtype=np.float32)
    for t, s in enumerate(frames):
        logp[t, s] = np.log(0.94)
    ark = tmp_path / "logp.ark"
    kaldiio.save_mat(str(ark), logp)
    out = subprocess.run([str(K2_PYTHON), "-c", K2_SCRIPT, str(ark)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3", "1", "2"]
