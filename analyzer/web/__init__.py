"""The HTTP face: the JSON query API, the self-contained per-capture report and the dashboard.
May import base, capture, judge, present, store and pipeline; never analyzer.cli.

Pages are Jinja2 templates with autoescaping (``templates/``), a little plain JavaScript and CSS
(``static/``, inlined into every page and allowed by the Content-Security-Policy through their
hashes) and SVG drawn server-side. Nothing is fetched from outside the page or the app.
"""
