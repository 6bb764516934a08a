"""Token shards: offline preparation, the shard format, and the deterministic resumable loader."""
