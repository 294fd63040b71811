"""The archive's summary: one row per fraction as CSV, and an HTML page with the table (each
fraction linked to its report), the failures with their reasons and summary plots.

Doses are total-course Gy; times in seconds (wall clock, under whatever else the machine
was running)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from adaptive.reports import figures
from adaptive.reports.html import esc, figure, fmt, kv_table, page, table, verdict

#: CSV columns, in order (rows may carry more fields, e.g. the goal table, kept in JSON)
CSV_COLUMNS = (
    "patient_id", "fraction", "fraction_id", "image_date", "cbct_series_uid", "plan_label",
    "goals_site", "goals_source", "status", "failed_stage", "reason", "skipped",
    "n_goals", "goals_met_scheduled", "goals_met_adapted", "adapted_plan_written",
    "adapted_checks_passed", "adapted_missing_reason", "target", "target_d95_goal_gy",
    "target_d95_scheduled_gy", "target_d95_adapted_gy", "target_d95_change_gy",
    "oar_max_increase_gy", "oar_mean_change_gy", "oar_changes_gy", "registration_fallback",
    "registration_validity", "jacobian_min", "tre_target_mean_mm", "tre_target_p95_mm",
    "dice_target", "time_registration_s", "time_planning_s", "time_chain_s",
    "time_report_s", "time_task_s", "worker", "report", "fraction_key",
)


def summary_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore",
                       lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def sort_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r.get("patient_id", ""), r.get("fraction", "")))


def render_summary_page(rows: list[dict], meta: dict, out_dir: Path) -> str:
    """The archive summary page (``out_dir``: where the page goes; report links are
    relative to it)."""
    rows = sort_rows(rows)
    done = [r for r in rows if r.get("status") == "done"]
    failed = [r for r in rows if r.get("status") != "done"]
    head = ["patient", "fraction", "image date", "goals met sched.", "goals met adapt.",
            "target D95 sched. (Gy)", "target D95 adapt. (Gy)", "Δ D95 (Gy)",
            "max OAR increase (Gy)", "adapted plan", "registration", "TRE target (mm)",
            "time (s)", "report"]
    cells = []
    for r in done:
        link = (f'<a href="{esc(r["report"])}">report</a>' if r.get("report") else "—")
        reg = esc(r.get("registration_validity") or r.get("registration_fallback") or "deformable")
        cells.append([esc(r["patient_id"]), esc(r["fraction"]), esc(r.get("image_date", "")),
                      f"{fmt(r.get('goals_met_scheduled'), 0)} / {fmt(r.get('n_goals'), 0)}",
                      f"{fmt(r.get('goals_met_adapted'), 0)} / {fmt(r.get('n_goals'), 0)}",
                      fmt(r.get("target_d95_scheduled_gy")), fmt(r.get("target_d95_adapted_gy")),
                      fmt(r.get("target_d95_change_gy")), fmt(r.get("oar_max_increase_gy")),
                      verdict(r.get("adapted_plan_written"), "written", "not offered"),
                      reg, fmt(r.get("tre_target_mean_mm")), fmt(r.get("time_chain_s"), 1),
                      link + (" (resumed)" if r.get("skipped") else "")])
    fail_cells = [[esc(r["patient_id"]), esc(r["fraction"]), esc(r.get("cbct_series_uid", "")),
                   esc(r.get("failed_stage", "")), esc(r.get("reason", "")),
                   (f'<a href="{esc(r["report"])}">details</a>' if r.get("report") else "—")]
                  for r in failed]
    overview = kv_table([
        ("archive", esc(meta.get("archive", ""))),
        ("patients", fmt(len({r["patient_id"] for r in rows}), 0)),
        ("fractions", (f"{len(rows)}: {len(done)} replayed "
                      f"({sum(bool(r.get('skipped')) for r in done)} from an earlier run), "
                      f"{len(failed)} failed")),
        ("adapted plan offered", (f"{sum(bool(r.get('adapted_plan_written')) for r in done)} of "
                                 f"{len(done)}")),
        ("cluster", esc(meta.get("cluster", ""))),
        ("wall time (s)", fmt(meta.get("wall_time_s"), 1)),
        ("software", esc(f"{meta.get('software', '')} {meta.get('software_version', '')} "
                         f"(source {str(meta.get('software_digest', ''))[:12]})")),
        ("settings", f"<code>{esc(meta.get('settings', ''))}</code>"),
        ("table", '<a href="summary.csv">summary.csv</a>'),
    ])
    parts = ["<h1>Archive replay: scheduled vs adapted</h1>", overview]
    if done:
        parts += ["<h2>Target coverage per fraction</h2>",
                  figure(figures.d95_figure(done, done[0].get("target", "PTV")), "D95"),
                  "<h2>Goals met per fraction</h2>",
                  figure(figures.goals_met_figure(done), "goals met"),
                  "<h2>Fractions</h2>", table(head, cells, numeric={5, 6, 7, 8, 11, 12})]
    if failed:
        parts += ["<h2>Failed fractions</h2>",
                  table(["patient", "fraction", "daily image series", "stage", "reason", ""],
                        fail_cells)]
    return page("Archive replay summary", "".join(parts))
