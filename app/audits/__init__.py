"""Audits: saved findings with permalinks, edit tokens and exports, persisted with SQLAlchemy.

``models`` (tables), ``db`` (engine, sessions, migrations), ``store`` (the only code that reads
and writes audits), ``snapshot`` (what an item records of the run when it is added),
``exports`` (JSON, CSV, relabel CSV, self-contained HTML).
"""
