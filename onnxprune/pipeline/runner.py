"""The stage runner: a stage is a named step over the pipeline's state; the runner times it, skips it
when it does not apply, and drops what it declared it leaves behind (a dense model, an analysis) so a
large model is not held twice."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from onnxprune.errors import InputSizesRejected


log = logging.getLogger(__name__)


def always(state: Any) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """`run(state)` when `applies(state)`; `timing` names its entry in the report's timings (several
    stages may add to one entry); `releases`: state attributes set to None once it ran."""

    name: str
    run: Callable[[Any], None]
    applies: Callable[[Any], bool] = always
    timing: str | None = None
    releases: tuple[str, ...] = ()


def run_stages(state: Any, stages: Iterable[Stage]) -> None:
    """Run `stages` in order over `state`, each timed into `state.clock` (seconds add up per timing name)."""
    for stage in stages:
        if not stage.applies(state):
            continue
        log.debug("stage %s", stage.name)
        stage.run(state)
        state.clock.lap(stage.timing or stage.name)
        for name in stage.releases:
            setattr(state, name, None)


T = TypeVar("T")


def at_sizes_the_dense_model_runs(run: Callable[[Any], T]) -> T:
    """`run(None)`: a whole run whose load plans the input sizes; if validation found that the dense model
    does not run at them (InputSizesRejected), `run(sizes)` once more, at the sizes it does run at. The
    sizes are checked that late because running the dense model up front costs a fifth of a large
    model's prune, and the first plan almost always runs."""
    try:
        return run(None)
    except InputSizesRejected as rejected:
        log.info("%s; starting again there", rejected)
        return run(rejected.found)
