"""The page's request, declared once: every field's API name, the label the page shows it
under, its type and its bounds for a given model and Limits, and the one way a value is
checked and a refusal worded.

A refusal is a RequestError: one line of at most MAX_MESSAGE characters that starts with the
field's label as the page shows it ("images: must be a whole number from 1 to 32, got 40"),
and the field's API name, so that the page can mark the box. A value is never echoed whole:
`shown` says what was sent in a few words ("a 301-digit number", "a list", "empty"). The
sampler fields (sampler, steps, seed) are SamplingSettings' own declarations, their choices and
ranges read from it, so the page, `cfgdiff sample` and the command the page shows agree. The
page reads this schema from GET /api/model (`public`) to label and bound its boxes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cfgdiff.config import RunConfig, range_of
from cfgdiff.errors import ConfigError
from cfgdiff.sampling.settings import SamplingSettings

MAX_MESSAGE = 200  # characters in a refusal, whatever was sent
MAX_SCALE = 10.0  # the page's slider: s in [0, 10]
MAX_INTERVAL = 1e4  # sigma_t of any schedule cfgdiff has lies below this
MAX_PROMPT_CHARS = 200  # a prompt's length on the page; a model reads at most its text_tokens
MODES = ("images", "strip")
# The sampler settings a request may give: SamplingSettings fields, bounded and checked by
# their declaration (and `steps` by the model's T and Limits.max_steps as well).
SETTINGS_FIELDS = ("sampler", "steps", "seed")
MAX_SEED = int(range_of(SamplingSettings, "seed").hi)
# an integer written with more digits than this is not read as one (JSON allows any length;
# Python refuses to convert more than 4300 digits): it is kept as a Digits marker instead
MAX_DIGITS = 20


class RequestError(ConfigError):
    """A request refused: one capped line, and the API name of the field at fault (None for
    the request as a whole)."""

    def __init__(self, message: str, field: str | None = None):
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 1] + "…"
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Digits:
    """An integer of more than MAX_DIGITS digits in a request body, kept by its length."""

    count: int


def parse_int(text: str) -> int | Digits:
    """json.loads' parse_int: an integer, or a Digits marker for one too long to be a value
    of any field (its conversion would cost time, and its echo a page of digits)."""
    digits = len(text.lstrip("-"))
    return int(text) if digits <= MAX_DIGITS else Digits(digits)


def shown(v: Any) -> str:
    """A sent value in a few words, for a refusal."""
    if v is None:
        return "empty"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Digits):
        return f"a {v.count}-digit number"
    if isinstance(v, int):
        return str(v) if abs(v) < 10**15 else f"a {len(str(abs(v)))}-digit number"
    if isinstance(v, float):
        if math.isnan(v):
            return "not a number"
        if math.isinf(v):
            return "infinity" if v > 0 else "-infinity"
        return f"{v:.6g}"
    if isinstance(v, str):
        if not v.strip():
            return "empty text" if not v else "blank text"
        text = "".join(
            c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in v[:30]
        )
        return '"' + (text if len(v) <= 30 else text[:29] + "…") + '"'
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _word(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


@dataclass(frozen=True)
class Field:
    """One field of a request. kind: "integer", "number", "choice", "text", "numbers" (a strip's
    scales: 1 to `count` distinct numbers) or "pair" (lo < hi). `optional`: absent or null means
    "not given" (the model's own, or none); a field that is not optional takes its `default`
    when absent, and is refused as empty when null (an empty box on the page)."""

    name: str
    label: str
    kind: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    default: Any = None
    optional: bool = False
    count: int = 0

    def allowed(self) -> str:
        """What the field takes, as a refusal says it."""
        if self.kind == "integer":
            return f"a whole number from {_word(self.lo)} to {_word(self.hi)}"
        if self.kind == "number":
            return f"a number from {_word(self.lo)} to {_word(self.hi)}"
        if self.kind == "choice":
            return f"one of {', '.join(self.choices)}"
        if self.kind == "text":
            return f"one line of text, at most {_word(self.hi)} characters"
        if self.kind == "numbers":
            return f"1 to {self.count} distinct numbers from {_word(self.lo)} to {_word(self.hi)}"
        return f"two numbers lo < hi from {_word(self.lo)} to {_word(self.hi)}"

    def refuse(self, v: Any) -> RequestError:
        return RequestError(f"{self.label}: must be {self.allowed()}, got {shown(v)}", self.name)

    def read(self, body: dict) -> Any:
        """The field's value in `body`, checked; None where it is optional and not given."""
        absent = self.name not in body
        if absent or body[self.name] is None:
            if self.optional:
                return None
            if absent and self.default is not None:
                return self.default
            missing = "missing" if absent else "empty"
            raise RequestError(f"{self.label}: is {missing}; give {self.allowed()}", self.name)
        v = body[self.name]
        if self.kind in ("integer", "number"):
            return self._number(v, v)
        if self.kind == "choice":
            if not isinstance(v, str) or v not in self.choices:
                raise self.refuse(v)
            return v
        if self.kind == "text":
            if not isinstance(v, str) or not v.strip() or len(v) > self.hi:
                raise self.refuse(v)
            v = v.strip()
            if not v.isprintable():
                raise RequestError(
                    f"{self.label}: must be one line of printable text, got {shown(v)}", self.name
                )
            return v
        if self.kind == "numbers":
            if not isinstance(v, list) or not 1 <= len(v) <= self.count:
                raise self.refuse(v)
            out = tuple(self._number(x, v) for x in v)
            if len(set(out)) != len(out):
                raise RequestError(f"{self.label}: must be distinct, got a repeat", self.name)
            return out
        if not isinstance(v, list) or len(v) != 2:
            raise self.refuse(v)
        lo, hi = (self._number(x, v) for x in v)
        if not lo < hi:
            raise RequestError(
                f"{self.label}: must satisfy lo < hi, got [{lo:g}, {hi:g}]", self.name
            )
        return (lo, hi)

    def _number(self, x: Any, whole: Any) -> float | int:
        """One number of the field checked against its type and bounds (`whole`: the field's
        value, shown in the refusal)."""
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise self.refuse(whole)
        if isinstance(x, float) and not math.isfinite(x):
            raise self.refuse(whole)
        if not self.lo <= x <= self.hi:
            raise self.refuse(whole)
        if self.kind != "integer":
            return float(x)
        if isinstance(x, float) and not x.is_integer():
            raise self.refuse(whole)
        return int(x)

    def public(self) -> dict:
        """The field as GET /api/model gives it to the page."""
        out = {"label": self.label, "kind": self.kind, "optional": self.optional}
        for key in ("lo", "hi", "choices", "default", "count"):
            v = getattr(self, key)
            if v not in (None, (), 0) or (key == "lo" and v == 0):
                out[key] = list(v) if isinstance(v, tuple) else v
        return out


def _settings_field(name: str, label: str, hi: int | None = None) -> Field:
    """A SamplingSettings field as a request field: its choices, or its range (capped by
    `hi`); optional, as there (absent: the model's own)."""
    f = next(f for f in dataclasses.fields(SamplingSettings) if f.name == name)
    if "choices" in f.metadata:
        return Field(name, label, "choice", choices=tuple(f.metadata["choices"]), optional=True)
    r = f.metadata["range"]
    top = int(r.hi) if hi is None else min(int(r.hi), hi)
    return Field(name, label, "integer", int(r.lo), top, optional=True)


def schema(cfg: RunConfig, limits) -> dict[str, Field]:
    """The fields a request to a model of `cfg` may have, by API name, in the page's order.
    A class model reads `class` (and `negative_class`), a text model `prompt` (and
    `negative_prompt`). `limits`: serve.jobs.Limits."""
    k = len(cfg.label_names())
    steps_hi = min(limits.max_steps, cfg.diffusion.timesteps)
    if cfg.model.condition == "text":
        asks = [
            Field("prompt", "prompt", "text", hi=MAX_PROMPT_CHARS),
            Field("negative_prompt", "negative prompt", "text", hi=MAX_PROMPT_CHARS, optional=True),
        ]
    else:
        asks = [
            Field("class", "class", "integer", 0, k - 1),
            Field("negative_class", "negative class", "integer", 0, k - 1, optional=True),
        ]
    fields = [
        asks[0],
        Field("scale", "scale", "number", 0.0, MAX_SCALE, default=3.0),
        Field("mode", "view", "choice", choices=MODES, default="images"),
        Field(
            "scales",
            "strip scales",
            "numbers",
            0.0,
            MAX_SCALE,
            count=limits.max_scales,
            optional=True,
        ),  # fmt: skip
        _settings_field("sampler", "sampler"),
        _settings_field("steps", "steps", steps_hi),
        _settings_field("seed", "seed"),
        Field("n", "images", "integer", 1, limits.max_images, default=1),
        asks[1],
        Field("interval", "guidance interval σ", "pair", 0.0, MAX_INTERVAL, optional=True),
    ]
    return {f.name: f for f in fields}


# the fields of either kind of model, for the refusal of one that is neither
CLASS_FIELDS = ("class", "negative_class")
TEXT_FIELDS = ("prompt", "negative_prompt")
