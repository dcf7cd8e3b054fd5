"""Routers: one module per resource of the REST API (``/api/v1``), the pages, and static assets."""
