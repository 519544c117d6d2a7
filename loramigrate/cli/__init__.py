"""Command-line interface: one thin typer command per stage."""
