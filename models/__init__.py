"""Model sets shipped with Palette: `default/` is the embedded default (`palette serve` without --config)."""
