"""Pieces the ServerApp and ClientApp share: message vocabulary, model builders, record packing."""
