"""Darknet .cfg lexer, parser and writer.

Lexing follows darknet's `read_cfg`: every space, tab and newline is removed from a line, empty
lines and lines starting with '#' or ';' are skipped, '[x]' opens a section, anything else is
'key=value' and the first occurrence of a key wins. Values are typed on demand by the layer that
reads them, so an error can always name the file and line the bad value came from.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CfgError, CfgWarning

SECTION_ALIASES = {
    "network": "net",
    "conv": "convolutional",
    "max": "maxpool",
    "avg": "avgpool",
    "conn": "connected",
    "soft": "softmax",
    "lrn": "normalization",
}

# Every section name darknet's parser knows (pjreddie's and AlexeyAB's), after the aliases. The
# parser accepts any name; which of them detkit builds is the layer registry's business
# (detkit.registry), and detkit.model tells "not supported" (a darknet section without a
# builder) from "unknown" (not darknet's either) with this list.
DARKNET_SECTIONS = {
    "net", "convolutional", "maxpool", "avgpool", "route", "shortcut", "upsample", "reorg",
    "dropout", "connected", "softmax", "cost", "yolo", "region",
    "local", "deconvolutional", "deconv", "crop", "detection", "iseg", "activation", "logistic",
    "crnn", "gru", "lstm", "rnn", "normalization", "batchnorm", "reorg3d",
    "sam", "scale_channels", "conv_lstm", "gaussian_yolo", "contrastive", "implicit_add",
    "implicit_mul", "empty", "silence", "upsample3d",
}

# Keys every darknet layer may carry (parse_network_cfg reads them for any section).
COMMON_KEYS = {
    "dontload", "dontsave", "numload", "dontloadscales", "stopbackward", "onlyforward",
    "learning_rate", "smooth", "truth",
}


@dataclass
class Section:
    """One [section] of a cfg: its options with their line numbers, and which keys were read."""

    kind: str
    line: int
    path: str = "<cfg>"
    index: int = -1  # darknet layer index; -1 for [net]
    options: dict[str, tuple[str, int]] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    raw_kind: str = ""

    def where(self, key: str | None = None) -> str:
        line = self.options[key][1] if key is not None and key in self.options else self.line
        return f"{self.path}:{line}"

    def error(self, message: str, key: str | None = None) -> CfgError:
        return CfgError(f"{self.where(key)}: [{self.raw_kind or self.kind}] {message}")

    def has(self, key: str) -> bool:
        return key in self.options

    def get_str(self, key: str, default: str | None = None) -> str:
        self.used.add(key)
        if key in self.options:
            return self.options[key][0]
        if default is None:
            raise self.error(f"missing required key '{key}'")
        return default

    def get_int(self, key: str, default: int | None = None) -> int:
        self.used.add(key)
        if key not in self.options:
            if default is None:
                raise self.error(f"missing required key '{key}'")
            return default
        value = self.options[key][0]
        try:
            return int(float(value)) if _is_float_int(value) else int(value)
        except ValueError:
            raise self.error(f"'{key}={value}' is not an integer", key) from None

    def get_float(self, key: str, default: float | None = None) -> float:
        self.used.add(key)
        if key not in self.options:
            if default is None:
                raise self.error(f"missing required key '{key}'")
            return default
        value = self.options[key][0]
        try:
            return float(value)
        except ValueError:
            raise self.error(f"'{key}={value}' is not a number", key) from None

    def get_ints(self, key: str, default: list[int] | None = None) -> list[int]:
        return [int(v) for v in self._numbers(key, default, int)]

    def get_floats(self, key: str, default: list[float] | None = None) -> list[float]:
        return [float(v) for v in self._numbers(key, default, float)]

    def _numbers(self, key: str, default, cast) -> list:
        self.used.add(key)
        if key not in self.options:
            if default is None:
                raise self.error(f"missing required key '{key}'")
            return list(default)
        value = self.options[key][0]
        items = [item for item in value.split(",") if item != ""]
        try:
            return [cast(item) for item in items]
        except ValueError:
            kind = "integers" if cast is int else "numbers"
            raise self.error(f"'{key}={value}' is not a list of {kind}", key) from None

    def unused_keys(self) -> list[str]:
        return [k for k in self.options if k not in self.used and k not in COMMON_KEYS]


def _is_float_int(value: str) -> bool:
    """Darknet reads ints with atoi, so '1.0' would be 1; accept it only when it is integral."""
    try:
        as_float = float(value)
    except ValueError:
        return False
    return "." in value and as_float.is_integer()


def parse_cfg_text(text: str, path: str = "<cfg>") -> list[Section]:
    """Parse cfg text into sections. The first section must be [net] (or [network])."""
    text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark (Windows editors write one)
    sections: list[Section] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = "".join(raw.split())
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]") or len(line) < 3:
                raise CfgError(f"{path}:{lineno}: malformed section header '{raw.strip()}'")
            sections.append(_new_section(line[1:-1], lineno, path, len(sections)))
            continue
        if not sections:
            raise CfgError(f"{path}:{lineno}: option '{raw.strip()}' before the first [section]")
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise CfgError(f"{path}:{lineno}: malformed line '{raw.strip()}' (expected key=value)")
        sections[-1].options.setdefault(key, (value, lineno))
    if not sections:
        raise CfgError(f"{path}: no sections found (is this a darknet .cfg file?)")
    if sections[0].kind != "net":
        raise CfgError(f"{path}:{sections[0].line}: the first section must be [net] or [network]")
    for later in sections[1:]:
        if later.kind == "net":
            raise CfgError(f"{later.path}:{later.line}: [net] may only be the first section")
    return sections


def _new_section(name: str, lineno: int, path: str, position: int) -> Section:
    raw = name.lower()
    kind = SECTION_ALIASES.get(raw, raw)
    return Section(kind=kind, line=lineno, path=path, index=position - 1, raw_kind=name)


def parse_cfg(source: str | Path) -> list[Section]:
    """Parse a cfg file."""
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise CfgError(f"{path}: cfg file not found") from None
    except IsADirectoryError:
        raise CfgError(f"{path}: is a directory, not a cfg file") from None
    except OSError as exc:
        raise CfgError(f"{path}: cannot read cfg file ({exc.strerror})") from None
    return parse_cfg_text(text, str(path))


def write_cfg(sections: list[Section]) -> str:
    """Write sections back as cfg text; parse_cfg_text(write_cfg(s)) gives the same options."""
    blocks = []
    for section in sections:
        lines = [f"[{section.kind}]"]
        lines += [f"{key}={value}" for key, (value, _line) in section.options.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def warn_unused(sections: list[Section]) -> None:
    """One warning per key nobody read, like darknet's 'Unused field'."""
    for section in sections:
        for key in section.unused_keys():
            value = section.options[key][0]
            warnings.warn(
                f"{section.where(key)}: unused field '{key} = {value}' in [{section.kind}]",
                CfgWarning,
                stacklevel=3,
            )
