"""The one error type for unreadable, hostile or mismatched weight files."""


class WeightFileError(ValueError):
  """A weight file is broken, hostile, of an unknown kind, or does not fit the model.

  The message names the file and says what was wrong and what to do.
  """
