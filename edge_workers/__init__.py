"""Edge tier: ingest frames from the broker, denoise, reduce, classify or forward."""
