"""smear: blood-smear fields to a leukocyte differential."""

__version__ = "0.1.0"
