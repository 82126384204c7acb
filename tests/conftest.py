"""Shared pytest configuration."""

pytest_plugins = [
    "tests.fix_postgres",
    "tests.fix_sshd",
    "tests.fix_relay",
    "tests.fix_pg_relay",
    "tests.fix_s3",
    "tests.fix_cluster",
    "tests.fix_oidc",
]
