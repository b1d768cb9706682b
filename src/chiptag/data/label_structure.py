"""The `labels` config section: the label structure decoding applies (chiptag.evaluation.decoding).

Kept out of config.py (which imports it) so that file stays one screenful per section; it depends on nothing.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator


class LabelsConfig(BaseModel):
    """Label structure applied when probabilities become tags (predict, evaluation, threshold tuning).

    exclusive: groups of which exactly one tag holds (Planet's weather: clear, partly_cloudy, haze, cloudy): the
    most probable tag of the group is kept, the others dropped, whatever the thresholds. implies_none: a tag
    that, when it holds, rules the listed tags out (Planet: cloudy chips carry no land tags). A trigger inside an
    exclusive group holds when it is its group's pick; any other trigger when its probability is >= 0.5."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)  # as every config section

    exclusive: list[list[str]] = []
    implies_none: dict[str, list[str]] = {}

    @model_validator(mode="after")
    def _groups_disjoint(self) -> LabelsConfig:
        seen: set[str] = set()
        for group in self.exclusive:
            if len(group) < 2:
                raise ValueError(f"exclusive group {group} needs at least 2 tags")
            dup = seen.intersection(group) or {t for t in group if group.count(t) > 1}
            if dup:
                raise ValueError(f"exclusive groups must not share tags: {sorted(dup)[0]!r} appears twice")
            seen.update(group)
        return self
