"""A ~100-word home-assistant grammar: the text side of the embedded corpus.

Small on purpose: a tiny vocabulary lets a 2M-parameter model learn it in CPU
minutes, while digit strings, names and numbers keep the sentence space large
enough that dev/test sentences can be kept out of training.
"""
from __future__ import annotations

import hashlib
import random
from typing import AbstractSet, Callable, Optional

ROOMS = ("KITCHEN", "BEDROOM", "BATHROOM", "GARAGE", "OFFICE", "HALLWAY", "GARDEN", "LIVING ROOM")
DEVICES = ("LIGHTS", "FAN", "HEATER", "RADIO", "OVEN")
NAMES = ("ALICE", "BOB", "CAROL", "DAVID", "EMMA", "FRANK", "GRACE", "HENRY", "JULIA", "KEVIN")
PHRASES = (
    "I AM RUNNING LATE",
    "I WILL CALL YOU BACK",
    "SEE YOU TONIGHT",
    "I AM HOME",
    "I WILL BE HOME SOON",
    "THANK YOU",
    "CALL ME BACK PLEASE",
    "I AM AT THE OFFICE",
)
DIGITS = ("ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE")
TEENS = ("TEN", "ELEVEN", "TWELVE", "THIRTEEN", "FOURTEEN", "FIFTEEN", "SIXTEEN", "SEVENTEEN",
         "EIGHTEEN", "NINETEEN")
TENS = ("", "", "TWENTY", "THIRTY", "FORTY", "FIFTY", "SIXTY", "SEVENTY", "EIGHTY", "NINETY")

Partition = str  # "train", "dev" or "test"


def number_words(n: int) -> str:
    """0..99 as spoken words, e.g. 72 -> 'SEVENTY TWO'."""
    if not 0 <= n <= 99:
        raise ValueError(f"number out of grammar range 0..99: {n}")
    if n < 10:
        return DIGITS[n]
    if n < 20:
        return TEENS[n - 10]
    tens, unit = divmod(n, 10)
    return TENS[tens] if unit == 0 else f"{TENS[tens]} {DIGITS[unit]}"


def _digit_string(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(DIGITS) for _ in range(length))


def _lights(rng: random.Random) -> str:
    room, device = rng.choice(ROOMS), rng.choice(DEVICES)
    form = rng.randrange(3)
    if form == 0:
        return f"TURN {rng.choice(('ON', 'OFF'))} THE {room} {device}"
    if form == 1:
        return f"TURN THE {device} IN THE {room} {rng.choice(('ON', 'OFF'))}"
    return f"TURN {rng.choice(('ON', 'OFF'))} THE {device} PLEASE"


def _thermostat(rng: random.Random) -> str:
    form = rng.randrange(3)
    if form == 0:
        return f"SET THE THERMOSTAT TO {number_words(rng.randint(55, 90))} DEGREES"
    if form == 1:
        return f"SET THE {rng.choice(ROOMS)} TEMPERATURE TO {number_words(rng.randint(55, 90))}"
    return f"{rng.choice(('RAISE', 'LOWER'))} THE TEMPERATURE BY {number_words(rng.randint(1, 10))} DEGREES"


def _call(rng: random.Random) -> str:
    form = rng.randrange(3)
    if form == 0:
        return f"CALL {_digit_string(rng, rng.choice((7, 10)))}"
    if form == 1:
        return f"DIAL {_digit_string(rng, rng.randint(4, 7))}"
    return f"CALL {rng.choice(NAMES)} AT {_digit_string(rng, 7)}"


def _message(rng: random.Random) -> str:
    name, phrase = rng.choice(NAMES), rng.choice(PHRASES)
    if rng.random() < 0.5:
        return f"SEND A MESSAGE TO {name} SAYING {phrase}"
    return f"TELL {name} {phrase}"


def _timer(rng: random.Random) -> str:
    form = rng.randrange(3)
    if form == 0:
        unit = rng.choice(("MINUTES", "SECONDS", "HOURS"))
        return f"SET A TIMER FOR {number_words(rng.randint(2, 59))} {unit}"
    hour = number_words(rng.randint(1, 12))
    minute = rng.choice(("", "FIFTEEN", "THIRTY", "FORTY FIVE", number_words(rng.randint(10, 59))))
    time = f"{hour} {minute}".strip()
    if form == 1:
        return f"WAKE ME UP AT {time}"
    return f"SET AN ALARM FOR {time}"


def _media(rng: random.Random) -> str:
    form = rng.randrange(4)
    if form == 0:
        return f"PLAY {rng.choice(('SOME MUSIC', 'THE NEWS', 'THE RADIO'))} IN THE {rng.choice(ROOMS)}"
    if form == 3:
        return f"PLAY SOME MUSIC FOR {number_words(rng.randint(2, 59))} MINUTES"
    if form == 1:
        return f"SET THE VOLUME TO {number_words(rng.randint(1, 20))}"
    return f"TURN THE VOLUME {rng.choice(('UP', 'DOWN'))} IN THE {rng.choice(ROOMS)}"


def _doors(rng: random.Random) -> str:
    verb = rng.choice(("LOCK", "UNLOCK", "OPEN", "CLOSE"))
    if rng.random() < 0.5:
        return f"{verb} THE {rng.choice(('FRONT', 'BACK', 'GARAGE'))} DOOR"
    return f"{verb} THE {rng.choice(ROOMS)} {rng.choice(('DOOR', 'WINDOWS'))}"


CATEGORIES: dict[str, Callable[[random.Random], str]] = {
    "lights": _lights,
    "thermostat": _thermostat,
    "call": _call,
    "message": _message,
    "timer": _timer,
    "media": _media,
    "doors": _doors,
}


def partition_of(text: str, eval_fraction: float) -> Partition:
    """Which split a sentence belongs to, from a hash of its text alone.

    Independent of seed and speaker, so a dev/test sentence can never be drawn
    for training by any speaker of any config with the same eval_fraction.
    """
    bucket = int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64
    if bucket < eval_fraction / 2:
        return "dev"
    if bucket < eval_fraction:
        return "test"
    return "train"


class NoSentenceLeft(RuntimeError):
    """Rejection sampling found no acceptable sentence of a category."""


def sample_sentence(
    rng: random.Random, category: str, partition: Partition, eval_fraction: float, max_tries: int = 2000,
    exclude: Optional[AbstractSet[str]] = None,
) -> str:
    """Rejection-sample a sentence of `category` that hashes into `partition` and is not in `exclude`."""
    generate = CATEGORIES[category]
    for _ in range(max_tries):
        text = generate(rng)
        if partition_of(text, eval_fraction) == partition and (exclude is None or text not in exclude):
            return text
    unused = " unused" if exclude else ""
    raise NoSentenceLeft(f"no{unused} {partition!r} sentence of category {category!r} in {max_tries} draws; "
                         f"eval_fraction={eval_fraction} is too small")


def distinct_sentences(rng: random.Random, prefs: dict[str, float], count: int, partition: Partition,
                       eval_fraction: float, used: set[str], exhausted: set[str]) -> list[str]:
    """`count` sentences of `partition` that are not in `used` (which they join), categories drawn by `prefs`.

    A category with no unused sentence left (none in 2000 draws) is added to `exhausted`
    and the speaker's next preferred categories take its share. Deterministic for a seeded `rng`.
    """
    out = []
    while len(out) < count:
        categories = [c for c in prefs if c not in exhausted]
        if not categories:
            raise NoSentenceLeft(f"the grammar's {partition!r} share has no unused sentence left after "
                                 f"{len(used)} distinct ones: fewer held-out utterances, or a larger eval_fraction")
        weights = [prefs[c] for c in categories]
        category = rng.choices(categories, weights=weights if sum(weights) > 0 else None)[0]
        try:
            text = sample_sentence(rng, category, partition, eval_fraction, exclude=used)
        except NoSentenceLeft:
            exhausted.add(category)
            continue
        used.add(text)
        out.append(text)
    return out


def lm_sentences(rng: random.Random, count: int, eval_fraction: float) -> list[str]:
    """`count` training-partition sentences, categories drawn uniformly: the embedded
    corpus's language-model text. As LibriSpeech's LM corpus leaves out the books of
    its dev and test sets, no sentence here can be a dev or test sentence."""
    categories = list(CATEGORIES)
    return [sample_sentence(rng, rng.choice(categories), "train", eval_fraction) for _ in range(count)]


def vocabulary() -> set[str]:
    """Every word the grammar can produce (used by tests and for reporting)."""
    words = set(" ".join(ROOMS + DEVICES + NAMES + PHRASES + DIGITS + TEENS + TENS).split())
    words |= {
        "TURN", "ON", "OFF", "THE", "IN", "PLEASE", "SET", "THERMOSTAT", "TO", "DEGREES", "TEMPERATURE",
        "RAISE", "LOWER", "BY", "CALL", "DIAL", "AT", "SEND", "A", "MESSAGE", "SAYING", "TELL",
        "TIMER", "FOR", "MINUTES", "SECONDS", "HOURS", "WAKE", "ME", "UP", "AN", "ALARM", "PLAY",
        "SOME", "MUSIC", "NEWS", "VOLUME", "DOWN", "LOCK", "UNLOCK", "OPEN", "CLOSE", "FRONT",
        "BACK", "DOOR", "WINDOWS",
    }
    return words
