"""Data of mol_tune: data sets, the image tokenizer, the Parquet shard format and the loader."""
