"""The bench's plan and budget warning, and the docs rendered from the committed results."""
import json
import types

import pytest

from bench import report
from bench.plan import Plan, format_s, reference_run
from bench.rows import default_rows, select_rows
from bench.run import warn_budget


def test_committed_docs_are_what_the_committed_results_render():
    """docs/benchmarks.md and the README's headline table are generated: edit bench/published/ and run
    `python bench/report.py --docs`, never the tables by hand."""
    benchmarks, headline = report.render_docs()
    assert (report.ROOT / "docs" / "benchmarks.md").read_text() == benchmarks, "run python bench/report.py --docs"
    readme = (report.ROOT / "README.md").read_text()
    assert report.with_headline(readme, headline) == readme, "run python bench/report.py --docs"
    assert headline and "| best-w4a8 |" in headline
    assert report.main(["--check"]) == 0


def test_every_doc_section_has_its_committed_run_and_no_run_is_unreferenced():
    runs = {s.run for s in report.DOC_SECTIONS}
    for run in runs:
        assert report._load(run, report.PUBLISHED)[1]["meta"]["command"]  # each says how it was made
    on_disk = {str(p.parent.relative_to(report.PUBLISHED)) for name in ("results.json", "speed.json")
               for p in report.PUBLISHED.rglob(name)}
    assert on_disk <= runs, f"committed runs no doc section shows: {sorted(on_disk - runs)}"


def test_headline_markers_are_required_once():
    with pytest.raises(ValueError, match="headline:begin"):
        report.with_headline("# README without markers\n", "| table |")
    text = f"a\n{report.HEADLINE_BEGIN}\nold\n{report.HEADLINE_END}\nb\n"
    assert report.with_headline(text, "new") == f"a\n{report.HEADLINE_BEGIN}\nnew\n{report.HEADLINE_END}\nb\n"


def _published(tmp_path, rows, fp32_reference_s=100.0):
    run = tmp_path / "ref"
    run.mkdir()
    meta = {"model": "default", "num_samples": 500, "steps": 20, "calib_samples": 64, "quick": False,
            "setup_s": {"fp32_reference": fp32_reference_s}, "date": "2026-12-03T00:00:00", "run_name": "ref"}
    (run / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    return tmp_path


def _args(**kw):
    base = dict(model="default", num_samples=500, steps=20, calib_samples=64, calib_seeds=1, no_compile=False)
    return types.SimpleNamespace(**{**base, **kw})


def test_plan_scales_the_committed_phases_by_the_work_asked_and_the_machine(tmp_path):
    phases = {"quantize": 40.0, "heldout": 2.0, "compile": 30.0, "sampling": 20.0}
    published = _published(tmp_path, [{"name": "fp32", "method": "fp32"},
                                      {"name": "naive-w8a8", "method": "naive-minmax", "phase_s": phases},
                                      {"name": "dmq-w4a8", "method": "dmq", "phase_s": {**phases, "quantize": 100.0}}])
    rows = select_rows(default_rows(has_vnni=True), "naive-w8a8,dmq-w4a8,tfmq-w4a8")
    plan = Plan.for_rows(rows, _args(num_samples=250, calib_samples=32, calib_seeds=2), published)
    assert plan.estimates["fp32"] == 0.0
    assert plan.estimates["naive-w8a8"] == pytest.approx((40 / 2 + 30 + 20 / 2) * 2 + 2)
    assert plan.estimates["dmq-w4a8"] == pytest.approx((100 / 2 + 30 + 20 / 2) * 2 + 2)
    # no committed time for tfmq-w4a8 and no tfmq row: the median of all rows
    assert plan.estimates["tfmq-w4a8"] == pytest.approx((plan.estimates["naive-w8a8"] + plan.estimates["dmq-w4a8"]) / 2)
    no_compile = Plan.for_rows(rows, _args(no_compile=True), published)
    assert no_compile.estimates["naive-w8a8"] == pytest.approx(40 + 20 + 2)
    # this machine sampled the FP32 reference in twice the reference's time (for the same work): x2
    plan.calibrate_speed(100.0, _args(num_samples=250))
    assert plan.speed == pytest.approx(2.0)
    assert plan.total_s() == pytest.approx(2 * sum(plan.estimates.values()))
    # a finished row that took 1.5x its estimate scales the rest by 1.5
    plan.done["naive-w8a8"] = 1.5 * plan.estimates["naive-w8a8"] * plan.speed
    assert plan.remaining_s() == pytest.approx(1.5 * 2 * (plan.estimates["dmq-w4a8"] + plan.estimates["tfmq-w4a8"]))
    assert any("dmq-w4a8" in line for line in plan.lines())


def test_plan_without_a_committed_run_says_so(tmp_path):
    rows = select_rows(default_rows(has_vnni=True), "naive-w8a8")
    plan = Plan.for_rows(rows, _args(model="dit"), _published(tmp_path, []))
    assert plan.total_s() is None and plan.remaining_s() is None
    assert "no time estimates" in plan.lines()[0]
    assert reference_run("dit", tmp_path) is None


def test_budget_warning(capsys):
    assert not warn_budget(100.0, None) and not warn_budget(None, 50.0) and not warn_budget(100.0, 100.0)
    assert warn_budget(901.0, 900.0)
    assert "exceeds --budget-s 15:00" in capsys.readouterr().out


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (75, "1:15"), (3700, "1:01:40")])
def test_format_s(seconds, text):
    assert format_s(seconds) == text
