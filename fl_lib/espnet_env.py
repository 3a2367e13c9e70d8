"""Import ESPnet without network access at import time.

`g2p_en`, which ESPnet imports eagerly, calls `nltk.download('cmudict')` at
import when the corpus is missing. On a machine without internet that costs a
failed connection and a misleading error on every start. fl_lib never uses
phoneme tokenizers, so an empty placeholder satisfies the lookup.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

_PLACEHOLDERS = ("corpora/cmudict.zip", "taggers/averaged_perceptron_tagger_eng.zip")


def quiet_nltk() -> None:
    """Point NLTK_DATA at a folder whose placeholders stop the import-time download."""
    if "NLTK_DATA" in os.environ:
        root = Path(os.environ["NLTK_DATA"].split(os.pathsep)[0])
    else:
        root = Path.home() / ".cache" / "fl_lib" / "nltk_data"
        os.environ["NLTK_DATA"] = str(root)
    for rel in _PLACEHOLDERS:
        path = root / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            zipfile.ZipFile(path, "w").close()


def asr_task():
    """Return ESPnet's `ASRTask` class (imports ESPnet on first call)."""
    quiet_nltk()
    from espnet2.tasks.asr import ASRTask

    return ASRTask
