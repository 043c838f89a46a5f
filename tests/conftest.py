"""Test-wide setup: helpers in tests/ (e.g. ``_reference``) importable from every test folder, and
the ``slow`` marker on the tests listed in :data:`SLOW`.

``python -m pytest`` runs everything but the slow tests (``addopts = -m 'not slow'`` in
pyproject.toml); ``python -m pytest -m slow`` runs only them; ``.ci/run`` runs both. The list
lives here, in one place, rather than as decorators spread over files that other changes edit.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

#: Node-id prefixes (relative to the repository root) of the slow tests, with why: each took
#: over 10 s of one core (``--durations``, 2-core machine shared with other jobs), most of it
#: spawning processes or building a large model. Every one still runs in CI (``-m slow``).
SLOW = (
    # two or more gloo processes each: process start-up and collectives dominate
    "tests/tracking/test_sharded.py::",
    "tests/tracking/test_distributed.py::test_split_kernel_metrics_equal_the_single_process_ones[full-True-",
    "tests/callbacks/test_cb_ddp_amp.py::test_ddp_spawn_logs_once_and_the_gate_acts_on_every_rank_together",
    "tests/callbacks/test_cb_distributed.py::test_split_across_two_ddp_ranks_equals_a_single_process_run",
    "tests/callbacks/test_cb_fsdp.py::test_model_parallel_fsdp2_metrics_equal_a_single_process_run",
    "tests/integrations/test_transformers_torchrun.py::",
    # GPT-2-sized models with default settings (the memory-cap and auto-kind paths)
    "tests/tracking/test_tracker_auto.py::test_large_vocabulary_lm_with_defaults_runs_under_a_memory_cap",
    "tests/tracking/test_tracker_auto.py::test_gpt2_with_default_arguments_starts_and_measures",
    "tests/core/test_engine_fallbacks.py::test_gpt2_position_embedding_is_factorised",
    "tests/core/test_structured_groups.py::test_zoo_models_under_a_tiny_budget_are_exact[gpt2]",
    # a statistical test over many seeds
    "tests/core/test_projection.py::test_projected_trace_is_unbiased_over_seeds",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
