"""The data path: sources (records) -> render (tokens + trained-token mask) -> pack (batch contract) -> pipeline (Grain)."""
