"""--rank, --energy, --sv-ratio and --max-rank as extract, resize and combine take them: one range each, the
library's (ranks.RANGES), shown in --help and refused at parse time with the library's message (exit 2)."""
from __future__ import annotations

import click

from ..ranks import range_problem


class _Checked:
    """Mixin: a click range type whose failure message is ranks.range_problem's."""

    option = ""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            self.fail(range_problem(self.option, value) or f"invalid value {value!r}", param, ctx)


class RankInt(_Checked, click.IntRange):
    def __init__(self, option: str):
        super().__init__(min=1)
        self.option = option


class EnergyFloat(_Checked, click.FloatRange):
    option = "energy"

    def __init__(self):
        super().__init__(0, 1, min_open=True)


class SvRatioFloat(_Checked, click.FloatRange):
    option = "sv_ratio"

    def __init__(self):
        super().__init__(min=1)


def rank_option(help: str):
    return click.option("--rank", type=RankInt("rank"), default=None, help=help)


def energy_option(help: str):
    return click.option("--energy", type=EnergyFloat(), default=None, help=help)


def sv_ratio_option(f):
    return click.option("--sv-ratio", type=SvRatioFloat(), default=None,
                        help="Per module, keep singular values ≥ σ_max / R.")(f)


def max_rank_option(f):
    return click.option("--max-rank", type=RankInt("max_rank"), default=None, help="Cap on any module's rank.")(f)
