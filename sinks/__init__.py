"""Record schema and sinks: Parquet, Kafka, JSONL, session recording."""
