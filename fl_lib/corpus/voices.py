"""TTS voice bases, pseudo-speakers built from them, and the commands that render them.

Each pseudo-speaker is a voice base (a Debian TTS voice recorded from a real
person, or an espeak-ng variant) plus a pitch shift and a speaking-rate factor.
The engine's own controls are used where they exist (they sound more natural
than signal processing); sox does the rest, resamples to 16 kHz, normalizes
and encodes FLAC.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
FESTIVAL_VOICE_DIR = Path("/usr/share/festival/voices")


@dataclass(frozen=True)
class VoiceBase:
    """One TTS voice. f0 is its measured median F0 (Hz): flite takes absolute F0 targets."""

    name: str
    engine: str
    voice: str
    sex: str
    f0: float
    apt: str
    rate: int  # native sample rate


BASES: dict[str, VoiceBase] = {
    b.name: b
    for b in (
        VoiceBase("flite:slt", "flite", "slt", "F", 172.0, "flite", 16000),
        VoiceBase("flite:rms", "flite", "rms", "M", 100.0, "flite", 16000),
        VoiceBase("flite:awb", "flite", "awb", "M", 125.0, "flite", 16000),
        VoiceBase("flite:kal16", "flite", "kal16", "M", 91.0, "flite", 16000),
        VoiceBase("festival:kal_diphone", "festival", "kal_diphone", "M", 106.0, "festvox-kallpc16k", 16000),
        VoiceBase("festival:ked_diphone", "festival", "ked_diphone", "M", 107.0, "festvox-kdlpc16k", 16000),
        VoiceBase("festival:cmu_us_slt_arctic_hts", "festival", "cmu_us_slt_arctic_hts", "F", 177.0,
                  "festvox-us-slt-hts", 32000),
        *(
            VoiceBase(f"espeak:{v}", "espeak", v, v.split("+")[1][0].upper(), 0.0, "espeak-ng", 22050)
            for v in ("en-us+f3", "en-us+f4", "en-us+f5", "en+m3", "en+m5", "en-us+m7")
        ),
    )
}
# Each engine's binary, which is also the name of its Debian package.
ENGINE_BINARY = {"flite": "flite", "festival": "festival", "espeak": "espeak-ng"}


@dataclass(frozen=True)
class Speaker:
    """A pseudo-speaker: voice base + perturbation + what it likes to say."""

    speaker_id: int
    base: str
    pitch: float  # semitones relative to the base voice
    rate: float  # speaking-rate factor, >1 is faster
    heldout: bool
    category_prefs: dict[str, float] = field(default_factory=dict)

    @property
    def voice(self) -> VoiceBase:
        return BASES[self.base]

    def description(self) -> str:
        """Short human-readable voice recipe, the NAME column of SPEAKERS.TXT."""
        return f"{self.base} pitch{self.pitch:+.1f} rate{self.rate:.2f}"

    def engine_params(self) -> dict[str, float | int]:
        """The engine- and sox-level settings that realize pitch and rate."""
        engine = self.voice.engine
        if engine == "flite":
            return {"duration_stretch": round(1.0 / self.rate, 3),
                    "int_f0_target_mean": round(self.voice.f0 * 2 ** (self.pitch / 12), 1)}
        if engine == "espeak":
            return {"speed_wpm": round(175 * self.rate), "pitch": min(99, max(0, round(50 + 5 * self.pitch)))}
        return {"sox_pitch_cents": round(100 * self.pitch), "sox_tempo": round(self.rate, 3)}


def check_tools(bases: set[str]) -> None:
    """Fail early, naming the Debian package, when a tool or voice is missing."""
    missing: list[str] = []
    if shutil.which("sox") is None:
        missing.append("sox")
    for name in sorted(bases):
        if name not in BASES:
            raise ValueError(f"unknown voice base {name!r}; known: {sorted(BASES)}")
        voice = BASES[name]
        binary = ENGINE_BINARY[voice.engine]
        if shutil.which(binary) is None:
            missing.append(binary)
        elif voice.engine == "flite":
            listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True, check=True).stdout
            if voice.voice not in listed.split():
                missing.append(f"{voice.apt} (flite voice {voice.voice})")
        elif voice.engine == "festival" and not any(FESTIVAL_VOICE_DIR.glob(f"*/{voice.voice}")):
            missing.append(voice.apt)
    if missing:
        packages = " ".join(sorted({m.split()[0] for m in missing}))
        raise RuntimeError(f"missing TTS tools/voices: {', '.join(sorted(set(missing)))}. "
                           f"Install them with: apt-get install {packages}")


def run_tool(cmd: list[str]) -> None:
    """Run a command; on failure raise with its stderr, which says what went wrong."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}")


def synth_command(speaker: Speaker, text: str, wav: Path) -> list[str]:
    """Command that renders one utterance with flite or espeak-ng (festival runs in batches)."""
    params = speaker.engine_params()
    voice = speaker.voice
    spoken = text.lower()  # all-caps words can be read as acronyms
    if voice.engine == "flite":
        return ["flite", "-voice", voice.voice,
                "--setf", f"duration_stretch={params['duration_stretch']}",
                "--setf", f"int_f0_target_mean={params['int_f0_target_mean']}",
                "-t", spoken, "-o", str(wav)]
    if voice.engine == "espeak":
        return ["espeak-ng", "-v", voice.voice, "-s", str(params["speed_wpm"]), "-p", str(params["pitch"]),
                "-w", str(wav), spoken]
    raise ValueError(f"{voice.engine} voices are rendered in batches, see festival_script")


def festival_script(voice: VoiceBase, items: list[tuple[str, Path]]) -> str:
    """A festival --batch script rendering many utterances in one process (100x cheaper than one each)."""
    lines = [f"(voice_{voice.voice})"]
    for text, wav in items:
        spoken = text.lower()
        if not spoken.replace(" ", "").isalpha() or '"' in str(wav):
            raise ValueError(f"unsafe text or path for a festival script: {text!r} {wav}")
        lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{spoken}")) "{wav}" \'riff)')
    return "\n".join(lines) + "\n"


def sox_command(speaker: Speaker, raw: Path, flac: Path) -> list[str]:
    """Resample to 16 kHz mono, perturb (festival voices only), normalize to -1 dBFS, encode 16-bit FLAC.

    -D (no dither) and -R (fixed seeds) keep the output bit-identical across runs.
    """
    effects = ["rate", str(SAMPLE_RATE)]  # first: pitch/tempo then work on fewer samples
    params = speaker.engine_params()
    if speaker.voice.engine == "festival":
        if params["sox_pitch_cents"]:
            effects += ["pitch", str(params["sox_pitch_cents"])]
        if params["sox_tempo"] != 1.0:
            effects += ["tempo", "-s", str(params["sox_tempo"])]
    effects += ["norm", "-1"]
    return ["sox", "-D", "-R", str(raw), "-b", "16", "-c", "1", str(flac), *effects]


def postprocess(speaker: Speaker, raw: Path, flac: Path) -> float:
    """Raw TTS wav -> final FLAC; returns its duration in seconds.

    16 kHz output that needs no sox effect (most flite voices) is peak-normalized
    to -1 dBFS in-process, as sox's `norm -1` would: one process fewer per utterance.
    """
    if speaker.voice.engine == "festival" or speaker.voice.rate != SAMPLE_RATE:
        run_tool(sox_command(speaker, raw, flac))
        return sf.info(str(flac)).duration
    audio, rate = sf.read(str(raw), dtype="float64")
    if rate != SAMPLE_RATE or audio.ndim != 1:
        raise ValueError(f"{raw}: expected 16 kHz mono from {speaker.base}, got {rate} Hz, shape {audio.shape}")
    peak = np.abs(audio).max()
    if peak > 0:
        audio *= 10 ** (-1 / 20) / peak
    sf.write(str(flac), audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return len(audio) / SAMPLE_RATE
