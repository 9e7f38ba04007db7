"""The QC verdict of one result: "ok", "review" (scored, but a person should look, with the reasons) or "error".

`status`, the older three-way column, is kept as a view of the verdict so that existing readers keep working:
ok -> "ok", review -> "warning", error -> "error". A result to review is therefore never written as "ok".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

QC_VALUES: tuple[str, ...] = ("ok", "review", "error")
STATUS_OF_QC: dict[str, str] = {"ok": "ok", "review": "warning", "error": "error"}
REASON_SEPARATOR = "; "


@dataclass(frozen=True)
class Reason:
    """Why a result needs a look: a stable code for programs (e.g. `levels_disagree`) and a sentence for people."""

    code: str
    text: str

    def __str__(self) -> str:
        return f"{self.code}: {self.text}"


@dataclass
class QCVerdict:
    qc: str
    reasons: tuple[Reason, ...] = ()
    aac24_low: float | None = None
    aac24_high: float | None = None
    measurements: dict[str, float] = field(default_factory=dict)  # the numbers the checks compared

    @property
    def status(self) -> str:
        return STATUS_OF_QC[self.qc]


def verdict_of(reasons: list[Reason] | tuple[Reason, ...], scored: bool) -> str:
    """"error" when there is no score, "review" when any check raised a reason, else "ok"."""
    if not scored:
        return "error"
    return "review" if reasons else "ok"


SEGMENTER_NOTE = "segmenter_note"  # the segmenter's own message, which repeats what the levels reasons say
SCORE_UNCERTAIN = "score_uncertain"  # the one reason that comes from the interval itself, after the others


def kinds_of(codes: Iterable[str]) -> set[str]:
    """The kinds of check among reason codes: the distinct codes, the segmenter's note only when it stands alone,
    and `score_uncertain` left out (the interval widens because other checks flagged the result)."""
    kinds = set(codes) - {SCORE_UNCERTAIN}
    return (kinds - {SEGMENTER_NOTE}) or kinds


def flag_kinds(reasons: list[Reason] | tuple[Reason, ...]) -> int:
    """How many kinds of check flagged a result (`kinds_of`). The interval widens with it (`interval.fit_by_flag`)."""
    return len(kinds_of(reason.code for reason in reasons))


def format_reasons(reasons: list[Reason] | tuple[Reason, ...]) -> str:
    """One cell of results.csv: "code: text; code: text" (separators inside a text are replaced)."""
    return REASON_SEPARATOR.join(f"{r.code}: {r.text.replace(';', ',')}" for r in reasons)


def reason_codes(cell: str) -> list[str]:
    """The codes of a results.csv `qc_reasons` cell, in order."""
    return [part.split(":", 1)[0].strip() for part in cell.split(REASON_SEPARATOR) if part.strip()]
