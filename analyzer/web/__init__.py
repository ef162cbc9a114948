"""nwcap's HTML: the self-contained per-capture report and the dashboard over stored results.

Pages are Jinja2 templates with autoescaping (``templates/``), a little plain JavaScript and CSS
(``static/``, inlined into every page and allowed by the Content-Security-Policy through their
hashes) and SVG drawn server-side. Nothing is fetched from outside the page or the app.
"""
