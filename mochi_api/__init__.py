"""The generation HTTP API (``/mochi/v1/...``) on the ComfyUI server, compatible with the hosted
Mochi APIs.

Importing this package does nothing; :func:`mochi_api.routes.register` adds the routes and is
called from the pack's entry point. ``workflow``, ``query`` and ``request`` do not import
ComfyUI (``request`` takes the prompt rule from ``mochi_core.text``), so scripts and tests can
use them outside the host.
"""
