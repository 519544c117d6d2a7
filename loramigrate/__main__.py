"""``python -m loramigrate`` runs the CLI (what `loramigrate` runs)."""

from loramigrate.cli.main import app

app()
