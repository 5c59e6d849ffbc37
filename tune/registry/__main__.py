from tune.registry.cli import app

app()
