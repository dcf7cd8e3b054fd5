"""influence-dashboard's application layer: the CLI and (lazily) the web app."""
