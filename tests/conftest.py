"""Shared pytest configuration."""

import os

from hypothesis import settings

pytest_plugins = [
    "tests.fix_postgres",
    "tests.fix_sshd",
    "tests.fix_relay",
    "tests.fix_pg_relay",
    "tests.fix_s3",
    "tests.fix_cluster",
    "tests.fix_oidc",
    "tests.fix_kube",
]

# CI runs the property tests on fixed examples, so a run's verdict is the code's and
# not the draw's; elsewhere every run draws new examples (and keeps what fails in
# .hypothesis/ to replay it). Found failures are turned into explicit tests.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
