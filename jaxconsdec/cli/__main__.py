"""`python -m jaxconsdec.cli`, the same as the `jaxconsdec` script."""

from jaxconsdec.cli import entry

if __name__ == "__main__":
  entry()
