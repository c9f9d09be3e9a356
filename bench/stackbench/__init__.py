"""The benchmark behind scripts/benchmark: the stack's speed against its own bypasses and
against MLflow's basic-auth server, measured interleaved on one machine.

Modules: ``stack`` (compose project, containers, cgroup counters), ``load`` (wrk runs),
``api`` (set-up calls), ``measure`` (the scenarios), ``transfer`` (artifact transfers with the
MLflow client), ``serving`` (the served model's set-up, start and memory), ``report``
(table and GOAL lines), ``cli`` (argparse and the run order).
"""
