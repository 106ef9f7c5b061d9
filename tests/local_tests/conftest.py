"""Makes the modules shared by the parity families importable from their folders.

pytest's default ``prepend`` import mode puts the folder of every conftest.py it
loads on ``sys.path``; this file exists so that ``tests/local_tests/`` is put there
too, and the family folders can ``import fastvideo_cpu``, ``planted`` and
``bug_table``. The project's main environment collects this folder as well, so
nothing here may import a family's libraries (diffusers, transformers, fastvideo):
each family's own conftest.py skips its folder when they are missing.
"""
