"""The pipeline: from a run spec or two traces to a verdict, shared by ``run``, ``first-drift``, ``bisect`` and the
pytest plugin; the entry points only parse arguments, call it, and print.

Layer 7 of the data flow (… → render → **pipeline** → entry points). One job per module:

- ``spec``: the run spec (TOML file and flags), validated, with its tolerance.
- ``factory``, ``checkpoint``: call the user's factories; load and convert weights.
- ``runner``: build one side from a spec and trace it (``side_worker``: the same in a process of its own;
  ``script``: trace an unmodified script's models).
- ``run_folder``: the files a run writes, and making its folder ready.
- ``sides``: open the two sides of a comparison (files, or per-rank traces merged), refuse unrelated ones.
- ``analyse``: two traces in, a verdict out (:class:`~tracediff.pipeline.analyse.Analysis`), reports written.
- ``session``: one ``tracediff run``: trace with a progress display, analyse, print.
- ``bisect``: bisect a run spec, print the result.
"""
