"""The float64 tolerance rule lives in the package (``sgattn.testing``, shared
with ``sgattn check``); tests import it from here."""
from sgattn.testing import ULP, assert_close_to_reference, flash_row_errors, max_err  # noqa: F401
