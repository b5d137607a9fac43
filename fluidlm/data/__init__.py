"""Data: the embedded default corpus, sentencepiece tokenizer, webdataset shards, resumable loader."""


class DataError(ValueError):
    """Bad data or data settings; the message names the cause, the file and the fix."""
