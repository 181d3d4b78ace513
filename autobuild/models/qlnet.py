"""QLNet presets (placeholder, filled below)."""
