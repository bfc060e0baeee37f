"""The experiments behind docs/results (python -m evidence.NAME, bash evidence/NAME.sh): long runs, not tests."""
