"""Mutations of adapter folders for fuzzing the readers (used by tests and the fuzz benchmark).

Each mutation takes a valid folder's bytes (config text, weights bytes) and a random
generator and returns broken bytes. The readers must answer every one with a
:class:`ShareportError` or a valid adapter, never another exception.
"""

from __future__ import annotations

import json
import random
import struct

CONFIG_FIELDS = (
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "fan_in_fan_out",
    "layers_to_transform",
    "peft_type",
    "use_dora",
    "modules_to_save",
    "task_type",
    "shareport",
)
ODD_VALUES = (None, 0, -1, 1.5, "8", True, [], {}, [1, "x"], {"q_proj": "x"}, {"form": "nope"}, 1 << 62, float("inf"))


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if out:
            out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def mutate_header(data: bytes, rng: random.Random) -> bytes:
    """Rewrite one header entry's shape, dtype or offsets; keep the rest of the file."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    field = rng.choice(["shape", "dtype", "data_offsets", "drop"])
    if field == "drop":
        del header[name]
    elif field == "shape":
        header[name]["shape"] = rng.choice([[1 << 40, 1 << 40], [], [-1, 2], "x", [3, 3, 3]])
    elif field == "dtype":
        header[name]["dtype"] = rng.choice(["F16", "I64", "XX", 7])
    else:
        header[name]["data_offsets"] = rng.choice([[0, 1 << 50], [5, 1], None, [0]])
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def bad_header_length(data: bytes, rng: random.Random) -> bytes:
    return struct.pack("<Q", rng.choice([0, 1, len(data), 1 << 60])) + data[8:]


def mutate_config(text: str, rng: random.Random) -> str:
    """Change one field to an odd value, drop it, or break the JSON."""
    choice = rng.random()
    if choice < 0.15:
        return flip_bytes(text.encode(), rng).decode("utf-8", "replace")
    if choice < 0.25:
        return text[: rng.randrange(len(text) + 1)]
    config = json.loads(text)
    field = rng.choice(CONFIG_FIELDS)
    if rng.random() < 0.3:
        config.pop(field, None)
    else:
        config[field] = rng.choice(ODD_VALUES)
    return json.dumps(config)


WEIGHT_MUTATIONS = (flip_bytes, truncate, mutate_header, bad_header_length)
