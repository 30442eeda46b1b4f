"""The errors a user can cause: the CLI prints them as one line, the HTTP layer as a 4xx."""

from __future__ import annotations

from driftloop.backtest import BacktestError
from driftloop.config import SpecError
from driftloop.data.ingest import SourceError
from driftloop.data.tables import TableError
from driftloop.data.validation import ValidationFailed
from driftloop.init import InitError
from driftloop.replay import ScenarioError


class LoopError(RuntimeError):
    """A step of the loop that cannot go on (no champion yet, unknown model, …)."""


UserError = (SpecError, SourceError, TableError, ValidationFailed, LoopError, ScenarioError, BacktestError, InitError)
