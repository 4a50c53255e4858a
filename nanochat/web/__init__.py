"""Chat front-end support: reply generation as text (shared with the CLI), input limits, the worker pool and the
FastAPI app behind `python -m scripts.chat_web` (plus its single-page UI, ui.html).

Kept import-light on purpose: `nanochat.web.generation` does not pull in FastAPI, so the CLI can use it.
"""
