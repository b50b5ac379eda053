"""The live local portal, ``tflaunch ui``: a standard-library HTTP server over one home, read-only.

- :mod:`tflaunch.portal.discover`: ``<home>/ui.json`` (where a running portal is), and the URLs
  ``Run.get_portal_url()`` and ``runs show`` give (cheap to import: no server, no HTML).
- :mod:`tflaunch.portal.data`: the JSON views (runs, one run's live state, log chunks by byte offset, files
  resolved safely inside the home, compare, models).
- :mod:`tflaunch.portal.pages`: the HTML pages (everything inline; no network); :mod:`tflaunch.portal.assets`
  their script and styles.
- :mod:`tflaunch.portal.server`: the request handler, routing, the token and Host checks, start and stop.
"""
