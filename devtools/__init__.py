"""Developer tools: fault injection, mutation testing, the bundled demo images (python -m devtools.NAME)."""
