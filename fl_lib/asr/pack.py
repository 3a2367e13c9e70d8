"""Pack a decoded model for stock `Speech2Text`, as asr.sh's last stage does (run.sh stage 7).

ESPnet's packer (`python -m espnet2.bin.pack asr`) zips the training config, the
model, an LM if any and `--option` files, and writes `meta.yaml`. ESPnet's
`unpack` reads that back as Speech2Text's `asr_train_config` / `asr_model_file`
(+ `lm_train_config` / `lm_file`) and rewrites every path inside those yaml files
that names a member of the archive to the unpacked copy.

Two things that packer leaves to its caller are done here:

- **The decoding options.** Neither the packer nor `Speech2Text.from_pretrained`
  carries them ("Decoding parameters are not included in the model file", says
  espnet_model_zoo), and Speech2Text's defaults (beam 20, ctc_weight 0.5,
  lm_weight 1) are not what stage 6 decodes with. The pack holds the decoding
  config as `decode.yaml` at its root, checked as stage 6 checks it; the user
  passes its keys to `from_pretrained`.
- **Portable paths.** `unpack` rewrites only paths equal to a member's name, and
  config.yaml names the sentencepiece model and the feature statistics as run.sh
  gave them (absolute with `--data /abs/...`). The files are laid out under fixed
  relative names in a staging directory, with yaml copies that name them so, and
  ESPnet's packer runs there.
"""
from __future__ import annotations

import filecmp
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import yaml

from fl_lib.asr.decode import load_inference_config, with_lm
from fl_lib.atomic import atomic_path

logger = logging.getLogger(__name__)

DECODE_YAML = "decode.yaml"
# Where a file that a config.yaml names goes in the pack, by the key that names it.
REFERENCED = {
    "bpemodel": "data/token_list/bpe.model",
    "token_list": "data/token_list/tokens.txt",
    "stats_file": "exp/asr_stats/feats_stats.npz",
}
DECODE_HEADER = """\
# Speech2Text decoding options of this pack (run.sh stage 6's decoding config). ESPnet's pack
# carries no decoding options, and Speech2Text's defaults are not these:
#   files = unpack("<pack>.zip", "model", use_cache=False)   # espnet2.main_funcs.pack_funcs
#   s2t = Speech2Text.from_pretrained(**files, **yaml.safe_load(open("model/decode.yaml")))
"""


def _place(src: Path, dst: Path) -> None:
    """`dst` becomes `src`'s content: a hard link when possible (no copy of a large model).

    Not a symlink: ESPnet's packer resolves symlinks and would store the original path. `src`
    itself may be one (ESPnet's trainers write valid.loss.best.pth -> <N>epoch.pth): the link
    goes to its target.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


class _Staging:
    """A directory laid out as the archive will be, with relative names only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sources: dict[str, Path] = {}

    def add(self, src: Path, name: str, what: str) -> str:
        src = Path(src)
        if not src.is_file():
            raise FileNotFoundError(f"{what}: {src} does not exist (relative paths are read from {Path.cwd()})")
        if name in self.sources:
            if not filecmp.cmp(self.sources[name], src, shallow=False):
                raise ValueError(f"{what}: {src} differs from {self.sources[name]}, which the pack already "
                                 f"holds as {name}; the LM must use the ASR model's tokens")
            return name
        _place(src, self.root / name)
        self.sources[name] = src
        return name

    def add_config(self, config: Path, name: str, what: str) -> str:
        """config.yaml with every file it names (REFERENCED keys) staged and renamed."""

        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                out = {}
                for key, value in node.items():
                    if key in REFERENCED and isinstance(value, str) and value not in ("", "none"):
                        out[key] = self.add(Path(value), REFERENCED[key], f"{what} {config}: {key}")
                    else:
                        out[key] = walk(value)
                return out
            if isinstance(node, list):
                return [walk(v) for v in node]
            return node

        with open(config, encoding="utf-8") as f:
            conf = yaml.safe_load(f)
        if not isinstance(conf, dict):
            raise ValueError(f"{config}: not an ESPnet config.yaml")
        conf = walk(conf)
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(conf, f, indent=4, sort_keys=False, allow_unicode=True)
        self.sources[name] = Path(config)
        return name


def pack_model(
    exp_dir: Path,
    model: str,
    inference_config: Path,
    outpath: Path,
    lm_train_config: Optional[Path] = None,
    lm_file: Optional[Path] = None,
) -> Path:
    """Zip `exp_dir`'s `model` (as stage 6 resolves it), its config, tokens, statistics, the LM
    and the decoding config with `espnet2.bin.pack asr`; returns `outpath`.

    The archive: meta.yaml, decode.yaml, exp/asr/{config.yaml, <model>, RESULTS.md},
    exp/lm/{config.yaml, <lm model>}, data/token_list/{bpe.model, tokens.txt},
    exp/asr_stats/feats_stats.npz (each when the model has it).
    """
    from fl_lib.asr.average import resolve_model

    exp_dir, outpath = Path(exp_dir), Path(outpath)
    if outpath.suffix != ".zip":
        raise ValueError(f"outpath must end in .zip, got {outpath}")
    config = exp_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} missing: exp_dir must hold the training config.yaml")
    decode = with_lm(load_inference_config(Path(inference_config)), lm_train_config, lm_file)
    if "ngram_file" in decode:
        raise ValueError(f"{inference_config}: ngram_file: ESPnet's packer carries no n-gram model")
    lm = (decode.pop("lm_train_config", None), decode.pop("lm_file", None))
    model_path = resolve_model(exp_dir, model)

    outpath.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pack.", dir=outpath.parent) as tmp:
        stage = _Staging(Path(tmp))
        args = ["--asr_train_config", stage.add_config(config, "exp/asr/config.yaml", "ASR model"),
                "--asr_model_file", stage.add(model_path, f"exp/asr/{model_path.name}", "ASR model")]
        asr_conf = yaml.safe_load((stage.root / "exp/asr/config.yaml").read_text(encoding="utf-8"))
        if isinstance(asr_conf.get("token_list"), list):  # as ESPnet writes it; tokens.txt for the reader
            tokens = stage.root / REFERENCED["token_list"]
            tokens.parent.mkdir(parents=True, exist_ok=True)
            tokens.write_text("".join(t + "\n" for t in asr_conf["token_list"]), encoding="utf-8")
            stage.sources[REFERENCED["token_list"]] = tokens
        if lm[0] is not None:
            args += ["--lm_train_config", stage.add_config(Path(lm[0]), "exp/lm/config.yaml", "LM"),
                     "--lm_file", stage.add(Path(lm[1]), f"exp/lm/{Path(lm[1]).name}", "LM")]
        (stage.root / DECODE_YAML).write_text(
            DECODE_HEADER + yaml.safe_dump(decode, sort_keys=False), encoding="utf-8")
        stage.sources[DECODE_YAML] = Path(inference_config)
        if (exp_dir / "RESULTS.md").is_file():
            stage.add(exp_dir / "RESULTS.md", "exp/asr/RESULTS.md", "results")
        packed = set(args[1::2])
        for name in sorted(set(stage.sources) - packed):
            args += ["--option", name]
        with atomic_path(outpath.absolute()) as tmp_zip:
            cmd = [sys.executable, "-m", "espnet2.bin.pack", "asr", *args, "--outpath", str(tmp_zip)]
            proc = subprocess.run(cmd, cwd=stage.root, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"espnet2.bin.pack failed:\n{proc.stderr[-3000:]}")
    logger.info("packed %s%s with decoding options %s -> %s", model_path,
                f" and the LM {lm[1]}" if lm[1] else "", decode, outpath)
    return outpath
