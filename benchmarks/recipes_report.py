"""benchmarks/recipes.py's figures: summaries, the aims, and the printed tables (pure, stdlib only)."""

from __future__ import annotations

import json
import statistics


def summarize(records: list[dict]) -> dict:
    """n, held-out error mean ± sd (0 with one seed), each seed's, the error ursa reported, wall mean, peak RSS max."""
    ok = [r for r in records if r.get("error_rate") is not None]
    errs = [r["error_rate"] for r in ok]
    reported = [r["reported_error"] for r in ok if r.get("reported_error") is not None]
    return {"n": len(ok), "failed": len(records) - len(ok),
            "err_mean": statistics.mean(errs) if errs else None,
            "err_sd": statistics.stdev(errs) if len(errs) > 1 else (0.0 if errs else None),
            "errs": errs, "reported_mean": statistics.mean(reported) if reported else None,
            "wall_mean": statistics.mean(r["wall_s"] for r in ok) if ok else None,
            "same_as_default": sum(bool(r.get("same_as_default")) for r in ok),
            "rss_max": max(r["rss_mb"] for r in ok) if ok else None}


def usable_idle(entry: dict | None, default_seed0: dict | None) -> dict | None:
    """A set's idle timing (recipes_timing.py) when it timed the recipe this report holds: its ursa run finished with
    the counted plan of the stored default run of seed 0 (else it timed other code: None). Its held-out error may
    differ by a picture where the thread count differs (the busy benchmark runs one thread, the timing all cores:
    another summation order); `same_as_busy` says. A failed fastai timing is dropped (its side stays busy)."""
    u, rec = (entry or {}).get("ursa") or {}, default_seed0 or {}
    if (u.get("failure") or u.get("wall_s") is None or rec.get("test_error") is None
            or u.get("counted_s") != (rec.get("recipe_json") or {}).get("planned_seconds")):
        return None
    f = entry.get("fastai") or {}
    return {"ursa": u, "fastai": f if f.get("wall_s") is not None and not f.get("failure") else None,
            "commit": entry.get("commit")}


def _aim(name: str, value: str, aim: str, ok: bool | None) -> dict:
    return {"aim": name, "value": value, "target": aim, "verdict": "not measured" if ok is None else ("held" if ok else "missed")}


def evaluate_aims(set_name: str, default: dict | None, frozen: dict | None, fastai: dict | None,
                  lrfind: dict | None = None, n_test: int | None = None, idle: dict | None = None) -> list[dict]:
    """Issues 15 and 28's aims for the default recipe on one set (summaries as from `summarize`), each held/missed/not measured.

    ``idle``: the set's entry of results/recipes_timing.json (both sides timed alone on the machine); when it has both
    walls, the time aims use them ("(idle)"), else the benchmark's own walls ("(busy)")."""
    err, wall = (default or {}).get("err_mean"), (default or {}).get("wall_mean")
    f_err, f_wall, fr_err = (fastai or {}).get("err_mean"), (fastai or {}).get("wall_mean"), (frozen or {}).get("err_mean")
    u, f = (idle or {}).get("ursa") or {}, (idle or {}).get("fastai") or {}
    u_idle, f_idle = (None if u.get("failure") else u.get("wall_s")), (None if f.get("failure") else f.get("wall_s"))
    when = "busy"
    if u_idle is not None and f_idle is not None:
        wall, f_wall, when = u_idle, f_idle, "idle"
    e_f, e_fr = err is not None and f_err is not None, err is not None and fr_err is not None
    w_f = wall is not None and f_wall is not None
    wall_ratio = f"{wall / f_wall:.2f}" if w_f and f_wall else "-"
    aims = [_aim("error / fastai error", (f"{err / f_err:.2f}" if f_err else f"{err:.4f} vs 0") if e_f else "-",
                 "<= 0.5", err <= 0.5 * f_err if e_f else None),
            _aim("error vs frozen", f"{err:.4f} vs {fr_err:.4f}" if e_fr else "-", "<= frozen", err <= fr_err if e_fr else None),
            _aim(f"wall / fastai wall ({when})", wall_ratio, "<= 1", wall <= f_wall if w_f else None)]
    if set_name == "bears":
        aims += [_aim("error", f"{err:.4f}" if err is not None else "-", "<= 0.03", err <= 0.03 if err is not None else None),
                 _aim(f"wall / fastai wall ({when})", wall_ratio, "<= 0.2", wall <= f_wall / 5 if w_f else None)]
    if lrfind is not None:  # issue 28: the suggestion, used as --lr, never worse than the default by more than one picture
        worst = max((a - b for a, b in zip(lrfind.get("errs", []), (default or {}).get("errs", []))), default=None)
        pics = None if worst is None or not n_test else worst * n_test
        aims.append(_aim("lr-find vs default, pictures", "-" if pics is None else f"{pics:+.1f}", "<= +1 (worst seed)",
                         None if pics is None else pics <= 1 + 1e-9))
    return aims


def condense(recipe_json: object, width: int = 150) -> str:
    """One line of what the default recipe decided (recipe.json's scalar fields first)."""
    if not isinstance(recipe_json, dict):
        return json.dumps(recipe_json)[:width]
    scalar = {k: not isinstance(v, (dict, list)) for k, v in recipe_json.items()}
    line = ", ".join([f"{k}={v}" for k, v in recipe_json.items() if scalar[k] and not k.endswith("_why")]
                     + [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in recipe_json.items() if not scalar[k]])
    return line if len(line) <= width else line[: width - 3] + "..."


def fmt(v: float | None, spec: str) -> str:
    """A figure, or '-' when there is none."""
    return "-" if v is None else format(v, spec)


def table_lines(set_name: str, info: str, recipes: list[str], summaries: dict, fastai: dict | None, fastai_note: str) -> list[str]:
    """One set's table: recipe x (held-out error mean ± sd, the error ursa reported, wall, peak RSS, per seed)."""
    lines = [f"\n{set_name}: {info}",
             f"  {'recipe':<16} {'n':>2} {'held-out error':>17} {'reported':>9}  {'wall s':>7} {'RSS MB':>7}  held-out per seed"]
    for name, sm in [(r, summaries.get(r)) for r in recipes] + [("fastai (lesson)", fastai)]:
        if sm is None:
            lines.append(f"  {name:<16} {'-':>2} {(fastai_note or 'not measured') if name.startswith('fastai') else 'not run'}")
            continue
        err = f"{fmt(sm['err_mean'], '.4f')} ± {fmt(sm['err_sd'], '.4f')}"
        extra = (f" ({sm['failed']} failed)" if sm.get("failed") else "") + (
            f" ({sm['same_as_default']} = the default's run: what it decided)" if sm.get("same_as_default") else "")
        lines.append(f"  {name:<16} {sm['n']:>2} {err:>17} {fmt(sm.get('reported_mean'), '.4f'):>9}  {fmt(sm['wall_mean'], '.1f'):>7} "
                     f"{fmt(sm['rss_max'], '.0f'):>7}  " + ", ".join(f"{e:.4f}" for e in sm["errs"]) + extra)
    return lines


def aims_lines(set_name: str, aims: list[dict], decided: list[dict]) -> list[str]:
    """What the default recipe decided (recipe.json) on a set and each aim, held or missed."""
    lines = [f"\naims for the default recipe on {set_name}:"]
    if decided:
        same = all(d == decided[0] for d in decided)
        lines.append(f"  decided (seed 0{'' if same else '; differs by seed'}): {condense(decided[0])}")
    lines += [f"  {a['aim']:<29} {a['value']:>17}  aim {a['target']:<18} {a['verdict']}" for a in aims]
    return lines


def tta_lines(sets: list[str], records: list[dict]) -> list[str]:
    """Per set: the default recipe's models, validation error without and with --tta (mean over seeds)."""
    lines = ["\ntest-time augmentation (`ursa interpret --tta`, on ursa's own validation images) on the default recipe's models:"]
    for s in sets:
        pairs = [r["tta"] for r in records if r["set"] == s and r.get("tta") and None not in r["tta"].values()]
        if pairs:
            plain = statistics.mean(t["plain"] for t in pairs)
            tta = statistics.mean(t["tta"] for t in pairs)
            lines.append(f"  {s:<20} without {plain:.4f}, with --tta {tta:.4f} ({len(pairs)} model(s); "
                         + ", ".join(f"{t['plain']:.4f}->{t['tta']:.4f}" for t in pairs) + ")")
    return lines


def _decided_short(recipe_json: dict | None) -> str:
    """What the default decided on one run, in a few words (size, flips, fine-tuning)."""
    if not isinstance(recipe_json, dict):
        return "-"
    size, tune = recipe_json.get("size"), recipe_json.get("tune_size")
    ft = recipe_json.get("fine_tune_epochs")
    what = {"planned": f"fine-tunes {ft} epochs" + (f" at {tune} px" if tune else ""),
            "good_enough": "frozen good enough"}.get(recipe_json.get("fine_tune"), str(recipe_json.get("fine_tune")))
    return f"{size} px, flips {recipe_json.get('flips')}; {what}; {recipe_json.get('planned_seconds')} s counted"


TABLE_ARMS = ("lrfind", "no_finetune", "size64", "size128", "optimistic")


def markdown_table(report: dict, arms: tuple[str, ...] = TABLE_ARMS) -> list[str]:
    """The per-set table of docs/train.md and benchmarks/README.md from recipes.json: held-out errors (mean of the
    seeds, then each seed), what the default decided, the alternatives' means, fastai's lesson beside, the aims."""
    def mean(sm: dict | None) -> str:
        if not sm or sm.get("err_mean") is None:
            return "not run"
        same = " (= default)" if sm.get("same_as_default") == sm.get("n") and sm.get("n") else ""
        return f"{sm['err_mean']:.3f}{same} ({sm['n']})"

    idle = report.get("idle_timing") or {}
    head = ["set (test pictures)", "default: held-out mean (per seed)", "reported", "decided (seed 0)", *arms,
            "fastai lesson (error, wall s)", *(["idle wall s: ursa / fastai"] if idle else []), "aims held / measured"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    runs = report.get("runs", [])
    for s, by in report["summaries"].items():
        d = by.get("default")
        if not d or d.get("err_mean") is None:
            continue
        first = next((r.get("recipe_json") for r in sorted(runs, key=lambda r: r["seed"])
                      if r["set"] == s and r["recipe"] == "default" and r.get("error_rate") is not None), None)
        fa = report.get("fastai", {}).get(s) or {}
        fastai = f"{fa['err_mean']:.3f}, {fa['wall_mean']:.0f}" if fa.get("err_mean") is not None else "not measured"
        aims = [a for a in report.get("aims", {}).get(s, []) if a["verdict"] != "not measured"]
        held = sum(a["verdict"] == "held" for a in aims)
        missed = ", ".join(a["aim"] for a in aims if a["verdict"] == "missed")
        cells = [f"{s} ({report['n_test'].get(s)})",
                 f"**{d['err_mean']:.3f}** (" + ", ".join(f"{e:.3f}" for e in d["errs"]) + ")",
                 fmt(d.get("reported_mean"), ".3f"), _decided_short(first), *(mean(by.get(a)) for a in arms), fastai,
                 *([_idle_cell(idle.get(s))] if idle else []), f"{held} / {len(aims)}" + (f"; missed: {missed}" if missed else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _idle_cell(t: dict | None) -> str:
    """A set's idle walls (recipes_timing.py): ursa's / fastai's, and their ratio."""
    u, f = ((t or {}).get("ursa") or {}).get("wall_s"), ((t or {}).get("fastai") or {}).get("wall_s")
    if u is None or ((t or {}).get("ursa") or {}).get("failure"):
        return "not timed"
    return f"{u:.0f} / {fmt(f, '.0f')}" + (f" ({u / f:.2f})" if f else "")


if __name__ == "__main__":  # the markdown table: python benchmarks/recipes_report.py [FILE [ARM,ARM...]]
    import sys
    from pathlib import Path

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "recipes.json"
    arms = tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else TABLE_ARMS
    print("\n".join(markdown_table(json.loads(path.read_text()), arms)))
