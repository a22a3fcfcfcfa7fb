"""The transformer itself, sampling from it, asking it for chat replies, and its export to `transformers`."""
