"""The data path: sources (records) -> render (tokens + trained-token mask) -> prepare (checked, counted,
in memory) -> pack (batch contract) -> pipeline (Grain order, shards, batches); inspect for `jaxsft data inspect`."""
