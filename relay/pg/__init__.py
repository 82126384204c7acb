"""PostgreSQL wire relay."""
