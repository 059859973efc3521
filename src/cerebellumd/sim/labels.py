"""The labels file of a recorded drive (`cerebellumd evaluate --log LOG --labels LABELS.toml`).

    name = "rav4_2019"              # optional: reported as `scenario` (default: the file's stem)
    description = "..."
    [[labels]]
    name = "lane_keeping"           # the event kind (`readiness_by_kind` key)
    when = "lane_keeping == 5"      # the demand expression language over the config's [signals]
    deadline_ms = 1000              # active this long after an event starts
    min_duration_ms = 500           # shorter intervals are not events

Unknown keys, bad values and an expression naming a signal the config does not have are errors
naming the file and line (`ConfigError`, as `cerebellumd check` prints them).
`cerebellumd schema --labels` prints the JSON Schema. Pydantic only: no numpy.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import ConfigError, ConfigIssue, locate, read_text, validate_toml
from ..policies.expr import Expression, ExpressionError, compile_expression


class Label(BaseModel):
    """One kind of ground-truth event: when the accelerator is needed on this recording."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Event kind; `readiness_by_kind` key.")
    when: str = Field(
        ...,
        min_length=1,
        description="Expression (the demand language) over the config's `[signals]` names; true while the "
        "accelerator is needed.",
    )
    deadline_ms: int = Field(..., gt=0, description="The accelerator must be active this long after an event starts.")
    min_duration_ms: int = Field(
        0, ge=0, description="Intervals where `when` holds shorter than this are not events (debounce)."
    )
    description: str = Field("", description="What this label is (free text).")


class LabelsFile(BaseModel):
    """A labels file: the ground-truth events of a recording, for `evaluate --log`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="Name reported as `scenario` (default: the file's stem)."
    )
    description: str = Field("", description="What these labels are (free text).")
    labels: list[Label] = Field(..., min_length=1, description="The event kinds (`[[labels]]`).")

    @model_validator(mode="after")
    def _unique_names(self) -> LabelsFile:
        seen: set[str] = set()
        for label in self.labels:
            if label.name in seen:
                raise ValueError(f"labels: duplicate label name {label.name!r}")
            seen.add(label.name)
        return self


def labels_schema() -> dict[str, Any]:
    """JSON Schema of a labels file (`cerebellumd schema --labels`)."""
    return LabelsFile.model_json_schema()


@dataclass(frozen=True)
class CompiledLabel:
    spec: Label
    expression: Expression


def parse_labels(
    text: str, signals: Collection[str], file: str = "<labels>", default_name: str = "labels"
) -> tuple[str, list[CompiledLabel]]:
    """(name, labels) of a labels file's text, each `when` compiled against `signals` (the
    config's signal names); `ConfigError` naming file and line otherwise."""
    parsed = validate_toml(text, file, LabelsFile)
    known = frozenset(signals)
    out: list[CompiledLabel] = []
    issues = []
    for i, label in enumerate(parsed.labels):
        try:
            out.append(CompiledLabel(label, compile_expression(label.when, known)))
        except ExpressionError as exc:
            hint = f" (the config's signals: {', '.join(sorted(known))})" if "unknown signal" in str(exc) else ""
            issues.append(ConfigIssue(file, locate(text, ("labels", i, "when")), f"labels[{i}].when", f"{exc}{hint}"))
    if issues:
        raise ConfigError(issues)
    return parsed.name or default_name, out


def load_labels(path: str | Path, signals: Collection[str]) -> tuple[str, list[CompiledLabel]]:
    p = Path(path)
    return parse_labels(read_text(p), signals, str(p), p.stem)
