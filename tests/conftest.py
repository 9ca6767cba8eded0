"""Test-wide settings: no hub access, and an IR cache private to the test session."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "SCALER_WIZARD_CACHE" not in os.environ:
    os.environ["SCALER_WIZARD_CACHE"] = tempfile.mkdtemp(prefix="sw-test-cache-")


# Tests that must run on one xdist worker (they share a module fixture computed once per session):
# nodeid prefix -> group. `--dist loadgroup` with `@pytest.mark.xdist_group` no longer groups under
# pytest 9.2 (xdist's nodeid suffix does not take effect: pytest-dev/pytest-xdist#1386, measured in
# CI: both workers built the family sweep), so `make test` groups by nodeid through its own scheduler.
XDIST_GROUPS = {
    "tests/test_family_sweep.py::test_sweep_cell_is_not_a_crash[": "family_sweep",
    "tests/test_family_sweep.py::test_family_has_no_crash_cell[": "family_sweep",
    "tests/test_family_sweep.py::test_family_sweep_matches_the_committed_table": "family_sweep",
}


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class NodeidGroups(LoadScopeScheduling):
        """Every test its own work unit (as `--dist load`), except the groups above: one unit each,
        and the largest units are handed out first (xdist's loadscope reordering)."""

        def _split_scope(self, nodeid: str) -> str:
            return next((g for p, g in XDIST_GROUPS.items() if nodeid.startswith(p)), nodeid)

    return NodeidGroups(config, log)
