"""Settings files (TOML) shipped with fedslide, read with importlib.resources."""
