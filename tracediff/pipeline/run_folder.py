"""The folder of one run: the names of the files a run writes there, and making it ready.

Kept free of heavy imports so that the runner (PyTorch), the analysis and the session can all name the same
files without importing one another.
"""

from __future__ import annotations

from pathlib import Path

from tracediff.errors import SpecError

#: the trace files of a run, by side
TRACE_FILES = {"upstream": "upstream.h5", "port": "port.h5"}
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
BISECT_JSON = "bisect.json"


def prepare_out_dir(out_dir: Path, *, force: bool) -> bool:
    """Refuse to overwrite earlier traces unless forced; return whether we created the folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SpecError(f"--out {str(out_dir)!r} is a file; give a folder for the traces and reports")
    existing = [out_dir / name for name in (*TRACE_FILES.values(), REPORT_JSON, REPORT_HTML)]
    clash = [path for path in existing if path.exists()]
    if clash and not force:
        raise SpecError(f"--out {str(out_dir)!r} already holds {clash[0].name}; pass --force to overwrite "
                        "or choose another folder")
    for path in clash:
        path.unlink()
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    return created


def written_files(out_dir: Path) -> list[Path]:
    """The files a run left in ``out_dir`` (hidden scratch files excluded)."""
    return [p for p in out_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
