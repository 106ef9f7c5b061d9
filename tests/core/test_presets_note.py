"""A preset looser than fp32 on an fp32 run says what it passed that fp32 flags.

The reproduction: the demo's planted GELU bug (exact GELU for the tanh approximation),
both sides in float32, under the tutorial's ``preset = "dit-aligned"``: "no drift",
exit 0, and before this change not a word about it.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.cli_helpers import report_lines, run_cli
from tracediff.demo.models import BUGS
from tracediff.tolerance import PRESETS, Tolerance, fp32_note, looser_than, ran_in_fp32

CULPRIT = BUGS["gelu_tanh"].port_module  # transformer_blocks.2.ffn.act


def _times(note: str) -> float:
    match = re.search(r"\(([0-9.]+)\u00d7 its tolerance\)", note)
    assert match, note
    return float(match.group(1))


def test_dit_aligned_hides_the_fp32_bug_and_the_run_says_so(tmp_path) -> None:
    out = tmp_path / "loose"
    proc = run_cli("run", "--preset", "dit-aligned", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the verdict is the preset's: no drift
    assert report_lines(proc.stdout)[0].startswith("no drift:")
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note: preset dit-aligned passed")]
    assert len(notes) == 1, proc.stdout
    note = notes[0]
    assert f"passed {CULPRIT}, which the fp32 preset flags" in note
    assert "both sides ran in float32" in note and 'use preset = "fp32"' in note
    assert 20 < _times(note) < 200  # the bug is tens of times fp32's tolerance
    assert json.loads((out / "report.json").read_text())["preset_note"] == note


def test_fp32_preset_finds_the_bug_and_adds_no_note(tmp_path) -> None:
    out = tmp_path / "strict"
    proc = run_cli("run", "--preset", "fp32", "--out", str(out), "--no-progress")
    assert proc.returncode == 1
    assert report_lines(proc.stdout)[0].startswith(f"first drift: {CULPRIT} ")
    assert "note: preset" not in proc.stdout
    assert json.loads((out / "report.json").read_text())["preset_note"] is None


def test_clean_port_under_a_loose_preset_adds_no_note(tmp_path) -> None:
    proc = run_cli("run", "--demo", "clean", "--preset", "dit-aligned", "--out", str(tmp_path / "c"),
                   "--no-progress", "--steps", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "note: preset" not in proc.stdout


def test_note_names_the_missed_culprit_when_the_loose_preset_blames_a_later_module(tmp_path) -> None:
    """ln_eps under dit-aligned: a drift is found, but at the next linear, after the norm that fp32 flags."""
    expected = BUGS["ln_eps"].port_module
    out = tmp_path / "later"
    proc = run_cli("run", "--demo", "ln_eps", "--preset", "dit-aligned", "--out", str(out), "--no-progress",
                   "--steps", "1")
    assert proc.returncode == 1
    report = json.loads((out / "report.json").read_text())
    assert report["first_drift"]["port"] != expected
    assert f"passed {expected}, which the fp32 preset flags" in report["preset_note"]


def test_a_bf16_side_switches_the_note_off(tmp_path) -> None:
    proc = run_cli("run", "--preset", "dit-bf16", "--port-dtype", "bfloat16", "--out", str(tmp_path / "b"),
                   "--no-progress", "--steps", "1")
    assert proc.returncode in (0, 1), proc.stderr
    assert json.loads((tmp_path / "b" / "report.json").read_text())["preset_note"] is None


@pytest.mark.parametrize("name", ["single-block", "encoder", "dit-aligned", "vae-fp32", "dit-bf16"])
def test_every_named_preset_but_fp32_is_looser_than_fp32(name: str) -> None:
    assert looser_than(PRESETS[name], PRESETS["fp32"])
    assert not looser_than(PRESETS["fp32"], PRESETS["fp32"])
    assert not looser_than(PRESETS["fp32"], PRESETS[name])


def test_fp32_note_decision() -> None:
    loose = PRESETS["dit-aligned"]
    fp32_run = ["float32", "float64", "int64"]
    note = fp32_note(loose, dtypes=fp32_run, passed=("blocks.2.ffn.act", 34.2))
    assert note is not None and note.startswith("note: preset dit-aligned passed blocks.2.ffn.act, which the fp32 "
                                                "preset flags (34\u00d7 its tolerance)")
    assert fp32_note(loose, dtypes=fp32_run, passed=None) is None
    assert fp32_note(PRESETS["fp32"], dtypes=fp32_run, passed=("x", 5.0)) is None
    assert fp32_note(loose, dtypes=["float32", "bfloat16"], passed=("x", 5.0)) is None
    custom = Tolerance(atol=1e-3, rtol=1e-3, stat_rtol=1e-3)
    assert "tolerance atol 0.001, rtol 0.001 passed x" in (fp32_note(custom, dtypes=fp32_run, passed=("x", 2.5)) or "")
    # a custom tolerance tighter in one knob is not "looser": no note
    mixed = Tolerance(atol=1e-3, rtol=1e-7, stat_rtol=1e-3)
    assert fp32_note(mixed, dtypes=fp32_run, passed=("x", 2.5)) is None


def test_ran_in_fp32() -> None:
    assert ran_in_fp32(["float32", "int64"])
    assert ran_in_fp32(["torch.float32", "float64"])
    assert not ran_in_fp32(["float32", "float16"])
    assert not ran_in_fp32(["bfloat16"])
    assert not ran_in_fp32(["int64"])


def test_the_note_reaches_the_text_report_the_pytest_plugin_shows(tmp_path) -> None:
    """``Analysis.text()`` (the plugin's failure section, logs) carries the note as the terminal does."""
    from tracediff.pipeline.analyse import analyse

    out = tmp_path / "traces"
    proc = run_cli("run", "--preset", "dit-aligned", "--out", str(out), "--no-progress", "--steps", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    analysis = analyse(out / "upstream.h5", out / "port.h5", tolerance="dit-aligned",
                       param_map="tracediff.demo.convert:PARAM_NAMES_MAPPING")
    assert analysis and analysis.preset_note
    assert analysis.preset_note in analysis.text()
