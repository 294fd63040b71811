"""A replayed fraction's summary row (one line of the archive's table) and its HTML page.

The goal values in both come from the planning stage's record (``planning_result.json``,
the numbers a live session shows at the console); the DVH curves and the values on the true
anatomy are recomputed from the written files (:mod:`adaptive.reports.extract`).
Doses are total-course Gy (V in %).
"""

from __future__ import annotations

from pathlib import Path

from adaptive.reports import figures
from adaptive.reports.extract import FractionData, goal_key
from adaptive.reports.html import esc, figure, fmt, kv_table, page, table, verdict


def _goal_rows(data: FractionData) -> list[dict]:
    return list(((data.planning or {}).get("metrics") or {}).get("rows") or [])


def _metric(row: dict) -> str:
    return row["goal"].split()[0]


def fraction_row(data: FractionData, meta: dict) -> dict:
    """The summary row of a finished fraction (CSV columns; ``meta``: identity, timings and
    provenance fields the caller adds, see :mod:`adaptive.replay.archive`)."""
    rows = _goal_rows(data)
    metrics = (data.planning or {}).get("metrics") or {}
    adapted = (data.planning or {}).get("adapted") or {}
    target = data.target
    d95 = next((r for r in rows if r["structure"] == target and _metric(r) == "D95"), None)
    goal_d95 = next((g.value_total for g in data.goals.goals
                     if g.structure == target and g.metric == "D95"), None)
    changes = {}
    for r in rows:
        if r["structure"] == target or r["goal"].startswith("V"):
            continue
        if r.get("adapted_value") is not None and r.get("scheduled_value") is not None:
            changes[f"{r['structure']} {_metric(r)}"] = round(
                r["adapted_value"] - r["scheduled_value"], 4)
    q = data.registration.get("quality") or {}
    tre_t = data.tre_mm.get(target) or {}
    t = data.timings_s
    row = {
        **meta,
        "status": "done",
        "reason": "",
        "target": target,
        "n_goals": metrics.get("n_goals"),
        "goals_met_scheduled": metrics.get("scheduled_goals_passed"),
        "goals_met_adapted": metrics.get("adapted_goals_passed"),
        "adapted_plan_written": bool(adapted.get("rtplan")),
        "adapted_checks_passed": adapted.get("checks_passed"),
        "adapted_missing_reason": data.missing.get("adapted", ""),
        "target_d95_goal_gy": goal_d95,
        "target_d95_scheduled_gy": d95.get("scheduled_value") if d95 else None,
        "target_d95_adapted_gy": d95.get("adapted_value") if d95 else None,
        "target_d95_change_gy": (round(d95["adapted_value"] - d95["scheduled_value"], 4)
                                 if d95 and d95.get("adapted_value") is not None
                                 and d95.get("scheduled_value") is not None else None),
        "oar_max_increase_gy": max(changes.values()) if changes else None,
        "oar_mean_change_gy": (round(sum(changes.values()) / len(changes), 4)
                               if changes else None),
        "oar_changes_gy": "; ".join(f"{k} {v:+.2f}" for k, v in changes.items()),
        "registration_fallback": data.registration.get("fallback"),
        "registration_validity": data.registration.get("validity"),
        "jacobian_min": q.get("jacobian_min"),
        "tre_target_mean_mm": tre_t.get("mean_mm"),
        "tre_target_p95_mm": tre_t.get("p95_mm"),
        "dice_target": data.dice.get(target),
        "dvh_table_max_diff": _max_diff(data, rows),
        "time_registration_s": t.get("registration_total"),
        "time_planning_s": t.get("planning_total"),
        "time_chain_s": t.get("total"),
        "goals": rows,
    }
    return row


def _max_diff(data: FractionData, rows: list[dict]) -> float | None:
    """Largest difference between a goal value of the stage's record and the same value
    recomputed from the written doses and structures (the DVHs shown): Gy or %."""
    diffs = [abs(data.recomputed[plan][goal_key(r["structure"], _metric(r))] - r[f"{plan}_value"])
             for r in rows for plan in ("scheduled", "adapted")
             if r.get(f"{plan}_value") is not None
             and goal_key(r["structure"], _metric(r)) in data.recomputed.get(plan, {})]
    return max(diffs) if diffs else None


def _goal_table(data: FractionData) -> str:
    rows = _goal_rows(data)
    if not rows:
        return "<p class='fail'>No goal evaluation: the planning stage wrote no metrics.</p>"
    cells = []
    for r in rows:
        unit = "%" if r["goal"].startswith("V") else "Gy"
        k = goal_key(r["structure"], _metric(r))
        truth = [fmt(data.truth_goals.get(p, {}).get(k), 2, unit)
                 for p in ("scheduled", "adapted")] if data.truth_goals else []
        cells.append([esc(r["structure"]), esc(r["goal"]), esc(r.get("priority", "")),
                      fmt(r.get("scheduled_value"), 2, unit),
                      verdict(r.get("scheduled_passed")),
                      fmt(r.get("adapted_value"), 2, unit), verdict(r.get("adapted_passed")),
                      *truth])
    head = ["structure", "goal", "priority", "scheduled today", "", "adapted", ""]
    if data.truth_goals:
        head += ["scheduled, true anatomy", "adapted, true anatomy"]
    m = (data.planning or {}).get("metrics") or {}
    met = (f"<p>Goals met: scheduled {fmt(m.get('scheduled_goals_passed'), 0)} / "
           f"{fmt(m.get('n_goals'), 0)}, adapted {fmt(m.get('adapted_goals_passed'), 0)} / "
           f"{fmt(m.get('n_goals'), 0)}. Values: {esc(m.get('units', ''))}, evaluated "
           f"{esc(m.get('on', ''))}.</p>")
    check = (f"<p class='muted'>The DVHs below, recomputed from the written RT Dose and RT "
             f"Structure Set, reproduce these values within "
             f"{fmt(_max_diff(data, rows), 4)} (Gy or %).</p>")
    return met + table(head, cells, numeric={3, 5, 7, 8}) + check


def _checks(data: FractionData) -> str:
    a = (data.planning or {}).get("adapted") or {}
    items = a.get("checks") or []
    if not items:
        return "<p class='muted'>No checks recorded.</p>"
    return table(["check", "result", "blocking", "detail"],
                 [[esc(c["name"]), verdict(c.get("passed")), fmt(c.get("blocking", True)),
                   esc(c.get("message", ""))] for c in items])


def _registration(data: FractionData) -> str:
    reg = data.registration
    q = {k: v for k, v in (reg.get("quality") or {}).items() if isinstance(v, (int, float))}
    items = [("fallback", esc(reg.get("fallback") or "none")),
             ("validity", esc(reg.get("validity") or "not assessed by this version"))]
    items += [(k, fmt(v, 4)) for k, v in sorted(q.items())]
    for name, t in data.tre_mm.items():
        items.append((f"TRE in {name} (truth)",
                      (f"mean {fmt(t.get('mean_mm'))} mm, 95th pct {fmt(t.get('p95_mm'))} mm, "
                      f"max {fmt(t.get('max_mm'))} mm ({t.get('n', 0)} voxels)")))
    for name, d in data.dice.items():
        items.append((f"Dice {name} (propagated vs truth)", fmt(d, 3)))
    gate = reg.get("registration_checks") or []
    checks = table(["gate check", "level", "result", "blocking", "detail"],
                   [[esc(c.get("name")), esc(c.get("level", "")), verdict(c.get("passed")),
                     fmt(c.get("blocking", True)), esc(c.get("message", ""))] for c in gate]
                   ) if gate else ""
    return kv_table(items) + checks


def _review(data: FractionData) -> str:
    """The registration stage's own review images (:mod:`adaptive.registration.review`)."""
    paths = [p for p in data.registration.get("review_images") or [] if Path(p).is_file()]
    if not paths:
        return "<p class='fail'>The registration stage wrote no review images.</p>"
    verdict_text = data.registration.get("registration_summary") or ""
    return (f"<p>{esc(verdict_text)}</p>" if verdict_text else "") + "".join(
        figure(figures.png_file_uri(p), "registration review") for p in paths)


def _timings(data: FractionData, meta: dict) -> str:
    t = dict(data.timings_s)
    for k in ("time_report_s", "time_task_s"):
        if meta.get(k) is not None:
            t[k.removeprefix("time_")] = meta[k]
    return table(["stage", "seconds"], [[esc(k), fmt(v, 2)] for k, v in t.items()],
                 numeric={1})


def _provenance(meta: dict) -> str:
    keys = ("software", "software_version", "software_digest", "fraction_key", "inputs_digest",
            "settings", "goals_file", "goals_source", "matched_by", "rtplan_uid",
            "rtstruct_uid", "planning_ct_series_uid", "cbct_series_uid",
            "spatial_registration", "truth", "worker", "host", "started", "finished")
    return kv_table([(k, f"<code>{esc(meta.get(k))}</code>") for k in keys if k in meta])


def render_fraction_page(data: FractionData, row: dict, meta: dict) -> str:
    """The fraction's self-contained HTML page."""
    title = f"{row['patient_id']} {row['fraction']}: scheduled vs adapted"
    n = data.fractions
    rx = data.goals.prescription.dose_per_fraction_gy * n
    a_ok = row.get("adapted_plan_written")
    banner = (f"<div class='banner ok'>Adapted plan written and passed every blocking check. "
              f"Goals met: scheduled {fmt(row.get('goals_met_scheduled'), 0)}, adapted "
              f"{fmt(row.get('goals_met_adapted'), 0)} of {fmt(row.get('n_goals'), 0)}; "
              f"{esc(data.target)} D95 {fmt(row.get('target_d95_scheduled_gy'))} → "
              f"{fmt(row.get('target_d95_adapted_gy'))} Gy.</div>" if a_ok else
              f"<div class='banner fail'>No adapted plan offered: "
              f"{esc(data.missing.get('adapted', 'it failed its checks'))}.</div>")
    if "scheduled" in data.missing and data.missing["scheduled"] != data.missing.get("adapted"):
        banner += f"<div class='banner fail'>{esc(data.missing['scheduled'])}.</div>"
    ident = kv_table([
        ("patient", esc(f"{row['patient_id']} {meta.get('patient_name', '')}")),
        ("fraction", esc(f"{row['fraction']} (image of {meta.get('image_date') or '?'}, "
                         f"series {meta.get('cbct_series_uid', '')})")),
        ("scheduled plan", esc(f"{meta.get('plan_label', '')} ({meta.get('rtplan_uid', '')})")),
        ("clinical goals", esc(f"{data.goals.site}: {meta.get('goals_source', '')}")),
        ("prescription", esc(f"{data.goals.prescription.dose_per_fraction_gy:g} Gy × {n} to "
                             f"{data.target}")),
    ])
    parts = [f"<h1>{esc(title)}</h1>", banner, ident,
             "<h2>Clinical goals</h2>", _goal_table(data)]
    if data.dvh_today:
        parts += ["<h2>Dose-volume histograms</h2>",
                  figure(figures.dvh_figure(data.dvh_today, data.dvh_truth, rx), "DVH")]
    if data.doses:
        parts += ["<h2>Dose on today's anatomy</h2>",
                  figure(figures.dose_slices_figure(data.cbct, data.doses,
                                                    data.today_cbct.get(data.target),
                                                    data.target, n, rx), "dose slices")]
    parts += ["<h2>Registration</h2>", _registration(data), _review(data),
              "<h2>Plan checks</h2>", _checks(data),
              "<h2>Stage timings</h2>", _timings(data, meta),
              "<h2>Provenance</h2>", _provenance(meta)]
    return page(title, "".join(parts))


def render_failed_page(row: dict, meta: dict) -> str:
    """The page of a fraction that could not be replayed: what failed and why."""
    title = f"{row['patient_id']} {row['fraction']}: FAILED"
    body = (f"<h1>{esc(title)}</h1><div class='banner fail'>Failed at "
            f"{esc(row.get('failed_stage', '?'))}: {esc(row.get('reason', ''))}</div>")
    if row.get("traceback"):
        body += f"<h2>Traceback</h2><pre>{esc(row['traceback'])}</pre>"
    body += "<h2>Provenance</h2>" + _provenance(meta)
    return page(title, body)
