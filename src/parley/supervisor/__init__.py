"""The supervisor owns every run: admission, intake, the run's lifecycle under its deadline,
stopping (also across instances), draining at shutdown, and ending runs orphaned by a crash.
One file per job; `core.Supervisor` puts them together."""

from parley.store.eventlog import Accepted
from parley.supervisor.admission import Limits
from parley.supervisor.core import Supervisor

__all__ = ["Accepted", "Limits", "Supervisor"]
