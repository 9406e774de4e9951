"""Data: sources -> conversations -> token ids with loss masks -> padded or packed micro-batches."""


class DataError(ValueError):
    """Bad input data; the message names the source and the row. Defined here, below every data
    module, so that each of them (the JSON-lines reader included) can raise it."""
