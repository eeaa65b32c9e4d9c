"""Which backend runs a search's trials: one at a time in this process
(search/in_process.py), or as Ray tasks, many at once (search/scaleout.py). Either way the
driver's one loop (search/driver.py) hands them out and books them, and each trial runs
search/trial.py's `run_trial`; a search does not know which backend runs it."""

from __future__ import annotations

from experiments import SearchConfig
from search.driver import Backend


def executor_for(config: SearchConfig, verbose: int = 0) -> Backend:
    """Ray's where `config.ray` names a cluster (checked now: one that does not answer is a
    ClusterError), else this process."""
    if config.ray:
        from search.scaleout import RayTrials  # Ray loads only when it is used

        return RayTrials(config)
    from search.in_process import InProcess

    return InProcess(config, verbose)
