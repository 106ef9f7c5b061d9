"""Rendering: every result as terminal text, JSON and HTML.

Layer 6 of the data flow (record → store → align → compare → localise → **render** → entry points). The result
types below it hold data; the words and layout people read are made here, from :mod:`tracediff.vocabulary`.

Modules: ``report`` (first drift: terminal and JSON), ``html`` (the standalone HTML report), ``bisect``
(bisection), ``preflight`` (pre-flight checks), ``progress`` (what a run is doing right now).
"""
