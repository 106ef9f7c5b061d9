"""The pipeline: from a run spec or two traces to a verdict, shared by ``run``, ``first-drift``, ``bisect`` and the
pytest plugin.

Layer 7 of the data flow (… → render → **pipeline** → entry points): it builds models (``spec``, ``factory``,
``checkpoint``), traces them (``runner``, ``side_worker``, ``script``), analyses the traces (``analyse``) and
bisects (``bisect``, ``bisect_stage``); the entry points only parse arguments and call it.
"""
