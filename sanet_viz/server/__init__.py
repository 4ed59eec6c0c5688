"""Serving the app: ``config`` (flags), ``startup`` (load once, warm up, build, launch), ``janitor``
(old uploads), ``shutdown`` (clean stop on SIGTERM; the ``stopping`` state that request handlers
check), ``memory`` (handing freed memory back after requests), ``stats`` (debug statistics), ``env``.

``app.py`` at the repository root is only the entry point around these. Nothing is imported here:
``env.prepare_environment()`` must run before Gradio is imported, since Gradio reads its
environment then.
"""
