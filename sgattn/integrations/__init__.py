"""Integrations with other libraries, each imported on its own so that its
library stays optional: ``sgattn.integrations.kvpress`` (NVIDIA's kvpress)."""
