"""`[power.rails]`: the rail-map section; builds the pure `RailMap`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..policies.rails import BUILTIN_RAIL_MAPS, DEFAULT_TOLERANCE_W, RailGroup, RailMap


class RailGroupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    total: str = Field(..., description="Rail that measures the whole group (e.g. VDD_IN).")
    other_domain: str = Field(..., description="Domain that gets total minus the parts.")
    parts: dict[str, str] = Field(
        default_factory=dict, description="Rails inside the total: rail name -> domain.")


class RailMapConfig(BaseModel):
    """`[power.rails]`: how this board's rail readings map to domains."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    board: str = Field("custom", description="Board name, or a shipped map when groups are empty.")
    groups: list[RailGroupConfig] = Field(
        default_factory=list, description="Totals with the rails they contain.")
    independent: dict[str, str] = Field(
        default_factory=dict, description="Rails outside every total: rail name -> domain.")
    tolerance_w: float = Field(
        DEFAULT_TOLERANCE_W, ge=0, description="Parts may exceed a total by this before it is flagged.")

    @model_validator(mode="after")
    def _valid(self) -> RailMapConfig:
        if not self.groups and not self.independent and self.board not in BUILTIN_RAIL_MAPS:
            raise ValueError(
                f"no rails and no shipped map {self.board!r} ({', '.join(sorted(BUILTIN_RAIL_MAPS))})")
        self.rail_map()  # each rail at most once
        return self

    def rail_map(self) -> RailMap:
        if not self.groups and not self.independent:
            shipped = BUILTIN_RAIL_MAPS[self.board]
            return RailMap(shipped.board, shipped.groups, shipped.independent, self.tolerance_w)
        return RailMap(
            board=self.board,
            groups=tuple(RailGroup(g.total, g.other_domain, dict(g.parts)) for g in self.groups),
            independent=dict(self.independent),
            tolerance_w=self.tolerance_w,
        )
