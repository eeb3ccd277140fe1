"""advguard's runtime guard: a FastAPI service in front of a model.

Requests pass authenticate -> limit -> validate -> sanitize -> detect -> decide -> answer ->
record (:mod:`advguard.guard.pipeline`); :func:`advguard.guard.app.create_app` serves a
:class:`~advguard.guard.pipeline.Guard` over HTTP; ``advguard guard serve`` runs it under
uvicorn. See docs/guard.md.

Importing this package stays light (no FastAPI, no torch): import the submodules you need.
"""
