"""Deprecated home of the batch types, kept for one release: import them from `bench.api`."""
from bench.api.types import *  # noqa: F401,F403
from bench.api.types import Batch, PromptEmbeds, collate  # noqa: F401
